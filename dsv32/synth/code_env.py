"""A code environment: a repository snapshot with patches on top, and its tests run in the sandbox.

An environment directory holds everything one task needs, runnable later and elsewhere:

    task.json    the task (dsv32.synth.code_task.CodeTask)
    repo.tar     the tree at the parent commit (`git archive`: tracked files, no history, so the
                 fix cannot be read from the repository's future)
    test.patch   the commit's test part
    gold.patch   the commit's source part (the reference solution)

`run_tests` extracts the snapshot into a fresh sandbox work directory (`dsv32.agent.sandbox`: no
network, read-only system and Python install, private writable work directory, rlimits), applies
the patches in order, runs the optional setup command, then the test command, which must write
JUnit XML to `{junit}`. The environment is the current interpreter with the repository first on
PYTHONPATH (`python -m pytest` from the repository root), or, given a venv (the repository's, built
once by dsv32.synth.code_venv and bound read-only), that venv's python; `setup` is the hook for
anything more (a build step), run in the sandbox before the tests of every run.
"""

from __future__ import annotations

import os
import re
import shlex
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsv32.agent.sandbox import PATH as SYSTEM_PATH
from dsv32.agent.sandbox import Limits, Sandbox
from dsv32.synth.junit import JUnitError, read_junit
from dsv32.synth.patch import apply_patch

DEFAULT_TEST_CMD = ("python -m pytest -q -p no:cacheprovider --continue-on-collection-errors --junitxml={junit} "
                    "{tests}")
OUTPUT_TAIL = 4000


@dataclass(frozen=True)
class RunOptions:
    """How environments run: limits, and whether the sandbox may be skipped (trusted code only)."""

    timeout: float = 300.0              # seconds for the tests (and, separately, for the setup)
    memory_gb: float = 16.0             # address space per process (torch alone maps several GB)
    unsafe_no_sandbox: bool = False
    sandbox_root: str | None = None     # where sandboxes are made; default: the system temp dir


@dataclass
class TestRun:
    """The outcome of one run: `outcomes` is {test id: status} from the report, or None when the
    run gave no usable report; then `error` says why (`timeout`, `setup-failed`, `tests-error`)."""

    outcomes: dict[str, str] | None
    error: str = ""
    detail: str = ""
    exit_code: int | None = None
    seconds: float = 0.0
    output: str = field(default="", repr=False)   # the end of stdout+stderr


def sandbox_root(options: RunOptions) -> Path:
    return Path(options.sandbox_root or Path(tempfile.gettempdir()) / "dsv32-synth")


def test_command(template: str, test_files: list[str] | tuple[str, ...], junit: Path) -> str:
    """The shell command for one run: `{junit}` is the report's path, `{tests}` the test files
    (empty: the whole suite)."""
    return template.format(junit=shlex.quote(str(junit)), tests=" ".join(map(shlex.quote, test_files)))


def extract(tar_path: Path, dest: Path) -> None:
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, no links out of dest


def run_env(venv: Path | None) -> str:
    """The shell prefix of every command, run from the sandbox's work directory: into the checkout,
    which is first on PYTHONPATH (and the only entry there: the sandbox passes nothing of the
    caller's environment on); with a venv (dsv32.synth.code_venv), its bin/ first on PATH and the
    checkout's src/, when there is one, first on PYTHONPATH too. An isolated venv's PATH is its
    bin/ and the system's, without the miner's bin/ (whose `pytest` would run the miner's)."""
    if venv is None:
        return 'cd repo && export PYTHONPATH="$PWD" && '
    v = shlex.quote(str(venv))
    rest = '"$PATH"' if inherits(venv) else shlex.quote(SYSTEM_PATH)
    return (f'cd repo && export VIRTUAL_ENV={v} PATH={v}/bin:{rest} PYTHONPATH="$PWD" && '
            '{ [ -d src ] && export PYTHONPATH="$PWD/src:$PWD" || true; } && ')


def inherits(venv: Path) -> bool:
    """Whether the venv at `venv` sees the packages of the interpreter it was made from (its
    pyvenv.cfg says include-system-site-packages = true)."""
    try:
        cfg = (Path(venv) / "pyvenv.cfg").read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r"^include-system-site-packages\s*=\s*true\s*$", cfg, re.MULTILINE | re.IGNORECASE) is not None


def run_tests(tar_path: Path, patches: list[tuple[str, str]], test_cmd: str, test_files: list[str] | tuple[str, ...],
              setup: str | None = None, options: RunOptions = RunOptions(), venv: Path | None = None) -> TestRun:
    """Snapshot + `patches` ([(name, text)], applied in order) in a fresh sandbox; run `setup`, then
    the tests (with `venv`'s python when given: it is bound read-only); read the JUnit report. A
    patch that does not apply raises PatchError."""
    root = sandbox_root(options)
    limits = Limits(cpu_seconds=int(options.timeout) + 60, memory_bytes=int(options.memory_gb * (1 << 30)),
                    processes=512, file_size_bytes=4 << 30, open_files=4096, tmp_bytes=2 << 30)
    start = time.monotonic()
    box = Sandbox(root, "code", limits=limits, unsafe_no_sandbox=options.unsafe_no_sandbox,
                  ro_paths=(str(venv),) if venv is not None else ())
    try:
        repo = box.work / "repo"
        extract(tar_path, repo)
        for name, text in patches:
            apply_patch(repo, text, name)
        hand_over(box, repo)
        env = run_env(venv)
        if setup:
            r = box.run(["sh", "-c", env + setup], timeout=options.timeout, max_output=OUTPUT_TAIL)
            if r.timed_out or r.exit_code != 0:
                why = f"timed out after {options.timeout:g}s" if r.timed_out else f"exit status {r.exit_code}"
                return TestRun(None, "setup-failed", f"setup {why}", r.exit_code, time.monotonic() - start, r.output)
        junit = box.work / "report.xml"
        cmd = env + test_command(test_cmd, test_files, junit)
        r = box.run(["sh", "-c", cmd], timeout=options.timeout, max_output=OUTPUT_TAIL)
        seconds = time.monotonic() - start
        if r.timed_out:
            return TestRun(None, "timeout", f"tests ran past {options.timeout:g}s", None, seconds, r.output)
        if not junit.is_file():
            return TestRun(None, "tests-error", f"no JUnit report (exit status {r.exit_code})", r.exit_code,
                           seconds, r.output)
        try:
            outcomes = read_junit(junit.read_bytes())
        except JUnitError as e:
            return TestRun(None, "tests-error", str(e), r.exit_code, seconds, r.output)
        return TestRun(outcomes, "", "", r.exit_code, seconds, r.output)
    finally:
        box.remove()


def hand_over(box: Sandbox, tree: Path) -> None:
    """Give the extracted tree to the sandbox's uid, so the tests may write where they expect to."""
    box.own(tree)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            box.own(Path(dirpath) / name)
