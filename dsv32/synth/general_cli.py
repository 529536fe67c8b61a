"""`dsv32 synth general`: general-agent environments (spec §5), written to a folder.

    dsv32 synth general --family trip --n 100 --difficulty 2 --out envs/trip
    dsv32 synth general --category "trip planning" --base-url http://127.0.0.1:8000/v1 --n 4 --rounds 3 --out envs/llm

Each environment is a directory (environment.json, db.sqlite, tools.py, solution.py, verifier.py)
listed in OUT/environments.jsonl, and is written only after its check passed: its reference
solution, run in a sandbox without the database, got a result through the tools that its
verifier accepts. Rerunning with the same --out resumes: environments already listed (or dropped)
are skipped.

With --solvability-k K (the paper: 100), each listed environment not yet checked is attempted n
times (--solvability-n, default K) by a policy at --solver-base-url (default --base-url), and
kept only if pass@K > 0 (dsv32.synth.solvability): OUT/solvability.jsonl gets one line per
environment checked, and one with no passing attempt leaves environments.jsonl for
OUT/dropped.jsonl with the reason `unsolved` (its directory stays).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from dsv32.agent.loop import AgentConfig
from dsv32.agent.sandbox import SandboxError
from dsv32.engine import SamplingParams
from dsv32.synth.check import check_environment
from dsv32.synth.environment import INDEX, append_index, read_index
from dsv32.synth.rl_env import EnvironmentRunner
from dsv32.synth.solvability import environment_solvability
from dsv32.synth.synthesis import synthesize
from dsv32.synth.trip import make_trip

log = logging.getLogger(__name__)
FAMILIES = {"trip": make_trip}
SOLVABILITY, DROPPED = "solvability.jsonl", "dropped.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--family", choices=sorted(FAMILIES), help="a programmatic family (no model)")
    src.add_argument("--category", help="a task category for the model-driven loop (needs --base-url)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--n", type=int, default=10, help="environments (--family) or categories runs (--category)")
    p.add_argument("--difficulty", type=int, default=1, help="--family: the difficulty level, 1 = the paper's example")
    p.add_argument("--seed", type=int, default=0, help="--family: the first instance's seed")
    p.add_argument("--base-url", help="an OpenAI-compatible endpoint for --category")
    p.add_argument("--api-model", default=None, help="the model name at the endpoint (default: the first it serves)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--rounds", type=int, default=3, help="--category: difficulty rounds")
    p.add_argument("--fixes", type=int, default=3, help="--category: corrections allowed per round")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--solvability-k", type=int, default=0, help="keep only environments with pass@k > 0 over a "
                   "policy's attempts (the paper: 100; default 0: no filter)")
    p.add_argument("--solvability-n", type=int, default=None, help="attempts per environment (default: k)")
    p.add_argument("--solver-base-url", help="the policy the filter tries, an OpenAI-compatible endpoint "
                   "(default: --base-url)")
    p.add_argument("--solver-model", default=None, help="the model name at --solver-base-url")
    p.add_argument("--solver-max-steps", type=int, default=64, help="model calls per attempt")
    p.add_argument("--solver-seed", type=int, default=0, help="attempt i samples with seed + i * 1000003")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="run model-written code WITHOUT isolation "
                   "(trusted code only); the solution could then read the database")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "category"


def summary(rows: list[dict]) -> str:
    """A table per difficulty: environments written, rejected, and the reference's tool calls."""
    by = defaultdict(list)
    for r in rows:
        by[r["difficulty"]].append(r)
    lines = ["| difficulty | written | rejected | mean reference tool calls |", "|---|---|---|---|"]
    for d in sorted(by):
        ok = [r for r in by[d] if r["accepted"]]
        calls = sum(r["calls"] for r in ok) / len(ok) if ok else 0.0
        lines.append(f"| {d} | {len(ok)} | {len(by[d]) - len(ok)} | {calls:.1f} |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_index(out: Path, rows: list[dict]) -> None:
    """environments.jsonl replaced atomically by `rows`."""
    tmp = out / (INDEX + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, out / INDEX)


def solver_policy(args):
    from dsv32.agent.policy import (
        OpenAIPolicy,  # needs the openai package (the agent extra)
    )

    return OpenAIPolicy(args.solver_base_url or args.base_url, args.solver_model, api_key=args.api_key,
                        thinking_mode="chat")


def filter_solvable(args, out: Path) -> dict[str, int]:
    """Attempt every listed environment not yet checked; drop those with pass@k = 0. Returns the
    counts over every environment checked in `out` so far: {"kept": .., "unsolved": ..}."""
    checked = {r["name"] for r in read_rows(out / SOLVABILITY)}
    todo = [r for r in read_index(out) if r["name"] not in checked]
    if todo:
        policy = solver_policy(args)
        runner = EnvironmentRunner(out / ".boxes", unsafe_no_sandbox=args.unsafe_no_sandbox)
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.solver_seed)
        config = AgentConfig(max_steps=args.solver_max_steps)
        try:
            for row in tqdm(todo, desc=f"pass@{args.solvability_k}", unit="env"):
                s = environment_solvability([str(out / row["path"])], policy, runner, args.solvability_k,
                                            args.solvability_n, sampling, config)[0]
                append_row(out / SOLVABILITY, {"name": row["name"], **s.to_json(), "kept": s.kept})
        finally:
            runner.close()
    verdicts = {r["name"]: r for r in read_rows(out / SOLVABILITY)}
    dropped = {r["name"] for r in read_rows(out / DROPPED)}
    index = read_index(out)
    for row in index:  # a kill between the two files is finished here
        v = verdicts.get(row["name"])
        if v is not None and not v["kept"] and row["name"] not in dropped:
            append_row(out / DROPPED, {**row, "reason": "unsolved", "pass_at_k": v["pass_at_k"], "k": v["k"]})
    write_index(out, [r for r in index if r["name"] not in verdicts or verdicts[r["name"]]["kept"]])
    kept = sum(v["kept"] for v in verdicts.values())
    return {"kept": kept, "unsolved": len(verdicts) - kept}


def run_family(args, out: Path) -> list[dict]:
    done = {e["name"] for e in read_index(out)} | {e["name"] for e in read_rows(out / DROPPED)}
    rows = []
    for i in tqdm(range(args.n), desc=f"{args.family} d{args.difficulty}", unit="env"):
        name = f"{args.family}-d{args.difficulty}-s{args.seed + i}"
        if name in done:
            continue
        env = FAMILIES[args.family](args.seed + i, args.difficulty, out / ".work", name=name)
        check = check_environment(env, out / ".boxes", trusted=True, unsafe_no_sandbox=args.unsafe_no_sandbox)
        rows.append({"difficulty": args.difficulty, "accepted": check.accepted, "calls": check.calls})
        made = env.db_path
        if check.accepted:
            env.save(out / name)
            append_index(out, env, reference_calls=check.calls)
        else:
            log.warning("%s rejected: %s", name, check.reason)
        made.unlink()
    return rows


def run_category(args, out: Path) -> list[dict]:
    from dsv32.agent.policy import (
        OpenAIPolicy,  # needs the openai package (the agent extra)
    )

    if not args.base_url:
        raise SystemExit("--category needs --base-url (an OpenAI-compatible endpoint)")
    policy = OpenAIPolicy(args.base_url, args.api_model, api_key=args.api_key, thinking_mode="chat")
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    done = {e.get("run") for e in read_index(out) + read_rows(out / DROPPED)}
    rows = []
    for i in tqdm(range(args.n), desc=slug(args.category), unit="run"):
        run = f"{slug(args.category)}-{i}"
        if run in done:
            continue
        rounds = synthesize(policy, args.category, out / ".work" / run, rounds=args.rounds, fixes=args.fixes,
                            sampling=sampling, unsafe_no_sandbox=args.unsafe_no_sandbox, name=run)
        for r in rounds:
            rows.append({"difficulty": r.index, "accepted": r.accepted,
                         "calls": r.env.meta["reference_calls"] if r.env else 0})
            if r.env is not None:
                r.env.save(out / r.env.name)
                append_index(out, r.env, run=run, reference_calls=r.env.meta["reference_calls"])
            else:
                log.warning("%s round %d rejected after %d attempts: %s", run, r.index, r.attempts, r.reason)
    return rows


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if args.solvability_k < 0 or (args.solvability_n is not None and not 1 <= args.solvability_k <= args.solvability_n):
        print(f"error: --solvability-k must be >= 0 and at most --solvability-n, got k={args.solvability_k}, "
              f"n={args.solvability_n}", file=sys.stderr)
        return 2
    if args.solvability_k and not (args.solver_base_url or args.base_url):
        print("error: --solvability-k needs a policy to try: --solver-base-url (or --base-url)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    counts = None
    try:
        rows = run_family(args, out) if args.family else run_category(args, out)
        if args.solvability_k:
            counts = filter_solvable(args, out)
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(out / ".boxes", ignore_errors=True)
    print(summary(rows) if rows else "nothing new: every environment is in the index already")
    if counts is not None:
        print(f"\n| solvability (pass@{args.solvability_k} > 0) | environments |\n|---|---|\n"
              f"| kept | {counts['kept']} |\n| dropped: unsolved | {counts['unsolved']} |")
    print(f"{len(read_index(out))} environments in {out / 'environments.jsonl'}")
    return 0
