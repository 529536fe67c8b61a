"""Graders: is a sampled reply's answer right? Each verdict is computed in a worker process.

The answer is read only from the text after `</think>` in thinking mode: the reasoning may try
and discard answers, and only the reply stands. A sample whose thinking never closed (the token
budget ran out first) is *truncated*: counted and reported, never graded, and never correct.

Graders by name: `math` (math-verify on the last `\\boxed{}` of the answer against the gold
answer: 1/2, 0.5 and \\frac{1}{2} agree, so do reordered sets and equal intervals), `exact`
(the boxed answer, or the whole answer without a box, equals the gold string after stripping),
`numeric` (the same text read as a number, within a relative 1e-6), and `rg:DATASET`
(reasoning-gym's own scorer for that dataset, given the task's entry; score 1.0 is correct).

Symbolic checks can run for minutes on adversarial input, and math-verify's own timeouts rely
on SIGALRM (main thread only). So grading runs in one spawned worker process: a verdict that
takes longer than the timeout kills the worker, is reported as a grading timeout, and the next
grade starts a fresh one.
"""

import math
import multiprocessing
from dataclasses import dataclass

from math_verify import parse, verify

try:
    from reasoning_gym import get_score_answer_fn
except ImportError:  # the eval extra: without it, rg: answers grade as errors that name it
    get_score_answer_fn = None

from dsv32.chat import extract_boxed
from dsv32.eval.reply import split_reply

STATUSES = ("correct", "wrong", "truncated", "timeout", "error")


class GradingTimeout(Exception):
    """A grader ran past its time limit; its worker was killed."""


@dataclass(frozen=True)
class Grade:
    status: str                 # one of STATUSES
    score: float = 0.0          # 1.0 correct; a scorer's partial credit otherwise (reasoning-gym)
    extracted: str | None = None  # what was compared with the gold answer
    detail: str = ""
    tests: tuple[str, ...] = ()  # a code grade's verdict per test (eval/code.py)

    @property
    def correct(self) -> bool:
        return self.status == "correct"


def final_answer(answer: str) -> str:
    """The last `\\boxed{}` of the answer, or the whole answer stripped when it has none."""
    box = extract_boxed(answer)
    return (box if box is not None else answer).strip()


def judge(grader: str, answer: str, gold: str, entry: dict | None = None) -> tuple[float, str | None]:
    """(score, what was compared) for one answer text; runs inside the worker process."""
    if grader == "math":
        box = extract_boxed(answer)
        if box is None:
            return 0.0, None
        target = gold if "$" in gold or "\\boxed" in gold else f"${gold}$"
        ok = verify(parse(target, parsing_timeout=None), parse(f"\\boxed{{{box}}}", parsing_timeout=None),
                    timeout_seconds=None)
        return float(ok), box
    got = final_answer(answer)
    if grader == "exact":
        return float(got == gold.strip()), got
    if grader == "numeric":
        try:
            return float(math.isclose(float(got), float(gold), rel_tol=1e-6, abs_tol=1e-12)), got
        except ValueError:
            return 0.0, got
    if grader.startswith("rg:"):
        if get_score_answer_fn is None:
            raise ValueError(f"grader {grader!r} needs reasoning-gym (pip install 'dsv32[eval]'), which is not "
                             "installed: sample elsewhere and grade here with the stored texts")
        return float(get_score_answer_fn(grader[3:])(got, entry)), got
    raise ValueError(f"unknown grader {grader!r}: expected math, exact, numeric or rg:DATASET")


def _serve(conn) -> None:
    """The worker's loop: (fn, args) in, ("ok", result) or ("error", message) out; None ends it.
    It first warms sympy up with one verdict (the first costs a second or more), then says ready,
    so that the time limit measures the grading alone."""
    judge("math", "\\boxed{1/2}", "0.5")
    conn.send(("ready", None))
    while (job := conn.recv()) is not None:
        fn, args = job
        try:
            conn.send(("ok", fn(*args)))
        except Exception as e:  # a grader's failure is a verdict to report, not a crash
            conn.send(("error", f"{type(e).__name__}: {e}"))


class GradingWorker:
    """One spawned process that runs functions with a hard time limit (killed past it)."""

    def __init__(self, timeout: float = 30.0, startup_timeout: float = 300.0):
        self.timeout, self.startup_timeout = timeout, startup_timeout
        self.ctx = multiprocessing.get_context("spawn")
        self.proc = self.conn = None

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(self.startup_timeout):
            self._kill()
            raise RuntimeError(f"the grading worker did not start within {self.startup_timeout}s")
        self.conn.recv()

    def call(self, fn, *args):
        """fn(*args) in the worker (fn importable by name). Raises GradingTimeout past the limit and
        RuntimeError with the worker's message when fn raised."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((fn, args))
        if not self.conn.poll(self.timeout):
            self._kill()
            raise GradingTimeout(f"{getattr(fn, '__name__', fn)} ran past {self.timeout}s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(value)
        return value

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.proc = self.conn = None

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.conn.send(None)
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self._kill()
            self.proc = self.conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def grade(worker: GradingWorker, text: str, grader: str, gold: str, entry: dict | None = None,
          thinking: bool = True) -> Grade:
    """The verdict on one completion text (what the model wrote after the prompt)."""
    _, answer = split_reply(text, thinking)
    if answer is None:
        return Grade("truncated", detail="the thinking never closed")
    try:
        score, extracted = worker.call(judge, grader, answer, gold, entry)
    except GradingTimeout as e:
        return Grade("timeout", detail=str(e))
    except RuntimeError as e:
        return Grade("error", detail=str(e))
    if extracted is None:
        return Grade("wrong", detail="no \\boxed{} in the answer")
    return Grade("correct" if score >= 1.0 else "wrong", score, extracted)
