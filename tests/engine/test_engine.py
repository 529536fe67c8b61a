"""The paged engine against the plain model (the independent truth: full forwards, no cache)."""

import pytest
import torch

from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.engine.batch import Batch
from dsv32.engine.cache import PagedCache
from dsv32.model import Transformer

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(preset("tiny").replace(index_topk=8)).eval()


@torch.no_grad()
def reference(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def run(engine, prompts, params=GREEDY):
    seqs = [engine.add_request(p, params) for p in prompts]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 10_000
    return [engine.output(s) for s in seqs]


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=g).tolist() for n in lengths]


def no_leak(engine):
    bm = engine.scheduler.blocks
    return bm.num_free == len(bm.ref) and all(r == 0 for r in bm.ref)


def test_single_and_batched_greedy_equal_the_model(tiny):
    ps = prompts([5, 23, 70, 131])  # DSA active: index_topk=8 < every prompt but the first
    want = [reference(tiny, p, 10) for p in ps]
    eng = Engine(tiny, EngineConfig(num_blocks=64, prefill_chunk=32, mha_prefill_below=40))
    assert run(eng, ps[:1])[0].token_ids == want[0]
    outs = run(eng, ps)
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)
    assert no_leak(eng)


def test_prefix_cache_hits_give_the_same_tokens(tiny):
    shared = prompts([150])[0]
    ps = [shared + [7, 8, 9], shared + [10], shared[:130]]
    want = [reference(tiny, p, 10) for p in ps]
    eng = Engine(tiny, EngineConfig(num_blocks=64))
    first = run(eng, ps[:1])[0]
    assert first.num_cached_tokens == 0
    outs = run(eng, ps)
    assert [o.token_ids for o in outs] == want
    assert [o.num_cached_tokens for o in outs] == [128, 128, 128]
    assert no_leak(eng)


def test_preemption_under_a_tiny_cache(tiny):
    ps = prompts([60, 60, 60, 60], seed=1)
    want = [reference(tiny, p, 10) for p in ps]
    # 4 sequences of 70 tokens need 8 blocks; 5 blocks force preemption and recompute
    eng = Engine(tiny, EngineConfig(num_blocks=5, block_size=32, prefix_caching=False))
    outs = run(eng, ps)
    assert [o.token_ids for o in outs] == want
    assert eng.scheduler.num_preemptions > 0
    assert no_leak(eng)


def test_request_larger_than_the_cache_fails_cleanly(tiny):
    eng = Engine(tiny, EngineConfig(num_blocks=2, block_size=16))
    out = run(eng, prompts([100]))[0]
    assert out.finish_reason == "error" and "cache blocks" in out.error
    ok = run(eng, prompts([10]))[0]  # and the engine keeps serving
    assert ok.token_ids == reference(tiny, prompts([10])[0], 10)


@torch.no_grad()
def test_fp8_cache_stays_close_to_bf16(tiny):
    """Teacher-forced prefill + 19 decode steps through the paged cache: with the FP8 layout the
    next-token distributions stay within KL 0.01 nats of the unquantised cache (which itself
    equals the cache-free forward)."""
    seq = prompts([80], seed=2)[0]
    x = torch.tensor([seq])

    def run(fp8):
        c = PagedCache(tiny.cfg, 4, 32, fp8, torch.float32)
        pos = torch.arange(60)[None]
        step = c.bind(Batch.build(x[:, :60], pos, [[0, 1, 2]], 32))
        out = [tiny(x[:, :60], cache=step, positions=pos).logits[0, -1]]
        for t in range(60, 79):
            p = torch.tensor([[t]])
            step = c.bind(Batch.build(x[:, t:t + 1], p, [[0, 1, 2]], 32))
            out.append(tiny(x[:, t:t + 1], cache=step, positions=p, mode="mqa").logits[0, -1])
        return torch.stack(out).log_softmax(-1)

    exact, fp8 = run(False), run(True)
    assert torch.allclose(exact, tiny(x[:, :79]).logits[0, 59:].log_softmax(-1), atol=1e-5)
    kl = (exact.exp() * (exact - fp8)).sum(-1)
    assert 0 < kl.max() < 0.01
    # and the engine serves with it
    eng = Engine(tiny, EngineConfig(num_blocks=32, kv_cache_dtype="fp8"))
    cache = eng.runner.cache
    assert cache.kv.shape[-1] == 32 + 4 * 1 + 2 * 8 and cache.ik.shape[-1] == 64 * (16 + 4)
    assert len(run_engine_once(eng, seq)) == 6


def run_engine_once(eng, prompt):
    return run(eng, [prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0].token_ids


def test_fp8_cache_byte_layout_of_the_real_model():
    c = PagedCache(preset("deepseek-v3.2").replace(num_hidden_layers=3), num_blocks=1, fp8=True, device="meta")
    assert c.kv.shape[-1] == 656 and c.ik.shape[-1] == 64 * 132  # per token and per 64-token page
    assert c.bytes_per_token() == 656 + 132                          # as DeepSeek serves


def test_step_outputs_add_up_to_each_requests_output(tiny):
    """What step() returns for a request, concatenated in order, is its whole output: token ids,
    log-probs and top log-probs, with the finish reason (and error) on its last StepOutput only;
    through preemption in a small cache, seeded sampling, and a request the cache refuses. The
    greedy tokens are the plain model's."""
    ps = prompts([30, 30, 29, 8, 200], seed=5)  # three of 2 blocks each, growing into a third: preemption
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
              SamplingParams(max_tokens=4)]
    eng = Engine(tiny, EngineConfig(num_blocks=6, block_size=16, prefill_chunk=16, prefix_caching=False))
    seqs = [eng.add_request(p, sp) for p, sp in zip(ps, params)]
    got = {s.request_id: [] for s in seqs}
    while eng.has_work():
        for out in eng.step():
            assert not got[out.request_id] or got[out.request_id][-1].finish_reason is None  # nothing after the last
            got[out.request_id].append(out)
    assert eng.scheduler.num_preemptions > 0
    for s, sp in zip(seqs, params):
        whole, deltas = eng.output(s), got[s.request_id]
        assert [t for d in deltas for t in d.token_ids] == whole.token_ids
        assert [lp for d in deltas for lp in d.logprobs] == whole.logprobs
        assert [top for d in deltas for top in d.top_logprobs] == whole.top_logprobs
        assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + [whole.finish_reason]
        assert deltas[-1].error == whole.error and deltas[-1].num_cached_tokens == whole.num_cached_tokens
        if sp.temperature == 0:
            assert whole.token_ids == reference(tiny, s.tokens[:s.prompt_len], sp.max_tokens)
    assert [eng.output(s).finish_reason for s in seqs] == ["length"] * 4 + ["error"]
    assert len(eng.output(seqs[0]).top_logprobs[0]) == 2
    assert no_leak(eng)


def test_abort_frees_blocks(tiny):
    eng = Engine(tiny, EngineConfig(num_blocks=16))
    s = eng.add_request(prompts([100])[0], SamplingParams(max_tokens=50))
    eng.step()
    assert eng.scheduler.blocks.num_free < 16
    eng.abort(s.request_id)
    assert no_leak(eng) and not eng.has_work()


def test_stop_tokens_and_bad_requests(tiny):
    eng = Engine(tiny, EngineConfig(num_blocks=16))
    p = prompts([12])[0]
    first = reference(tiny, p, 3)
    out = run(eng, [p], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[first[2]]))[0]
    assert out.token_ids == first and out.finish_reason == "stop"
    # stop strings are text: the engine, which speaks token ids, leaves them to the edge (LLM, server)
    out = run(eng, [p], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, stop=["a", " ", "e"]))[0]
    assert out.token_ids == reference(tiny, p, 5) and out.finish_reason == "length" and out.text is None
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([600])
    with pytest.raises(ValueError, match="context"):
        eng.add_request([3] * 1024)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_rollout_replay_reproduces_engine_logprobs(tiny):
    """Keep Routing + Keep Sampling Mask: the trainer-side forward with the recorded expert ids and
    kept sets gives back the engine's sampling log-probs; without them it does not."""
    params = SamplingParams(temperature=0.9, top_p=0.8, top_k=50, max_tokens=12, seed=3,
                            ignore_eos=True, return_rl_data=True)
    eng = Engine(tiny, EngineConfig(num_blocks=32, prefill_chunk=16))
    outs = run(eng, prompts([30, 30, 45], seed=4), params)  # equal lengths prefill as one batch
    for o in outs:
        seq = o.prompt_token_ids + o.token_ids
        n_prompt = len(o.prompt_token_ids)
        assert o.experts.shape == (len(seq) - 1, 2, 2)  # every computed position, 2 MoE layers, k=2
        forced = [o.experts[:, layer].long() for layer in range(2)]
        forced = [torch.cat([f, f[-1:]]) for f in forced]  # last token is never fed: any route
        with torch.no_grad():
            logits = tiny(torch.tensor([seq]), forced_experts=forced).logits[0, n_prompt - 1:-1]
        x = logits / params.temperature
        mask = torch.full_like(x, float("-inf"))
        for t, kept in enumerate(o.kept):
            mask[t, kept.long()] = 0
        replay = (x + mask).log_softmax(-1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert torch.allclose(replay, torch.tensor(o.logprobs), atol=1e-4)
        unmasked = x.log_softmax(-1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert (unmasked - torch.tensor(o.logprobs)).abs().max() > 1e-3


def test_engine_serves_a_converted_llama_model():
    """A Llama-family model with added indexers (dsv32 convert) runs through the same paged
    engine: its keys and values take the cache's two first slots."""
    from dsv32.llama.model import LlamaConfig, LlamaDSA

    torch.manual_seed(0)
    model = LlamaDSA(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=512, index_n_heads=2, index_head_dim=32,
                                 index_topk=8)).eval()
    ps = [p[:n] for p, n in zip(prompts([40, 90]), (40, 90))]
    ps = [[t % 300 for t in p] for p in ps]
    want = [reference(model, p, 6) for p in ps]
    eng = Engine(model, EngineConfig(num_blocks=16, prefill_chunk=32))
    assert [o.token_ids for o in run(eng, ps, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))] == want
    assert no_leak(eng)
    with pytest.raises(ValueError, match="FP8 cache layouts"):
        Engine(model, EngineConfig(num_blocks=16, kv_cache_dtype="fp8"))


def test_buckets_cover_every_batch_size():
    from dsv32.engine.graphs import buckets

    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64] and buckets(70) == [1, 2, 4, 8, 16, 32, 48, 64, 70]


def test_graph_shaped_decode_equals_the_model(tiny):
    """cuda_graphs=True: decode steps read a bucket's static Batch (its rows padded with rows on the
    scratch block; the mask over all max_model_len positions). Off CUDA they run eagerly, so this
    checks the layout: greedy tokens equal the plain model for batches that pad (3 -> 4) and that
    do not, with sequences finishing at different steps, and the scratch block never belongs to a
    sequence."""
    ps = prompts([5, 23, 70, 131, 40], seed=3)
    lengths = [10, 4, 7, 10, 1]
    want = [reference(tiny, p, n) for p, n in zip(ps, lengths)]
    eng = Engine(tiny, EngineConfig(num_blocks=8, block_size=32, prefill_chunk=32, max_model_len=256,
                                    max_num_seqs=5, cuda_graphs=True))
    graphs = eng.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 5]
    seen = []
    load = graphs.load
    graphs.load = lambda *a: seen.append(len(a[0])) or load(*a)
    seqs = [eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
            for p, n in zip(ps, lengths)]
    while eng.has_work():
        eng.step()
        assert all(graphs.scratch not in s.block_table for s in seqs)
    assert [eng.output(s).token_ids for s in seqs] == want
    assert {1, 2, 3} <= set(seen)
    assert no_leak(eng)
