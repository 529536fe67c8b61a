"""Episodes side by side: `AgentLoop.run_many` (and parallel-fewest-step's attempts) in worker
threads, their model calls batched by one `SharedEngine`. The oracle is the same seeded episodes
run one at a time through a plain engine: side by side they sample the same tokens, keep the same
attempt, and one episode's failing tool leaves the others as they were."""

import threading
import time

import pytest
import torch

from dsv32.agent.loop import AgentConfig, AgentLoop
from dsv32.agent.policy import EnginePolicy, Reply
from dsv32.chat import EOS, THINK_END, render_tool_calls
from dsv32.engine import Engine, EngineConfig, SamplingParams, SharedEngine
from dsv32.loader import load
from dsv32.rl.rollout import pack, replay_logprobs
from dsv32.rl.tasks import CALCULATOR

from scripted_policy import Calculator, Echo, ScriptedPolicy, calc, call, rendered, turn
from steered import layout, prompt_ids, steered, tiny_dir

PARAMS = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=96, seed=0)
CONFIG = EngineConfig(num_blocks=64, prefill_chunk=512, max_num_seqs=8)
TASKS = [f"What is {a}*{b}+2+3? Use the calculator." for a, b in [(6, 7), (8, 9), (3, 4)]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These forwards are tiny: one intra-op thread runs them fastest, and on a busy two-core
    machine a second, spinning OpenMP thread slows batch-1 decoding tenfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny V3.2 steered to call the calculator once and answer; the tasks' prompts have one
    length, so one position-keyed script serves them all (their free tokens differ)."""
    model, tok = load(tiny_dir(tmp_path_factory.mktemp("tiny"), [CALCULATOR]), dtype="float32", device="cpu")
    schemas = [Calculator().schema()]
    prompts = [prompt_ids(tok, [{"role": "user", "content": t}], schemas) for t in TASKS]
    assert len({len(p) for p in prompts}) == 1
    m = steered(model, tok)
    m.steer(tok, layout(tok, prompts[0], [
        (5, THINK_END + render_tool_calls([calc("6*7"), calc("2+3")]) + EOS, ["42", "5"]),
        (5, THINK_END + "The answer is 47." + EOS, [])]))
    return m, tok


def same_run(a, b) -> None:
    """Two episodes sampled the same: log, steps, and token record (log-probs to float32 rounding:
    a batched matmul sums in another order)."""
    assert a.log == b.log and a.steps == b.steps and a.end == b.end
    for x, y in zip(a.segments, b.segments, strict=True):
        assert x.tokens == y.tokens and x.action == y.action and x.turn_spans == y.turn_spans
        assert [k if k is None else k.tolist() for k in x.kept] == [k if k is None else k.tolist() for k in y.kept]
        assert torch.equal(x.experts, y.experts)
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-5


def test_episodes_side_by_side_are_batched_and_sample_what_they_sample_one_at_a_time(model):
    m, tok = model
    config = AgentConfig(context_strategy="parallel-fewest-step", attempts=2)
    alone = AgentLoop(EnginePolicy(Engine(m, CONFIG), tok), [Calculator()], PARAMS, config).run_many(TASKS[:2])
    events = []
    with SharedEngine(Engine(m, CONFIG)) as shared:
        agent = AgentLoop(EnginePolicy(shared, tok), [Calculator()], PARAMS, config,
                          on_event=lambda kind, data: events.append((kind, data, threading.current_thread())))
        together = agent.run_many(TASKS[:2], workers=4)
    assert shared.max_batch > 1                                          # the engine ran them as one batch
    for a, b in zip(alone, together, strict=True):
        assert b.end == "answer" and b.answer == "The answer is 47." and len(b.attempts) == 2
        assert a.attempts.index(a) == b.attempts.index(b)                # the same attempt kept
        for x, y in zip(a.attempts, b.attempts, strict=True):
            same_run(x, y)
        assert a.attempts[0].log[1] != a.attempts[1].log[1]              # attempts have their own seeds
    # events come from the worker threads, each tagged with its episode
    assert {t for _, _, t in events} != {threading.main_thread()}
    ends = {(d["task"], d["attempt"]): d["episode"] for kind, d, _ in events if kind == "end"}
    assert ends == {(t, k): together[t].attempts[k] for t in range(2) for k in range(2)}
    # the token record of episodes run side by side replays to the engine's log-probs
    batch = pack([s for ep in together for a in ep.attempts for s in a.segments])
    with torch.no_grad():
        lp = replay_logprobs(m, batch, PARAMS.temperature)
    assert batch.action.sum() > 0 and (lp - batch.logp_old)[batch.action].abs().max() < 1e-5


def test_a_failing_tool_in_one_episode_leaves_the_episodes_beside_it_as_they_are_alone(model):
    m, tok = model
    config = AgentConfig(max_steps=3)
    alone = AgentLoop(EnginePolicy(Engine(m, CONFIG), tok), lambda: [Calculator()], PARAMS, config).run_many(TASKS)
    made, lock = [], threading.Lock()

    class Broken(Calculator):
        def run(self, expression: str) -> str:
            raise RuntimeError("the calculator caught fire")

        def close(self) -> None:
            raise OSError("and cannot be put out")

    def tools():
        with lock:  # whichever episode asks first gets the broken one
            made.append(Broken() if not made else Calculator())
            return [made[-1]]

    with SharedEngine(Engine(m, CONFIG)) as shared:
        together = AgentLoop(EnginePolicy(shared, tok), tools, PARAMS, config).run_many(TASKS, workers=3)
    failed = [ep for ep in together if ep.log[2]["content"].startswith("error:")]
    assert len(failed) == 1 and len(made) == 3
    assert failed[0].log[2]["content"] == "error: calculator failed: RuntimeError: the calculator caught fire"
    assert failed[0].end is not None and failed[0].steps
    for a, b in zip(alone, together):
        if b is not failed[0]:
            assert b.answer == "The answer is 47."
            same_run(a, b)


class Attempts:
    """A policy whose episodes depend on their seed alone, safe in many threads: attempt i (seed
    100_003 * i + call) makes ROUNDS[i] tool rounds and answers, or writes a reply that does not
    parse (None). Each call waits a little, so attempts running at once overlap, and the most
    calls in flight at once are counted."""
    ROUNDS = [3, None, 1, 2]
    context_window = 1_000_000

    def __init__(self):
        self.lock, self.in_flight, self.most = threading.Lock(), 0, 0

    def fork(self):
        return self

    def count(self, messages, tools) -> int:
        return len(rendered(messages, tools))

    def __call__(self, messages, tools, sampling) -> Reply:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.02)
        with self.lock:
            self.in_flight -= 1
        attempt, k = divmod(sampling.seed, 100_003)
        rounds = self.ROUNDS[attempt]
        if rounds is None:
            return Reply(None, "garbage", "stop", 1, 1, error="the reply does not parse")
        message = (turn(f"attempt {attempt}", calls=[call("echo", text=str(k))]) if k < rounds
                   else turn(f"attempt {attempt}", f"answer {attempt}"))
        return Reply(message, "", "stop", self.count(messages, tools), 1)


def test_parallel_fewest_step_runs_its_attempts_at_once_and_keeps_the_attempt_kept_one_at_a_time():
    config = AgentConfig(context_strategy="parallel-fewest-step", attempts=4)
    one_at_a_time = AgentLoop(Attempts(), [Echo()], SamplingParams(seed=0), config).run("Go.")
    policy = Attempts()
    at_once = AgentLoop(policy, [Echo()], SamplingParams(seed=0), config).run("Go.", workers=4)
    assert policy.most > 1 and at_once.answer == one_at_a_time.answer == "answer 2"
    assert at_once.attempts.index(at_once) == one_at_a_time.attempts.index(one_at_a_time) == 2
    assert [len(a.steps) for a in at_once.attempts] == [4, 1, 2, 3]
    assert [a.log for a in at_once.attempts] == [a.log for a in one_at_a_time.attempts]
    both = AgentLoop(Attempts(), [Echo()], SamplingParams(seed=0), config).run_many(["Go.", "Again."], workers=3)
    assert [ep.answer for ep in both] == ["answer 2", "answer 2"] and both[1].log[0]["content"] == "Again."


def test_side_by_side_needs_a_policy_that_forks():
    agent = AgentLoop(ScriptedPolicy([]), [Echo()])
    with pytest.raises(ValueError, match="needs a policy with fork"):
        agent.run_many(["Go.", "Go."], workers=2)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        agent.run_many(["Go."], workers=0)
