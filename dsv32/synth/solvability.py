"""Filtering by solvability (spec §5): a kept question, or a synthesized environment, is
attempted n times by the policy being trained, and stays only if pass@k > 0 (the paper: k = 100, with
DeepSeek-V3.2). pass@k is dsv32.eval's unbiased estimate from the n attempts (n >= k, by default
n = k); it is above zero exactly when some attempt is right.

An attempt is right when its final answer passes the task row's grader, "exact" as dsv32 eval
reads it (the last `\\boxed{}`, else the whole answer, stripped, equal to the ground truth).
The attempts run as `AgentLoop.run_many` over all the questions at once, attempt i with the
sampling seed + i * SEED_STRIDE (or unseeded), so a seeded filter is reproducible.

An environment (`environment_solvability`) is attempted with its own tools and `submit_result`
(dsv32.synth.env_attempt); an attempt is right when the environment's verifier gives its
submission the full score. Its attempts run one after another, seeded the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from dsv32.agent.loop import AgentConfig, AgentLoop
from dsv32.agent.policy import Policy
from dsv32.agent.tool import Tool
from dsv32.engine import SamplingParams
from dsv32.eval.grade import judge
from dsv32.eval.passk import pass_at_k
from dsv32.synth.env_attempt import attempt
from dsv32.synth.rl_env import EnvironmentRunner
from dsv32.synth.search_prompts import solve_prompt

SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Solvability:
    n: int                          # attempts
    correct: int                    # attempts whose answer passed the grader
    k: int
    pass_at_k: float
    answers: tuple[str | None, ...]  # each attempt's final answer (None: it did not answer)

    @property
    def kept(self) -> bool:
        return self.pass_at_k > 0

    def to_json(self) -> dict:
        return {"n": self.n, "correct": self.correct, "k": self.k, "pass_at_k": self.pass_at_k,
                "answers": list(self.answers)}


def is_right(answer: str | None, truth: str) -> bool:
    """Whether an attempt's final answer passes the "exact" grader against the ground truth."""
    return answer is not None and judge("exact", answer, truth)[0] == 1.0


def seeded(sampling: SamplingParams, i: int) -> SamplingParams:
    """The sampling of attempt i: seed + i * SEED_STRIDE (unseeded stays unseeded)."""
    return replace(sampling, seed=None if sampling.seed is None else sampling.seed + SEED_STRIDE * i)


def _check(k: int, n: int | None) -> int:
    n = k if n is None else n
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n attempts, got k={k}, n={n}")
    return n


def solvability(questions: list[tuple[str, str]], policy: Policy, tools: Callable[[], list[Tool]], k: int,
                n: int | None = None, sampling: SamplingParams | None = None, config: AgentConfig | None = None,
                workers: int = 1) -> list[Solvability]:
    """n attempts at each (question, ground truth), and pass@k from them, in the questions' order."""
    n = _check(k, n)
    sampling = sampling or SamplingParams(max_tokens=4096, temperature=1.0)
    tasks = [solve_prompt(q) for q, _ in questions]
    answers: list[list[str | None]] = [[] for _ in questions]
    for i in range(n):
        loop = AgentLoop(policy, tools, seeded(sampling, i), config)
        for got, ep in zip(answers, loop.run_many(tasks, workers), strict=True):
            got.append(ep.answer if ep.end == "answer" else None)
    out = []
    for (_, truth), got in zip(questions, answers, strict=True):
        c = sum(is_right(a, truth) for a in got)
        out.append(Solvability(n, c, k, pass_at_k(n, c, k), tuple(got)))
    return out


def environment_solvability(directories: list[str], policy: Policy, runner: EnvironmentRunner, k: int,
                            n: int | None = None, sampling: SamplingParams | None = None,
                            config: AgentConfig | None = None) -> list[Solvability]:
    """n attempts at each environment (saved in `directories`), and pass@k from them, in order;
    an attempt's answer is what it submitted."""
    n = _check(k, n)
    sampling = sampling or SamplingParams(max_tokens=4096, temperature=1.0)
    out = []
    for directory in directories:
        got = [attempt(runner, directory, policy, seeded(sampling, i), config) for i in range(n)]
        c = sum(a.passed for a in got)
        out.append(Solvability(n, c, k, pass_at_k(n, c, k), tuple(a.submitted for a in got)))
    return out
