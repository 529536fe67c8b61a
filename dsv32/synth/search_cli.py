"""`dsv32 synth search`: search QA over a local corpus (spec §5), written to a folder.

    dsv32 corpus build --out corpus --from pages.jsonl
    dsv32 synth search --corpus corpus --n 200 --base-url http://127.0.0.1:8000/v1 \\
        --answer-agents 3 --solvability-k 100 --out qa

OUT/decisions.jsonl   one line per entity tried: kept or rejected, the reason, the question, the
                      candidates and every verdict (`search_qa.Decision`)
OUT/solvability.jsonl one line per kept question checked with --solvability-k: its attempts and pass@k
OUT/tasks.jsonl       the kept questions (and, with --solvability-k, pass@k > 0) as task rows that
                      `dsv32.rl.tasks.load_tasks` and `dsv32 eval` read: prompt, answer, grader "exact",
                      the browser's tool schemas, thinking mode; rewritten whole after every entity

A line is appended as soon as its work is done, so a killed run loses nothing decided; rerunning
with the same --out resumes: entities already in decisions.jsonl are skipped, and kept questions
not yet checked for solvability are checked first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from dsv32.agent.corpus import Corpus, CorpusError
from dsv32.agent.loop import AgentConfig
from dsv32.agent.policy import OpenAIPolicy, Policy
from dsv32.engine import SamplingParams
from dsv32.synth.entities import Entity, sample_entities
from dsv32.synth.search_prompts import ANSWER_STYLES, solve_prompt
from dsv32.synth.search_qa import REASONS, Role, SearchQA
from dsv32.synth.solvability import solvability

log = logging.getLogger(__name__)
DECISIONS, SOLVABILITY, TASKS = "decisions.jsonl", "solvability.jsonl", "tasks.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, help="a corpus directory (`dsv32 corpus build`)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--n", type=int, default=10, help="long-tail entities to try (a rerun with a larger n extends)")
    p.add_argument("--max-df", type=int, default=3, help="long-tail: at most this many documents mention the entity")
    p.add_argument("--seed", type=int, default=0, help="the entities' order")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint of the constructor and verifier")
    p.add_argument("--api-model", default=None, help="the model name at the endpoint (default: the first it serves)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--answer-agents", type=int, default=3, help="answer agents (styles and temperatures cycle)")
    p.add_argument("--answer-base-url", action="append", default=None,
                   help="endpoint(s) of the answer agents, cycled (default --base-url); repeat for several models")
    p.add_argument("--answer-temperatures", default="1.0,0.6,0.2", help="comma-separated, cycled over the agents")
    p.add_argument("--verify-passes", type=int, default=1, help="verifier passes per answer; all must agree")
    p.add_argument("--depth", type=int, default=2, help="hops the question should need")
    p.add_argument("--breadth", type=int, default=3, help="facts the question should draw on")
    p.add_argument("--solvability-k", type=int, default=None, help="keep only questions with pass@k > 0 (paper: 100)")
    p.add_argument("--solvability-n", type=int, default=None, help="attempts per question (default k)")
    p.add_argument("--solver-base-url", default=None, help="the policy attempted with (default --base-url)")
    p.add_argument("--max-steps", type=int, default=40, help="model calls per agent run")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per model call")
    p.add_argument("--temperature", type=float, default=1.0, help="constructor, verifier and solver temperature")
    p.add_argument("--workers", type=int, default=1, help="solvability attempts running at once")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (none when it does not exist); a torn last line (a killed write)
    is skipped with a warning, any other bad line is an error naming it."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if no == len(lines):
                log.warning("%s line %d is cut short (a killed write); it is redone", path.name, no)
                continue
            raise ValueError(f"{path.name} line {no}: not JSON ({e.msg})") from None
    return rows


def append(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def task_row(qa: dict, tools: list[dict]) -> dict:
    """A kept question as a task row (the fields `dsv32.rl.tasks.Task` takes; `dsv32 eval` reads
    prompt, answer and grader)."""
    return {"domain": "search", "prompt": solve_prompt(qa["question"]), "answer": qa["answer"], "grader": "exact",
            "tools": tools, "thinking_mode": "thinking"}


def write_tasks(out: Path, tools: list[dict], k: int | None) -> int:
    """tasks.jsonl from the decisions (and solvability records for this k), replaced atomically."""
    checked = {r["url"]: r for r in read_jsonl(out / SOLVABILITY) if r["k"] == k}
    rows = [task_row(d["qa"], tools) for d in read_jsonl(out / DECISIONS) if d["accepted"]
            and (k is None or (d["entity"]["url"] in checked and checked[d["entity"]["url"]]["pass_at_k"] > 0))]
    tmp = out / (TASKS + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out / TASKS)
    return len(rows)


def summary(out: Path, k: int | None) -> str:
    """Every entity in the folder by outcome: kept, dropped by the solvability filter, rejected per reason."""
    decisions = read_jsonl(out / DECISIONS)
    checked = {r["url"]: r for r in read_jsonl(out / SOLVABILITY) if r["k"] == k}
    counts = Counter()
    for d in decisions:
        if not d["accepted"]:
            counts[f"rejected: {d['reason']}"] += 1
        elif k is None:
            counts["kept"] += 1
        elif d["entity"]["url"] not in checked:
            counts["kept, solvability not checked"] += 1
        else:
            counts["kept" if checked[d["entity"]["url"]]["pass_at_k"] > 0 else f"dropped: pass@{k} = 0"] += 1
    order = ["kept", f"dropped: pass@{k} = 0", "kept, solvability not checked"] + [f"rejected: {r}" for r in REASONS]
    lines = ["| outcome | entities |", "|---|---|"]
    lines += [f"| {name} | {counts[name]} |" for name in order if counts[name]]
    lines.append(f"| total | {len(decisions)} |")
    return "\n".join(lines)


def synthesize(pipeline: SearchQA, entities: list[Entity], out: Path, solver: Policy | None = None,
               k: int | None = None, n: int | None = None, sampling: SamplingParams | None = None,
               config: AgentConfig | None = None, workers: int = 1) -> None:
    """Decide each entity not yet in OUT/decisions.jsonl, check kept questions' solvability with
    `solver` when k is given, and keep tasks.jsonl current."""
    out.mkdir(parents=True, exist_ok=True)
    tools = [t.schema() for t in pipeline.tools()]
    if k is not None and solver is None:
        raise ValueError("the solvability filter (k) needs a solver policy")

    def check(decision: dict) -> None:
        qa = decision["qa"]
        result = solvability([(qa["question"], qa["answer"])], solver, pipeline.tools, k, n, sampling, config,
                             workers)[0]
        append(out / SOLVABILITY, {"url": decision["entity"]["url"], **result.to_json()})

    if k is not None:  # kept questions a killed run did not get to check
        checked = {r["url"] for r in read_jsonl(out / SOLVABILITY) if r["k"] == k}
        for d in read_jsonl(out / DECISIONS):
            if d["accepted"] and d["entity"]["url"] not in checked:
                check(d)
    done = {d["entity"]["url"] for d in read_jsonl(out / DECISIONS)}
    todo = [e for e in entities if e.url not in done]
    kept = Counter()
    bar = tqdm(todo, desc="entities", unit="entity", disable=not todo)
    for entity in bar:
        decision = pipeline.decide(entity).to_json()
        append(out / DECISIONS, decision)
        if decision["accepted"] and k is not None:
            check(decision)
        kept["kept" if decision["accepted"] else "rejected"] += 1
        bar.set_postfix(kept)
        write_tasks(out, tools, k)
    write_tasks(out, tools, k)


def roles(args, policy: Policy) -> tuple[Role, list[Role], Role]:
    """The constructor, answer agents and verifier the flags describe."""
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    temperatures = [float(t) for t in args.answer_temperatures.split(",") if t.strip()]
    urls = args.answer_base_url or [args.base_url]
    endpoints = {u: policy if u == args.base_url else OpenAIPolicy(u, None, api_key=args.api_key)
                 for u in urls}
    answerers = [Role(f"answer-{i}", endpoints[urls[i % len(urls)]],
                      SamplingParams(max_tokens=args.max_tokens, temperature=temperatures[i % len(temperatures)]),
                      style=i % len(ANSWER_STYLES))
                 for i in range(args.answer_agents)]
    return Role("constructor", policy, sampling), answerers, Role("verifier", policy, sampling)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.answer_agents < 1:
        raise SystemExit("--answer-agents must be >= 1: the keep rule needs candidates to be wrong")
    try:
        corpus = Corpus.load(args.corpus)
    except CorpusError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    policy = OpenAIPolicy(args.base_url, args.api_model, api_key=args.api_key)
    constructor, answerers, verifier = roles(args, policy)
    config = AgentConfig(max_steps=args.max_steps)
    pipeline = SearchQA(corpus, constructor, answerers, verifier, config, passes=args.verify_passes,
                        depth=args.depth, breadth=args.breadth)
    entities = sample_entities(corpus, args.n, args.max_df, args.seed)
    if len(entities) < args.n:
        log.warning("the corpus has %d long-tail entities (max df %d), fewer than --n %d",
                    len(entities), args.max_df, args.n)
    solver = None
    if args.solvability_k is not None:
        solver = policy if not args.solver_base_url or args.solver_base_url == args.base_url else \
            OpenAIPolicy(args.solver_base_url, args.api_model, api_key=args.api_key)
    synthesize(pipeline, entities, out, solver, args.solvability_k, args.solvability_n,
               SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature), config, args.workers)
    print(summary(out, args.solvability_k))
    print(f"{len(read_jsonl(out / TASKS))} tasks in {out / TASKS}")
    return 0
