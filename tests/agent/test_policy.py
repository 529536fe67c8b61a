"""The two policies with real models: our engine in-process (a tiny random V3.2, fp32, CPU, steered to
write tool calls; see steered.py), whose multi-turn tool trajectory through the loop replays to the
engine's log-probs on every turn; and an OpenAI-compatible endpoint (`dsv32 serve`'s app in a
thread, its engine scripted) for one tool round."""

import sys
from pathlib import Path

import pytest
import torch

from dsv32.agent.loop import AgentLoop
from dsv32.agent.policy import EnginePolicy, OpenAIPolicy
from dsv32.chat import EOS, THINK_END, encode_messages, render_tool_calls
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.loader import load
from dsv32.rl.rollout import pack, replay_logprobs
from dsv32.rl.tasks import CALCULATOR

from scripted_policy import Calculator, calc
from steered import layout, prompt_ids, steered, tiny_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # the server tests' helpers
from scripted import ScriptedRunner, Server  # noqa: E402

PARAMS = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=128, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_dir(tmp_path_factory.mktemp("tiny"), [CALCULATOR])
    model, tok = load(path, dtype="float32", device="cpu")
    return path, model, tok


class Recording(Engine):
    """The engine, keeping every request's output."""

    def output(self, seq):
        out = super().output(seq)
        self.outputs = getattr(self, "outputs", []) + [out]
        return out


def test_an_engine_rollout_through_the_loop_replays_the_engines_logprobs_on_every_turn(tiny):
    _, model, tok = tiny
    m, tools = steered(model, tok), [Calculator()]
    schemas = [t.schema() for t in tools]
    task = "What is 6*7+2+3? Use the calculator."
    script = layout(tok, prompt_ids(tok, [{"role": "user", "content": task}], schemas), [
        (4, THINK_END + render_tool_calls([calc("6*7"), calc("2+3")]) + EOS, ["42", "5"]),   # parallel calls
        (4, THINK_END + render_tool_calls([calc("42+5")]) + EOS, ["47"]),
        (4, THINK_END + "The answer is 47." + EOS, [])])
    m.steer(tok, script)
    eng = Recording(m, EngineConfig(num_blocks=64, prefill_chunk=256, max_num_seqs=4))
    agent = AgentLoop(EnginePolicy(eng, tok), tools, PARAMS)
    ep = agent.run(task)
    assert ep.end == "answer" and ep.answer == "The answer is 47." and len(ep.steps) == 3
    assert [m["content"] for m in ep.log if m["role"] == "tool"] == ["42", "5", "47"]
    (seg,) = ep.segments                                  # one token stream: every turn continued it
    turns = [i for i, msg in enumerate(ep.log) if msg["role"] == "assistant"]
    for k, ((start, end), out) in enumerate(zip(seg.turn_spans, eng.outputs)):
        # each request's prompt is the stream so far, and it reads as the V3.2 rendering of the
        # loop's view: the turn's reasoning kept across tool results
        assert out.prompt_token_ids == seg.tokens[:start] and out.token_ids == seg.tokens[start:end]
        assert tok.decode(out.prompt_token_ids) == encode_messages(ep.log[:turns[k]], "thinking", tools=schemas)
    # sampled vs forced: the actions are exactly the tokens the engine sampled; where the script
    # left the model free they are its own, elsewhere the script's
    sampled = {p for s, e in seg.turn_spans for p in range(s, e)}
    assert seg.action == [p in sampled for p in range(len(seg.tokens))] and sampled == set(script)
    assert all(seg.tokens[p] == t for p, t in script.items() if t is not None)
    free = sorted(p for p, t in script.items() if t is None)
    assert max(seg.logprobs[p] for p in free) < -1 and ep.log[1]["reasoning_content"]
    # the trainer's one forward over the packed trajectory gives the engine's log-probs, turn by turn
    batch = pack(ep.segments)
    with torch.no_grad():
        lp = replay_logprobs(m, batch, PARAMS.temperature)
        unmasked = replay_logprobs(m, batch, PARAMS.temperature, keep_sampling_mask=False)
    for s, e in seg.turn_spans:                           # target j is token j + 1
        assert batch.action[0, s - 1:e - 1].all()
        assert (lp[0, s - 1:e - 1] - batch.logp_old[0, s - 1:e - 1]).abs().max() < 1e-5
    assert (unmasked - lp)[0, [p - 1 for p in free]].max() < -0.05   # top-p mattered at the free tokens

    # a new user message: a new token stream, rendered without the earlier reasoning (its sampled
    # positions lie past the first stream's, so one steering serves both)
    follow = ep.log + [{"role": "user", "content": "And twice that?"}]
    m.steer(tok, {**script, **layout(tok, prompt_ids(tok, follow, schemas), [(3, THINK_END + "94." + EOS, [])])})
    ep2 = agent.run(follow)
    assert ep2.end == "answer" and ep2.answer == "94." and len(ep2.segments) == 1 and ep2.segments[0] is not seg
    seen = tok.decode(eng.outputs[-1].prompt_token_ids)
    assert seen == encode_messages(follow, "thinking", tools=schemas)
    assert ep.log[1]["reasoning_content"] not in seen and "<result>47</result>" in seen
    # both streams in one batch, as the trainer would take them
    batch = pack(ep.segments + ep2.segments)
    with torch.no_grad():
        lp = replay_logprobs(m, batch, PARAMS.temperature)
    assert batch.action.sum() == seg.n_sampled + ep2.segments[0].n_sampled
    assert (lp - batch.logp_old)[batch.action].abs().max() < 1e-5


def test_the_engine_policy_needs_the_v32_chat_format(tiny):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="V3.2 chat format"):
        EnginePolicy(Engine(model, EngineConfig(num_blocks=8)), PlainTokenizer(tok.tok, tok.bos_id, tok.eos_id))


def test_the_openai_policy_runs_one_tool_round_against_dsv32_serve(tiny):
    path, _, _ = tiny
    model, tok = load(path, dtype="float32", device="cpu")
    eng = Engine(model, EngineConfig(num_blocks=64, max_num_seqs=4), runner_class=ScriptedRunner)
    prompts, add_request = [], eng.add_request
    eng.add_request = lambda prompt, *args, **kw: (prompts.append(list(prompt)), add_request(prompt, *args, **kw))[1]
    server = Server(eng, tok)

    class Scripting(Calculator):  # the tool's run is where the engine's next reply is chosen
        def run(self, expression: str) -> str:
            eng.runner.script = tok.encode("The calculator says 42.</think>The answer is 42." + EOS)
            return super().run(expression)

    try:
        eng.runner.script = tok.encode("I compute.</think>" + render_tool_calls([calc("6*7")]) + EOS)
        policy = OpenAIPolicy(server.url + "/v1")
        assert policy.model == "tiny-test" and policy.context_window == eng.max_model_len
        tools = [Scripting()]
        ep = AgentLoop(policy, tools, SamplingParams(max_tokens=200)).run("What is 6*7?")
    finally:
        server.stop()
    assert ep.end == "answer" and ep.answer == "The answer is 42." and ep.error is None
    first, result = ep.log[1], ep.log[2]
    assert first["reasoning_content"] == "I compute." and first["tool_calls"][0]["id"].startswith("call_")
    assert first["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "6*7"}'}
    assert result == {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "42"}
    assert ep.log[3]["reasoning_content"] == "The calculator says 42."
    # the server rendered the second prompt from the messages sent: thinking on, the first turn's
    # reasoning kept across the tool result
    schemas = [t.schema() for t in tools]
    assert tok.decode(prompts[1]) == encode_messages(ep.log[:3], "thinking", tools=schemas)
    assert ep.steps[0].prompt_tokens == len(prompts[0]) and ep.steps[1].prompt_tokens == len(prompts[1])


def test_the_openai_policy_estimates_a_prompt_it_cannot_render():
    """Without a tokenizer a prompt is a quarter of its V3.2 rendering's characters; an endpoint's
    tool call whose arguments are not JSON does not render, and is counted by its characters."""
    policy = OpenAIPolicy("http://unused/v1", model="m", context_window=1000, client=object())
    messages = [{"role": "user", "content": "x" * 400}]
    assert policy.count(messages, []) == -(-len(encode_messages(messages, "thinking")) // 4)
    bad = {"role": "assistant", "content": "", "reasoning_content": "",
           "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}
    assert policy.count(messages + [bad, {"role": "tool", "tool_call_id": "1", "content": "r"}], []) > 100
