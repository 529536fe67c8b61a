"""The code task's reward: apply a candidate patch to the snapshot, run the tests, and pay 1 when
every F2P test passes and no P2P test breaks, else 0 (spec §5, "Code agent": the acceptance rule
F2P > 0, P2F = 0 seen from the solver's side).

The candidate may change source only. A patch that touches a test file (one of the task's test
paths, or any path the test-path rule of dsv32.synth.git_history matches, conftest.py included)
is rejected before anything runs: deleting the failing test or rewriting it to `assert True`
would otherwise "pass". The task's own test patch is applied after the candidate, so the tests
that run are the task's, byte for byte. A test absent from the report (deselected, uncollectable)
counts as not passing.

What this cannot stop: the candidate's source runs inside the test process, so code written to
subvert pytest itself (rewrite its report, monkeypatch its outcomes) is not detected here; the
sandbox keeps such code from harming anything outside the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dsv32.synth.code_env import RunOptions, run_tests, sandbox_root
from dsv32.synth.code_task import CodeTask
from dsv32.synth.code_venv import VenvOptions, ensure_venv
from dsv32.synth.git_history import is_test_path
from dsv32.synth.patch import PatchError, patch_paths

REASONS = ("solved", "touches-tests", "bad-patch", "patch-failed", "setup-failed", "tests-error", "timeout",
           "f2p-failed", "p2p-broken")


@dataclass(frozen=True)
class Transitions:
    f2p: list[str]   # not passing before, passing after
    p2f: list[str]   # passing before, not passing (or absent) after
    p2p: list[str]   # passing both times


def transitions(before: dict[str, str], after: dict[str, str]) -> Transitions:
    """Compare two runs' {test: status}; a test absent from a run did not pass in it."""
    passed_before = {t for t, s in before.items() if s == "passed"}
    passed_after = {t for t, s in after.items() if s == "passed"}
    return Transitions(sorted(passed_after - passed_before), sorted(passed_before - passed_after),
                       sorted(passed_before & passed_after))


@dataclass(frozen=True)
class Verdict:
    reward: float                  # 1.0 or 0.0
    reason: str                    # one of REASONS
    detail: str = ""
    f2p_failed: list[str] = field(default_factory=list)
    p2p_broken: list[str] = field(default_factory=list)
    seconds: float = 0.0


def touched_tests(task: CodeTask, patch: str) -> list[str]:
    """The test files `patch` would create, change, delete or rename. Raises PatchError when git
    cannot read the patch."""
    protected = set(task.test_paths)
    return sorted(p for p in patch_paths(patch) if p in protected or is_test_path(p))


def verify(task_dir: str | Path, patch: str, options: RunOptions = RunOptions()) -> Verdict:
    """The reward of `patch` (a unified diff against the snapshot, paths a/… b/…) for the task in
    `task_dir`: 1 when all F2P tests pass and every P2P test still passes."""
    start = time.monotonic()
    task = CodeTask.load(task_dir)
    task_dir = Path(task_dir)
    try:
        if bad := touched_tests(task, patch):
            return Verdict(0.0, "touches-tests", f"the patch changes test files: {', '.join(bad)}")
    except PatchError as e:
        return Verdict(0.0, "bad-patch", str(e))
    test_patch = (task_dir / "test.patch").read_text(encoding="utf-8")
    venv = None
    if task.venv is not None:  # the repository's venv, beside envs/: reused, or rebuilt offline if its stamp differs
        state = ensure_venv(task_dir.parent.parent / task.venv, task_dir / "repo.tar", sandbox_root(options),
                            VenvOptions(inherit=task.venv_inherit), unsafe_no_sandbox=options.unsafe_no_sandbox,
                            memory_gb=options.memory_gb)
        if not state.ok:
            return Verdict(0.0, "setup-failed", state.detail, seconds=time.monotonic() - start)
        venv = state.path
    try:
        run = run_tests(task_dir / "repo.tar", [("candidate patch", patch), ("test patch", test_patch)],
                        task.test_cmd, task.test_files, task.setup, options, venv)
    except PatchError as e:
        return Verdict(0.0, "patch-failed", str(e), seconds=time.monotonic() - start)
    if run.outcomes is None:
        return Verdict(0.0, run.error, run.detail, seconds=time.monotonic() - start)
    f2p_failed = [t for t in task.f2p if run.outcomes.get(t) != "passed"]
    p2p_broken = [t for t in task.p2p if run.outcomes.get(t) != "passed"]
    seconds = time.monotonic() - start
    if f2p_failed:
        return Verdict(0.0, "f2p-failed", f"{len(f2p_failed)} of {len(task.f2p)} F2P tests do not pass",
                       f2p_failed, p2p_broken, seconds)
    if p2p_broken:
        return Verdict(0.0, "p2p-broken", f"{len(p2p_broken)} of {len(task.p2p)} P2P tests broke",
                       f2p_failed, p2p_broken, seconds)
    return Verdict(1.0, "solved", f"{len(task.f2p)} F2P pass, {len(task.p2p)} P2P still pass", seconds=seconds)
