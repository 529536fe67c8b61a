"""The code-task miner: walk a repository's commits and keep those whose source change makes
tests pass without breaking any (spec §5, "Code agent": F2P > 0 and P2F = 0).

For each commit with a parent, a test part and a source part: snapshot the parent, run its tests
as they are (plain), with the commit's test part applied (before), then with its source part too
(after, `repeat` times), all in the sandbox, all read as JUnit XML. A test's status before is its
before-run status, or, when the test patch kept it from being collected (absent before, present
after), its plain-run status. Accept iff some test goes fail→pass, none pass→fail, and no
fail→pass test changes status between the after-runs (else `flaky`); tests that change status
between the after-runs are left out of P2P and P2F. Every
decision, accepted or not, is one line of `decisions.jsonl`; each accepted task is one line of
`tasks.jsonl` and a directory `envs/<task id>/` (see dsv32.synth.code_env).

Resumable: lines are appended and flushed as decisions are made, and a run first reads what is
already decided and skips it, so a killed run loses only the commit it was on. A task's directory
is complete before its line is written (built under a staging name, then renamed), and its
tasks.jsonl line comes before its decisions.jsonl line, so a kill between the two leaves a task
that the next run records as decided instead of mining it again.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dsv32.synth.code_env import DEFAULT_TEST_CMD, RunOptions, run_tests, sandbox_root
from dsv32.synth.code_reward import transitions
from dsv32.synth.code_task import CodeTask
from dsv32.synth.code_venv import Fixer, VenvOptions, ensure_venv
from dsv32.synth.git_history import archive, commits, diff, is_test_module, read_commit
from dsv32.synth.issue_judge import IssueVerdict
from dsv32.synth.patch import PatchError

REJECTIONS = ("no-parent", "issue-too-short", "no-tests-changed", "no-source-changed", "patch-failed", "setup-failed",
              "tests-error", "timeout", "flaky", "f2p=0", "p2f>0", "issue-judged-unusable", "judge-error")
JUDGE_ERRORS = ("keep", "reject")   # what a judge-error verdict does to a commit that passed every other rule
VENV = "venv"   # the repository's virtualenv, under the output folder
SCOPES = ("all", "touched")


@dataclass(frozen=True)
class MineOptions:
    test_cmd: str = DEFAULT_TEST_CMD
    scope: str = "all"          # "all": the whole suite each run; "touched": only the test files the commit changed
    setup: str | None = None
    run: RunOptions = RunOptions()
    repeat: int = 2                     # after-runs; a fail→pass test must pass in every one
    venv: VenvOptions | None = None     # None: the current interpreter; else the repository's venv
    fixer: Fixer | None = None          # the environment-setup agent, when the venv's install fails
    min_issue_words: int = 0            # reject commits whose message (the issue text) is shorter
    judge: Callable[[str, str, str], IssueVerdict] | None = None   # (issue, gold patch, test patch): an IssueJudge
    judge_errors: str = "keep"          # a judge-error verdict keeps the commit, or rejects it ("reject")

    def __post_init__(self):
        if self.judge_errors not in JUDGE_ERRORS:
            raise ValueError(f"judge_errors must be one of {', '.join(JUDGE_ERRORS)}, got {self.judge_errors!r}")
        if self.min_issue_words < 0:
            raise ValueError(f"min_issue_words must be >= 0, got {self.min_issue_words}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be at least 1, got {self.repeat}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if "{junit}" not in self.test_cmd:
            raise ValueError(f"the test command must write its JUnit report to {{junit}}: {self.test_cmd!r}")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file we append to; a last line cut off by a kill is dropped (and cut
    from the file, so the next append starts on a line of its own)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rejected(sha: str, reason: str, detail: str = "", **more) -> dict:
    return {"commit": sha, "accepted": False, "reason": reason, "detail": detail, **more}


def test_module(path: str) -> str:
    """tests/test_calc.py -> tests.test_calc: the dotted module pytest writes as a JUnit classname."""
    return path.removesuffix(".py").replace("/", ".")


def task_kind(f2p: list[str], added_sources: list[str], added_tests: list[str]) -> str:
    """"new-module" when the commit adds source files and every fail-to-pass test lives in a test
    module the commit adds (an "implement this module" task: the tests fail before only because the
    module does not exist); "fix" otherwise (a bug fix or a change to existing code)."""
    modules = tuple(test_module(p) for p in added_tests)
    if added_sources and f2p and all(t.split("::")[0].startswith(modules) for t in f2p):
        return "new-module"
    return "fix"


def before_status(plain: dict[str, str], before: dict[str, str], after: dict[str, str]) -> dict[str, str]:
    """Each test's status before the fix: the before-run's, or, for a test the test patch kept
    from being collected (absent before, present after), the plain run's. A test absent both
    before and after (the test patch deleted it) is not filled in."""
    return {**{t: s for t, s in plain.items() if t not in before and t in after}, **before}


def unstable(runs: list[dict[str, str]]) -> set[str]:
    """The tests whose status (absent included) is not the same in every run."""
    tests = set().union(*runs)
    return {t for t in tests if len({r.get(t, "absent") for r in runs}) > 1}


def decide(repo: Path, sha: str, out: Path, name: str, options: MineOptions) -> dict:
    """Mine one commit: its decision row, and for an accepted one its environment directory
    `out/envs/<id>` (the row then holds the task). With a venv, the row says whether this commit
    built it (`venv`: the stamp's first 12 digits, built, seconds)."""
    venv_info: dict = {}
    row = _decide(repo, sha, out, name, options, venv_info)
    return {**row, "venv": venv_info} if venv_info else row


def _decide(repo: Path, sha: str, out: Path, name: str, options: MineOptions, venv_info: dict) -> dict:
    start = time.monotonic()
    c = read_commit(repo, sha)
    if c.parent is None:
        return _rejected(sha, "no-parent", "a root commit")
    if len(c.message.split()) < options.min_issue_words:
        return _rejected(sha, "issue-too-short", f"the commit message has {len(c.message.split())} words, "
                         f"fewer than {options.min_issue_words}")
    if not c.test_paths:
        return _rejected(sha, "no-tests-changed", f"changes {len(c.source_paths) + len(c.doc_paths)} files, no tests")
    if not c.source_paths:
        return _rejected(sha, "no-source-changed", f"changes only tests{' and docs' if c.doc_paths else ''}")
    test_files: list[str] = []
    if options.scope == "touched":
        test_files = [p for p in c.test_paths if is_test_module(p) and p not in c.deleted]
        if not test_files:
            return _rejected(sha, "no-tests-changed", "changes test helpers only, no test module to run")
    task_id = f"{name}-{sha[:12]}"
    staging = out / "envs" / f".staging-{task_id}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        archive(repo, c.parent, staging / "repo.tar")
        test_patch, gold_patch = diff(repo, c.parent, sha, c.test_paths), diff(repo, c.parent, sha, c.source_paths)
        (staging / "test.patch").write_text(test_patch, encoding="utf-8")
        (staging / "gold.patch").write_text(gold_patch, encoding="utf-8")
        tar, o = staging / "repo.tar", options
        venv = None
        if o.venv is not None:
            state = ensure_venv(out / VENV, tar, sandbox_root(o.run), o.venv, fixer=o.fixer,
                                unsafe_no_sandbox=o.run.unsafe_no_sandbox, memory_gb=o.run.memory_gb)
            venv_info.update(stamp=state.stamp[:12], built=state.built, seconds=round(state.seconds, 2))
            if not state.ok:
                return _rejected(sha, "setup-failed", state.detail, seconds=round(time.monotonic() - start, 2),
                                 output=state.log[-1000:])
            venv = state.path
        with tarfile.open(tar) as t:
            at_parent = set(t.getnames())
        plain_files = [f for f in test_files if f in at_parent]  # the plain run can only name those that exist
        plans = [("plain", [])] if plain_files or not test_files else []
        plans += [("before", [("test patch", test_patch)])]
        plans += [(f"after {i + 1}", [("test patch", test_patch), ("gold patch", gold_patch)])
                  for i in range(o.repeat)]
        runs = {}
        for which, patches in plans:
            try:
                run = run_tests(tar, patches, o.test_cmd, plain_files if which == "plain" else test_files, o.setup,
                                o.run, venv)
            except PatchError as e:
                return _rejected(sha, "patch-failed", str(e), seconds=round(time.monotonic() - start, 2))
            if run.outcomes is None:
                return _rejected(sha, run.error, f"{which}: {run.detail}", seconds=round(time.monotonic() - start, 2),
                                 output=run.output[-1000:])
            runs[which] = run.outcomes
        afters = [runs[f"after {i + 1}"] for i in range(o.repeat)]
        flaky = unstable(afters)
        t = transitions(before_status(runs.get("plain", {}), runs["before"], afters[0]), afters[0])
        seconds = round(time.monotonic() - start, 2)
        if bad := [x for x in t.f2p if x in flaky]:
            return _rejected(sha, "flaky", f"{len(bad)} fail-to-pass tests change status between the "
                             f"{o.repeat} after-runs", f2p=t.f2p, p2f=t.p2f, flaky=bad, seconds=seconds)
        p2f, p2p = [x for x in t.p2f if x not in flaky], [x for x in t.p2p if x not in flaky]
        if p2f:
            return _rejected(sha, "p2f>0", f"{len(p2f)} tests pass before and not after", f2p=t.f2p, p2f=p2f,
                             seconds=seconds)
        if not t.f2p:
            return _rejected(sha, "f2p=0", "no test goes from failing to passing", seconds=seconds)
        judged = None
        if o.judge is not None:  # last: one call per commit that every other rule accepts
            verdict = o.judge(c.message, gold_patch, test_patch)
            judged = verdict.to_json()
            seconds = round(time.monotonic() - start, 2)
            if verdict.verdict == "unusable":
                return _rejected(sha, "issue-judged-unusable", verdict.reason, f2p=t.f2p, p2f=[], judge=judged,
                                 seconds=seconds)
            if verdict.verdict == "judge-error" and o.judge_errors == "reject":
                return _rejected(sha, "judge-error", verdict.reason, f2p=t.f2p, p2f=[], judge=judged,
                                 seconds=seconds)
        kind = task_kind(t.f2p, [p for p in c.source_paths if p not in at_parent and p not in c.deleted],
                         [p for p in c.test_paths if p not in at_parent and p not in c.deleted])
        task = CodeTask(task_id, name, sha, c.parent, c.message, o.test_cmd, test_files, list(c.test_paths),
                        t.f2p, p2p, o.setup, f"envs/{task_id}", VENV if venv is not None else None, kind,
                        o.venv is not None and o.venv.inherit, judged)
        task.save(staging)
        final = out / "envs" / task_id
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        return {"commit": sha, "accepted": True, "reason": "accepted",
                "detail": f"{len(t.f2p)} F2P, {len(p2p)} P2P, {kind}", "kind": kind,
                "f2p": t.f2p, "p2f": [], "flaky": sorted(flaky), "seconds": seconds, "task": task.to_json(),
                **({"judge": judged} if judged is not None else {})}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def mine(repo: str | Path, out: str | Path, *, rev: str = "HEAD", max_count: int | None = None,
         limit: int | None = None, name: str | None = None, options: MineOptions = MineOptions(),
         progress: Callable[[Iterator[str], int], Iterator[str]] | None = None,
         on_decision: Callable[[dict], None] | None = None) -> list[dict]:
    """Decide every commit of `rev` (the newest `max_count`) not yet in `out/decisions.jsonl`, at
    most `limit` of them in this call; return all decision rows of `out`, old and new.
    `progress(iterable, total)` may wrap the loop (a tqdm); `on_decision(row)` sees each new row."""
    repo, out = Path(repo).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = name or repo.name
    decisions_path, tasks_path = out / "decisions.jsonl", out / "tasks.jsonl"
    decided = {row["commit"] for row in read_jsonl(decisions_path)}
    for task in read_jsonl(tasks_path):  # accepted, but killed before its decision line
        if task["commit"] not in decided:
            append_jsonl(decisions_path, {"commit": task["commit"], "accepted": True, "reason": "accepted",
                                          "detail": "recovered from tasks.jsonl", "f2p": task["f2p"], "p2f": [],
                                          "task": task})
            decided.add(task["commit"])
    pending = [sha for sha in commits(repo, rev, max_count) if sha not in decided]
    if limit is not None:
        pending = pending[:limit]
    for sha in (progress(iter(pending), len(pending)) if progress else pending):
        row = decide(repo, sha, out, name, options)
        if row["accepted"]:
            append_jsonl(tasks_path, row["task"])
        append_jsonl(decisions_path, row)
        if on_decision:
            on_decision(row)
    return read_jsonl(decisions_path)


def summary(rows: list[dict]) -> Counter:
    """{reason: count} over decision rows ("accepted" for the accepted ones)."""
    return Counter(row["reason"] for row in rows)
