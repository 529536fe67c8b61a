"""Engine rollouts and their replay in the trainer: with Keep Routing, Keep Selection and Keep
Sampling Mask the trainer's log-probs equal the engine's (fp32, CPU), for single- and multi-turn
trajectories."""

import copy
import random
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.chat import EOS, encode_messages, render_tool_calls
from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.model import Transformer
from dsv32.model.indexer import pack_selection, unpack_selection
from dsv32.rl.rollout import (
    PerTrajectory,
    pack,
    replay_logprobs,
    rollout,
    tool_env,
    tool_suffix,
)
from dsv32.rl.tasks import Task, arithmetic_task
from dsv32.rl.trainer import task_examples
from dsv32.tokenizer import train_tokenizer

PARAMS = SamplingParams(temperature=1.0, top_p=0.8, max_tokens=10)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    tasks = [arithmetic_task(rng, tool=i % 2 == 1) for i in range(200)]
    corpus = tmp_path_factory.mktemp("tok") / "corpus.txt"
    corpus.write_text("\n".join(encode_messages(t.messages + t.solution, t.thinking_mode) for t in tasks))
    return train_tokenizer([corpus], 1024, corpus.parent)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return Transformer(cfg).eval()


def engine(model):
    return Engine(model, EngineConfig(num_blocks=64, prefill_chunk=24, max_num_seqs=8))


def moved_selection_bias(model):
    """The trainer's copy after an aux-loss-free balancing update of the gate's selection bias:
    the bias changes which experts a free router picks, never the weights over given ids."""
    trainer = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    for block in trainer.layers:
        if hasattr(block.mlp, "gate"):
            block.mlp.gate.e_score_correction_bias += 0.02 * torch.randn(trainer.cfg.n_routed_experts, generator=g)
    return trainer


def replay(model, trajs, **switches):
    batch = pack(trajs, 0)
    with torch.no_grad():
        lp = replay_logprobs(model, batch, PARAMS.temperature, **switches)
    return lp[batch.action], batch.logp_old[batch.action]


def test_replay_equals_engine_logprobs_only_with_both_stabilisers(model, tok):
    rng = random.Random(1)
    tasks = [arithmetic_task(rng) for _ in range(3) for _ in range(2)]
    trajs = rollout(engine(model), tok, tasks, PARAMS)
    t = trajs[0]
    assert t.experts.shape == (len(t.tokens) - 1, 2, 2)  # every fed position, 2 MoE layers, top-2
    assert t.n_sampled == len(t.tokens) - t.prompt_len and all(k is not None for k in t.kept[t.prompt_len:])
    lp, old = replay(model, trajs)
    assert (lp - old).abs().max() < 1e-5
    trainer = moved_selection_bias(model)
    lp, old = replay(trainer, trajs)
    assert (lp - old).abs().max() < 1e-5                     # forced routes: the bias does not matter
    lp, old = replay(trainer, trajs, keep_routing=False)
    assert (lp - old).abs().mean() > 1e-3                    # the free router picks other experts
    lp, old = replay(model, trajs, keep_sampling_mask=False)
    assert (lp - old).max() < -0.05                          # the whole vocabulary: every token less likely
    broken = [copy.copy(trajs[0]), trajs[1]]
    broken[0].experts = None
    with pytest.raises(ValueError, match="no recorded expert routes"):
        pack(broken)


def moved_indexers(model):
    """The trainer's copy with every indexer perturbed: it ranks keys differently from the
    engine's, as after an update or under other numerics. Index scores choose the keys and never
    enter the attention weights, so over the engine's key sets the log-probs stay the same."""
    trainer = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in trainer.named_parameters():
            if ".indexer." in name and p.dim() == 2:
                p.add_(p.std() * torch.randn(p.shape, generator=g))
    return trainer


def test_dsa_replays_the_engine_key_selection_only_with_keep_selection(model, tok):
    rng = random.Random(6)
    tasks = [arithmetic_task(rng) for _ in range(2) for _ in range(2)]
    params = replace(PARAMS, max_tokens=40, ignore_eos=True)       # well past index_topk=16 keys
    trajs = rollout(engine(model), tok, tasks, params)
    k, layers = model.cfg.index_topk, model.cfg.num_hidden_layers
    for t in trajs:  # every fed position with more than k causal keys: k distinct causal keys per layer
        n = len(t.tokens) - 1 - k
        assert n > 40 and t.selection.shape == (n, layers, k) and t.selection.dtype == torch.uint16
        keys = unpack_selection(t.selection)
        pos = torch.arange(k, k + n)[:, None, None]
        assert (keys >= 0).all() and (keys <= pos).all() and (keys.diff(dim=-1) > 0).all()
    lp, old = replay(model, trajs)
    assert (lp - old).abs().max() < 1e-5
    trainer = moved_indexers(model)
    lp, old = replay(trainer, trajs)
    assert (lp - old).abs().max() < 1e-5                         # forced key sets: the indexer does not matter
    lp, old = replay(trainer, trajs, keep_selection=False)
    assert (lp - old).abs().mean() > 1e-3                        # its own top-k attends to other keys
    broken = [copy.copy(trajs[0]), trajs[1]]
    broken[0].selection = broken[0].selection[:-3]
    with pytest.raises(ValueError, match="recorded key selections"):
        pack(broken)


@pytest.mark.gpu
def test_dsa_selection_replay_on_cuda_with_the_kernels(model, tok):
    """The same on CUDA, where the indexer and top-k run as Triton kernels in the engine and the
    trainer (fp32: the equality is up to GPU reduction order)."""
    gpu = copy.deepcopy(model).cuda()
    eng = Engine(gpu, EngineConfig(num_blocks=64, prefill_chunk=24, max_num_seqs=8))
    rng = random.Random(7)
    trajs = rollout(eng, tok, [arithmetic_task(rng) for _ in range(4)], replace(PARAMS, max_tokens=40, ignore_eos=True))
    assert all(t.selection is not None and len(t.selection) == len(t.tokens) - 1 - model.cfg.index_topk for t in trajs)
    batch = pack(trajs, 0, device="cuda")
    trainer = moved_indexers(model).cuda()
    with torch.no_grad():
        on = replay_logprobs(trainer, batch, PARAMS.temperature)[batch.action]
        off = replay_logprobs(trainer, batch, PARAMS.temperature, keep_selection=False)[batch.action]
    old = batch.logp_old[batch.action]
    assert (on - old).abs().max() < 1e-4 and (off - old).abs().mean() > 1e-3


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 300_000), st.data())
def test_packed_key_sets_round_trip(k, end, data):
    """pack_selection is lossless for any set of distinct positions (and -1 padding), 2 bytes a key
    unless two consecutive selected keys lie 65536 or more apart."""
    keys = data.draw(st.lists(st.integers(0, end), min_size=0, max_size=k, unique=True))
    row = torch.tensor(keys + [-1] * (k - len(keys)))[torch.randperm(k)]
    packed = pack_selection(row[None])
    assert torch.equal(unpack_selection(packed)[0], row.sort().values)
    gaps = torch.tensor(sorted([-1] + keys)).diff()
    assert packed.dtype == (torch.uint16 if len(keys) == 0 or gaps.max() < 65536 else torch.int32)


def test_a_later_turn_never_replaces_the_records_the_earlier_turns_sampled_with():
    """Routes and key sets merged over turns (rollout._merged): each position keeps the record of
    the turn that computed it first; a re-prefill's differing records only count as drift.
    (On a CPU in fp32 a re-prefill recomputes the same routes, so the drift is made by hand.)"""
    from dsv32.rl.rollout import _merged

    first = torch.tensor([[[1, 2]], [[3, 4]]])                           # turn 1: positions 0, 1
    later = torch.tensor([[[1, 2]], [[5, 6]], [[7, 8]], [[9, 9]]])       # turn 2 re-prefilled 0, 1; then 2, 3
    drift = []
    merged = _merged(first, later, drift)
    assert merged.tolist() == [[[1, 2]], [[3, 4]], [[7, 8]], [[9, 9]]] and drift == [0.5]
    assert _merged(None, later, drift) is later and _merged(first, None, drift) is first
    wide = _merged(first.to(torch.uint16), later.int(), [])              # packed key sets: uint16 meets int32
    assert wide.dtype == torch.int32 and wide.tolist() == merged.tolist()


class Recording(Engine):
    """The engine, keeping every request's output (to check each turn's routes)."""

    def output(self, seq):
        out = super().output(seq)
        self.outputs = getattr(self, "outputs", []) + [out]
        return out


def scripted_env(task, message):
    """Every turn calls the calculator (a random model cannot be trusted to)."""
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "6*7"}}}
    return {"role": "assistant", "reasoning_content": "r", "content": "", "tool_calls": [call]}, ["42"]


def test_multi_turn_tool_rollout_keeps_every_turns_routes(model, tok):
    task = arithmetic_task(random.Random(2), tool=True)
    eng = Recording(model, EngineConfig(num_blocks=64, prefill_chunk=24))
    (t,) = rollout(eng, tok, [task], PARAMS, max_turns=3, env=scripted_env)
    assert t.turns == 3 and len(t.turn_spans) == 3 and len(eng.outputs) == 3
    topk = model.cfg.index_topk
    assert t.experts.shape[0] == len(t.tokens) - 1
    for k, ((start, end), out) in enumerate(zip(t.turn_spans, eng.outputs)):
        # each request's prompt is the whole stream so far: earlier turns' samples, thinking included
        assert out.prompt_token_ids == t.tokens[:start] and out.token_ids == t.tokens[start:end]
        # positions this turn computed first keep this turn's routes
        first = t.turn_spans[k - 1][1] - 1 if k else 0
        assert torch.equal(t.experts[first:end - 1], out.experts[first:end - 1])
        a, b = max(0, first - topk), end - 1 - topk            # and its key sets, rows from position topk
        assert torch.equal(t.selection[a:b], out.selection[a:b])
    for (_, end), (nxt, _) in zip(t.turn_spans, t.turn_spans[1:]):
        suffix = tok.decode(t.tokens[end:nxt])
        assert suffix == "\n\n<function_results>\n<result>42</result>\n</function_results>\n\n<think>"
        assert not any(t.action[end:nxt])
    assert len(t.route_drift) == 2 and all(0 <= d <= 1 for d in t.route_drift)
    assert t.selection.shape[0] == len(t.tokens) - 1 - topk and len(t.selection_drift) == 2
    # the trainer's single forward over all turns reproduces every turn's sampling log-probs
    lp, old = replay(model, [t])
    assert len(lp) == sum(e - s for s, e in t.turn_spans) and (lp - old).abs().max() < 1e-5
    lp, old = replay(moved_selection_bias(model), [t], keep_routing=False)
    assert (lp - old).abs().mean() > 1e-3


def test_tool_results_that_would_pass_the_context_end_the_trajectory_inside_it(model, tok):
    """Found on a GPU run: a long tool result appended after the last turn that fits pushed the
    trajectory past max_model_len, and its replay past the model's positions. Now the trajectory
    ends before the results, as cut by length, and replays."""
    task = arithmetic_task(random.Random(2), tool=True)

    def long_results(task, message):
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "6*7"}}}
        return {"role": "assistant", "reasoning_content": "r", "content": "", "tool_calls": [call]}, ["42 " * 400]

    limit = len(tok.apply_chat_template(task.messages, thinking_mode=task.thinking_mode)) + 3 * PARAMS.max_tokens
    eng = Engine(model, EngineConfig(num_blocks=64, max_num_seqs=8, max_model_len=limit))
    (t,) = rollout(eng, tok, [task], PARAMS, max_turns=3, env=long_results)
    assert t.turns == 1 and t.finish_reason == "length" and len(t.tokens) <= limit
    assert not any(t.action[t.turn_spans[-1][1]:])   # nothing after the one sampled turn
    got, want = replay(model, [t])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tool_env_parses_a_real_tool_call_and_the_suffix_matches_the_chat_format():
    task = arithmetic_task(random.Random(3), tool=True)
    calls = [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3*4"}}}]
    text = "I use the calculator.</think>" + render_tool_calls(calls) + EOS
    from dsv32.chat import parse_completion

    message, results = tool_env(task, parse_completion(text, "thinking"))
    assert results == ["14"]
    suffix = tool_suffix(task.messages, message, results, "thinking")
    whole = encode_messages(task.messages + [message, {"role": "tool", "content": "14"}], "thinking")
    assert whole.endswith(text + suffix) and suffix.endswith("<think>")
    assert tool_env(task, None) is None
    assert tool_env(task, {"role": "assistant", "content": "\\boxed{14}", "reasoning_content": "", "tool_calls": []}) is None


def test_warm_start_examples_have_the_rollout_token_layout(tok):
    task = arithmetic_task(random.Random(4), tool=True)
    (ids, labels), = task_examples(tok, [task])
    text = tok.decode(ids)
    assert text == encode_messages(task.messages + task.solution, "thinking")
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert "<function_results>" not in trained and "calculator says" in trained and trained.count(EOS) == 2


def test_plain_vocabulary_prompts(tok):
    from dsv32.llama.tokenizer import PlainTokenizer
    from dsv32.rl.rollout import encode_prompt

    plain = PlainTokenizer(tok.tok, tok.bos_id, tok.eos_id)
    task = Task("arithmetic", [{"role": "user", "content": "What is 2+2?"}], answer="4")
    assert tok.decode(encode_prompt(plain, task)[1:]) == "Question: What is 2+2?\nAnswer: "
    with pytest.raises(ValueError, match="tools"):
        encode_prompt(plain, arithmetic_task(random.Random(0), tool=True))


def test_a_converted_llama_family_model_rolls_out_and_replays(tok):
    """No experts (Keep Routing has nothing to force), the plain prompt format, same equality.
    (8 indexer heads: with 2, ReLU'd index scores of a random model tie at exactly 0, and top-k
    breaks those ties differently for a prefix and for the whole sequence.)"""
    from dsv32.llama.model import LlamaConfig, LlamaDSA
    from dsv32.llama.tokenizer import PlainTokenizer

    torch.manual_seed(0)
    llama = LlamaDSA(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                                 index_n_heads=8, index_head_dim=32, index_topk=8, bos_token_id=tok.bos_id,
                                 eos_token_id=tok.eos_id)).eval()
    plain = PlainTokenizer(tok.tok, tok.bos_id, tok.eos_id)
    trajs = rollout(engine(llama), plain, [arithmetic_task(random.Random(5))] * 2, PARAMS)
    assert all(t.experts is None for t in trajs)
    lp, old = replay(llama, trajs)
    assert (lp - old).abs().max() < 1e-5


def test_a_prompt_longer_than_the_context_samples_nothing_and_still_packs(model, tok):
    """A tool prompt that fills the engine's context gets no turn and no routes; the batch it lands
    in still packs with Keep Routing for the others, and it carries no loss."""
    rng = random.Random(3)
    short, long = arithmetic_task(rng), arithmetic_task(rng, tool=True)
    eng = Engine(model, EngineConfig(num_blocks=64, max_num_seqs=8, max_model_len=len(tok.apply_chat_template(
        long.messages, thinking_mode=long.thinking_mode)) - 1))
    trajs = rollout(eng, tok, [short, long], PARAMS)
    assert trajs[0].experts is not None and trajs[0].n_sampled > 0
    assert trajs[1].experts is None and trajs[1].turns == 0 and trajs[1].finish_reason == "length"
    got, want = replay(model, trajs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)          # the sampled one replays exactly
    assert not pack(trajs, 0).action[1].any()


def test_per_trajectory_state_follows_the_task_object_not_its_value_or_id():
    a = arithmetic_task(random.Random(5))
    b = replace(a)                       # an equal copy: another trajectory of the same prompt
    state = PerTrajectory(limit=3)
    state.get(a, list).append("page 0")
    assert state.get(a) == ["page 0"] and state.get(b, list) == [] and len(state) == 2
    state.pop(b)
    assert state.get(b) is None and state.get(a) == ["page 0"]
    state.get(b, list), state.get(replace(a), list)
    assert len(state) == 3
    state.get(replace(a), list)          # full: the states of finished batches go
    assert len(state) == 1 and state.get(a) is None
