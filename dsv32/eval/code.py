"""Code grading: run a reply's program against a task's tests inside the agent's sandbox.

The program is the last fenced code block of the answer (the text after `</think>`; a reply whose
thinking never closed is truncated and never run). Tests come in two kinds:

- **asserts**: a string of Python run after the program in one file; the test passes when the
  file exits with status 0 (one test);
- **stdin/stdout cases**: a list of `{"input": ..., "output": ...}`, as competitive programming
  judges them: the program reads `input` on stdin and passes when what it prints equals `output`
  token for token (whitespace and line breaks are not compared: the usual checker for exact
  answers).

Each test runs in a fresh work directory of one `dsv32.agent.sandbox.Sandbox` (no network,
read-only system, private files, rlimits) with a wall-clock time limit (CPU seconds one above
it), an address-space limit and a cap on the bytes it may write. An infinite loop is a
`time_limit` verdict, a failed allocation or a crash a `runtime_error`, an attempt at the network
fails inside (there is none) and the program's answer is judged as it stands.

Without bubblewrap the sandbox refuses (SandboxError names the cause) unless the caller passes
`unsafe_no_sandbox=True` (`dsv32 eval --unsafe-no-sandbox`): then programs run as the caller,
with the same limits but no isolation.
"""

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dsv32.agent.sandbox import Limits, Sandbox
from dsv32.eval.grade import Grade
from dsv32.eval.reply import split_reply

VERDICTS = ("passed", "wrong_answer", "time_limit", "runtime_error", "output_limit")

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
# stdin from input.txt, stdout and stderr to files (their size is bounded by RLIMIT_FSIZE)
_RUN = 'exec python "$1" < input.txt > output.txt 2> error.txt'


class CaseFormatError(ValueError):
    """A task's tests are neither a string of asserts nor a list of {"input", "output"} cases."""


@dataclass(frozen=True)
class TestResult:
    verdict: str          # one of VERDICTS
    seconds: float
    detail: str = ""      # the end of stderr, or what was printed against what was expected

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"


def extract_program(answer: str) -> str | None:
    """The last fenced code block of the answer (any language tag), or None when it has none."""
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else None


def check_tests(tests) -> list:
    """The tests as a list of cases: [asserts] for a string, the list itself for stdin/stdout
    cases. Raises CaseFormatError naming the bad case."""
    if isinstance(tests, str):
        return [tests]
    if not isinstance(tests, list) or not tests:
        raise CaseFormatError(f"tests must be a string of asserts or a non-empty list of cases, got {tests!r:.80}")
    for i, case in enumerate(tests):
        if not (isinstance(case, dict) and isinstance(case.get("input"), str)
                and isinstance(case.get("output"), str)):
            raise CaseFormatError(f"test {i}: expected {{\"input\": str, \"output\": str}}, got {case!r:.80}")
    return tests


def same_output(got: str, expected: str) -> bool:
    """Equal as sequences of whitespace-separated tokens."""
    return got.split() == expected.split()


class CodeJudge:
    """Runs programs against tests in one sandbox under `root` (removed by `close`)."""

    def __init__(self, root: str | Path | None = None, *, time_limit: float = 2.0, memory_mb: int = 512,
                 output_mb: int = 64, unsafe_no_sandbox: bool = False):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="dsv32-judge-") if root is None else root)
        self.time_limit, self.memory_mb, self.output_mb = time_limit, memory_mb, output_mb
        self.box = Sandbox(self.root, "judge", unsafe_no_sandbox=unsafe_no_sandbox)

    @property
    def isolated(self) -> bool:
        return self.box.isolated

    def _fresh(self) -> Path:
        for p in self.box.work.iterdir():  # nothing one test wrote may reach the next
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, onerror=_unlock)
            else:
                p.unlink()
        return self.box.work

    def run_case(self, program: str, stdin: str = "", expected: str | None = None,
                 time_limit: float | None = None, memory_mb: int | None = None) -> TestResult:
        """Run `program` once with `stdin`; judge its stdout against `expected`, or, when that is
        None, only its exit status."""
        time_limit = time_limit or self.time_limit
        limits = Limits(cpu_seconds=math.ceil(time_limit) + 1, memory_bytes=(memory_mb or self.memory_mb) << 20,
                        processes=64, file_size_bytes=self.output_mb << 20, threads=1)
        work = self._fresh()
        (work / "solution.py").write_text(program, encoding="utf-8")
        (work / "input.txt").write_text(stdin, encoding="utf-8")
        r = self.box.run(["sh", "-c", _RUN, "sh", "solution.py"], timeout=time_limit, max_output=4096, limits=limits)
        err = _tail(work / "error.txt") or r.output
        if r.timed_out:
            return TestResult("time_limit", r.seconds, f"killed after {time_limit}s")
        out_path = work / "output.txt"
        if out_path.exists() and out_path.stat().st_size >= self.output_mb << 20:
            return TestResult("output_limit", r.seconds, f"wrote {self.output_mb} MiB or more")
        if r.exit_code != 0:
            return TestResult("runtime_error", r.seconds, f"exit status {r.exit_code}: {err}")
        if expected is None:
            return TestResult("passed", r.seconds)
        got = out_path.read_text(encoding="utf-8", errors="replace") if out_path.exists() else ""
        if same_output(got, expected):
            return TestResult("passed", r.seconds)
        return TestResult("wrong_answer", r.seconds, f"printed {got[:200]!r}, expected {expected[:200]!r}")

    def run_tests(self, program: str, tests, time_limit: float | None = None, memory_mb: int | None = None,
                  stop_at_failure: bool = False) -> list[TestResult]:
        """One result per test (asserts: one result). With stop_at_failure, the tests after the
        first failure are not run (an all-or-nothing subtask needs no more)."""
        results = []
        for case in check_tests(tests):
            if isinstance(case, str):
                r = self.run_case(program + "\n\n" + case + "\n", time_limit=time_limit, memory_mb=memory_mb)
            else:
                r = self.run_case(program, case["input"], case["output"], time_limit, memory_mb)
            results.append(r)
            if stop_at_failure and not r.passed:
                break
        return results

    def close(self) -> None:
        self.box.remove()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _unlock(func, path: str, exc_info) -> None:
    """rmtree's retry for a directory the program made unreadable or unwritable (mode 000)."""
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
    func(path)


def _tail(path: Path, chars: int = 500) -> str:
    if not path.exists():
        return ""
    return path.read_text(encoding="utf-8", errors="replace")[-chars:].strip()


def grade_code(judge: CodeJudge, text: str, tests, thinking: bool = True, time_limit: float | None = None,
               memory_mb: int | None = None) -> Grade:
    """The verdict on one completion: correct when its program passes every test; the score is
    the fraction of tests passed and `results` holds each test's verdict."""
    _, answer = split_reply(text, thinking)
    if answer is None:
        return Grade("truncated", detail="the thinking never closed")
    program = extract_program(answer)
    if program is None:
        return Grade("wrong", detail="no fenced code block in the answer")
    results = judge.run_tests(program, tests, time_limit, memory_mb)
    passed = sum(r.passed for r in results)
    failed = next((f"test {i}: {r.verdict} {r.detail}".strip() for i, r in enumerate(results) if not r.passed), "")
    return Grade("correct" if passed == len(results) else "wrong", passed / len(results), program,
                 f"{passed}/{len(results)} tests passed" + (f"; first failure {failed}" if failed else ""),
                 tuple(r.verdict for r in results))
