"""`dsv32 synth code REPO --out DIR`: mine code-agent tasks from a git repository's history
(dsv32.synth.code_miner), and `dsv32 synth code --verify ENV_DIR --patch FILE`: the reward of a
candidate patch for one mined task (dsv32.synth.code_reward.verify). See docs/synth.md."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from dsv32.agent.sandbox import Sandbox, SandboxError
from dsv32.synth.code_env import DEFAULT_TEST_CMD, RunOptions, sandbox_root
from dsv32.synth.code_miner import (
    JUDGE_ERRORS,
    REJECTIONS,
    SCOPES,
    MineOptions,
    mine,
    summary,
)
from dsv32.synth.code_reward import verify
from dsv32.synth.code_venv import VenvOptions
from dsv32.synth.git_history import GitError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", nargs="?", help="a local git repository with a test suite")
    p.add_argument("--out", help="output directory: tasks.jsonl, decisions.jsonl, envs/ (resumed if it exists)")
    p.add_argument("--rev", default="HEAD", help="walk the non-merge commits reachable from this revision")
    p.add_argument("--max-commits", type=int, help="only the newest N commits of --rev")
    p.add_argument("--limit", type=int, help="decide at most N not-yet-decided commits in this run, then stop")
    p.add_argument("--name", help="the repository's name in task ids (default: its directory's name)")
    p.add_argument("--test-cmd", default=DEFAULT_TEST_CMD, help="shell command run from the repository root that "
                   "writes JUnit XML to {junit}; {tests} is the test files to run (default: %(default)s)")
    p.add_argument("--scope", choices=SCOPES, default="all", help="run the whole suite (all) or only the test "
                   "modules the commit changed (touched: faster, but P2F is then checked in those files only)")
    p.add_argument("--setup", help="shell command run in the sandbox, from the repository root, before the tests "
                   "of every run (a build step, an offline install); default: none, the repository is on PYTHONPATH")
    p.add_argument("--repeat", type=int, default=2, help="after-runs (with the gold patch); a fail-to-pass test "
                   "that changes status between them rejects the commit as flaky (default: %(default)s)")
    p.add_argument("--venv", action="store_true", help="run the tests with a virtualenv of the repository, built "
                   "once under --out with its declared dependencies (requirements*.txt, pyproject.toml/setup.py) "
                   "and rebuilt when a dependency file changes")
    p.add_argument("--venv-inherit", action="store_true", help="with --venv: the venv also sees every package the "
                   "miner's interpreter can import (default: isolated, seeded with pip, setuptools, wheel and pytest "
                   "only)")
    p.add_argument("--allow-network", action="store_true", help="with --venv: let pip reach the network (default: "
                   "offline, pip --no-index)")
    p.add_argument("--find-links", action="append", default=[], metavar="DIR", help="with --venv: a folder of "
                   "wheels pip may install from (repeatable)")
    p.add_argument("--setup-agent", action="store_true", help="with --venv: when the install fails, an LLM agent "
                   "with a bash tool in the sandbox tries to make the tests collect (needs --base-url)")
    p.add_argument("--base-url", help="--setup-agent: an OpenAI-compatible endpoint")
    p.add_argument("--model", help="--setup-agent: the model name at the endpoint (default: the first it serves)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--setup-turns", type=int, default=8, help="--setup-agent: turns before it gives up")
    p.add_argument("--min-issue-words", type=int, default=0, help="reject commits whose message (the task's issue "
                   "text) has fewer words (issue-too-short); default: keep every message")
    p.add_argument("--judge-base-url", help="judge each otherwise accepted commit's message with an LLM at this "
                   "OpenAI-compatible endpoint; an unusable issue rejects it (issue-judged-unusable); default: no "
                   "judge")
    p.add_argument("--judge-model", help="--judge-base-url: the model name (default: the first it serves)")
    p.add_argument("--judge-api-key", default="none")
    p.add_argument("--judge-errors", choices=JUDGE_ERRORS, default="keep", help="what a judge-error (no verdict: a "
                   "malformed reply, a failed call) does: keep the commit, or reject it (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per test run (default: %(default)s)")
    p.add_argument("--memory-gb", type=float, default=16.0, help="address-space limit per process")
    p.add_argument("--sandbox-root", help="where sandboxes are made (default: the system temp dir)")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="run the repository's tests WITHOUT isolation, "
                   "as you, with the network and your files (trusted repositories only)")
    p.add_argument("--verify", metavar="ENV_DIR", help="instead of mining: the reward of --patch for this task")
    p.add_argument("--patch", help="with --verify: the candidate patch file ('-': stdin)")


def run(args: argparse.Namespace) -> int:
    options = RunOptions(args.timeout, args.memory_gb, args.unsafe_no_sandbox, args.sandbox_root)
    try:
        Sandbox(sandbox_root(options), "probe",
                unsafe_no_sandbox=options.unsafe_no_sandbox).remove()
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.unsafe_no_sandbox:
        print("WARNING: --unsafe-no-sandbox: the repository's tests run as you, with the network and your files",
              file=sys.stderr)
    if args.verify:
        if not args.patch:
            print("error: --verify needs --patch FILE", file=sys.stderr)
            return 2
        patch = sys.stdin.read() if args.patch == "-" else Path(args.patch).read_text(encoding="utf-8")
        verdict = verify(args.verify, patch, options)
        print(json.dumps(asdict(verdict), indent=1))
        return 0
    if not args.repo or not args.out:
        print("error: mining needs REPO and --out DIR", file=sys.stderr)
        return 2
    if (args.setup_agent or args.allow_network or args.find_links or args.venv_inherit) and not args.venv:
        print("error: --setup-agent, --allow-network, --find-links and --venv-inherit act on the venv: add --venv",
              file=sys.stderr)
        return 2
    if args.judge_model and not args.judge_base_url:
        print("error: --judge-model needs --judge-base-url (an OpenAI-compatible endpoint)", file=sys.stderr)
        return 2
    if args.setup_agent and not args.base_url:
        print("error: --setup-agent needs --base-url (an OpenAI-compatible endpoint)", file=sys.stderr)
        return 2
    if missing := [d for d in args.find_links if not Path(d).is_dir()]:
        print(f"error: --find-links {missing[0]}: not a folder", file=sys.stderr)
        return 2
    fixer, venv, judge = None, None, None
    try:
        if args.setup_agent or args.judge_base_url:
            from dsv32.agent.policy import (  # needs the openai package (the agent extra)
                OpenAIPolicy,
                PolicyError,
            )
        if args.judge_base_url:
            from dsv32.synth.issue_judge import IssueJudge

            try:
                judge = IssueJudge(OpenAIPolicy(args.judge_base_url, args.judge_model, api_key=args.judge_api_key,
                                                thinking_mode="chat"))
            except PolicyError as e:
                print(f"error: the judge: {e}", file=sys.stderr)
                return 2
        if args.setup_agent:
            from dsv32.synth.code_setup_agent import SetupAgent

            try:
                policy = OpenAIPolicy(args.base_url, args.model, api_key=args.api_key, thinking_mode="chat")
            except PolicyError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            fixer = SetupAgent(policy, max_turns=args.setup_turns)
        if args.venv:
            venv = VenvOptions(args.allow_network, tuple(args.find_links), max(args.timeout, 900.0),
                               f"{args.base_url} {policy.model}" if fixer else None, args.venv_inherit)
        mopts = MineOptions(args.test_cmd, args.scope, args.setup, options, args.repeat, venv, fixer,
                            args.min_issue_words, judge, args.judge_errors)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {"accepted": 0, "rejected": 0}
    bar: list[tqdm] = []

    def progress(it, total):
        bar.append(tqdm(it, total=total, desc="commits", unit="commit"))
        return bar[0]

    def on_decision(row):
        counts["accepted" if row["accepted"] else "rejected"] += 1
        bar[0].set_postfix(counts, refresh=False)

    try:
        rows = mine(args.repo, args.out, rev=args.rev, max_count=args.max_commits, limit=args.limit, name=args.name,
                    options=mopts, progress=progress, on_decision=on_decision)
    except GitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(rows))
    return 0


def format_summary(rows: list[dict]) -> str:
    """A markdown table of decisions by reason: accepted first, then each rejection."""
    counts = summary(rows)
    lines = ["| decision | reason | commits |", "|---|---|---:|"]
    lines.append(f"| accepted | F2P > 0, P2F = 0 | {counts.get('accepted', 0)} |")
    for reason in (*REJECTIONS, *sorted(set(counts) - set(REJECTIONS) - {"accepted"})):
        if counts.get(reason):
            lines.append(f"| rejected | {reason} | {counts[reason]} |")
    lines.append(f"| **total** | | **{len(rows)}** |")
    return "\n".join(lines)
