"""A contest run: Speciale's IOI/ICPC protocol (spec §6) on real candidates, judged in the sandbox.

Per problem: sample n candidate replies; turn each into a `protocols.Candidate` (its program run
on the statement's sample tests sets `passes_samples`; a reply that ran out of tokens, or whose
thinking never closed, is over length; a refusal is found by `refuses`, or by a judge given to
`run_contest`); submit the longest-thinking survivors (`protocols.select_submissions`); run each
submission on every subtask's tests; and score: IOI, per subtask the best any submission got
(`protocols.ioi_score`); ICPC, solved when a submission passes every test, with the attempts it
took (`protocols.icpc_result`).

A subtask scores 1 when the program passes all of its tests and 0 otherwise (IOI's batch subtasks;
checkers with partial credit are not modelled). Problems are JSONL, one a line:

    {"id": "A", "prompt": "statement ...", "samples": [{"input": "1 2", "output": "3"}],
     "subtasks": [{"points": 30, "tests": [...]}, {"points": 70, "tests": [...]}],
     "time_limit": 1, "memory_mb": 256}

Results go to out_dir/results.jsonl (one problem a line, resumable), summary.json and report.md.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from dsv32.eval.code import CaseFormatError, CodeJudge, check_tests, extract_program
from dsv32.eval.protocols import Candidate, icpc_result, ioi_score, select_submissions
from dsv32.eval.reply import split_reply
from dsv32.eval.report import read_results
from dsv32.eval.sample import Sample, SamplingConfig
from dsv32.eval.tasks import Task, TaskError, read_jsonl

PROTOCOLS = ("ioi", "icpc")

# "I cannot solve ...", "we are unable to find ...", "I won't provide ...": said in the prose of the
# answer (code blocks are not read). The paper asks V3.2-Exp instead; pass `refusal_judge` for that.
_REFUSAL = re.compile(r"\b(?:i|we)\s+(?:cannot|can't|can not|could not|couldn't|am unable to|are unable to|"
                      r"was unable to|were unable to|won't|will not)\s+(?:fully\s+)?(?:solve|provide|find|write|"
                      r"give|produce|complete|implement)\b", re.IGNORECASE)
_FENCED = re.compile(r"```.*?(?:```|$)", re.DOTALL)


def refuses(answer: str) -> bool:
    """Whether the answer's prose (outside code blocks) says it cannot or will not solve the problem."""
    return bool(_REFUSAL.search(_FENCED.sub(" ", answer)))


@dataclass(frozen=True)
class Subtask:
    points: float
    tests: list          # stdin/stdout cases


@dataclass(frozen=True)
class Problem:
    id: str
    messages: list[dict]
    samples: list                 # the statement's sample tests (stdin/stdout cases); may be empty
    subtasks: list[Subtask]
    time_limit: float | None = None
    memory_mb: int | None = None

    @property
    def task(self) -> Task:
        """The problem as a task to sample (the samplers read its id and messages)."""
        return Task(self.id, self.messages, "", "code")


def _problem(obj, where: str, default_id: str) -> Problem:
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: a problem is a JSON object, got {type(obj).__name__}")
    if ("prompt" in obj) == ("messages" in obj):
        raise TaskError(f"{where}: give exactly one of 'prompt' and 'messages'")
    messages = [{"role": "user", "content": obj["prompt"]}] if "prompt" in obj else obj["messages"]
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages)
            and all(isinstance(m.get("content"), str) for m in messages)):
        raise TaskError(f"{where}: 'prompt' is not a string, or 'messages' not a list of {{'role', 'content'}}")
    samples = obj.get("samples", [])
    try:
        if samples:
            check_tests(samples)
    except CaseFormatError as e:
        raise TaskError(f"{where}: 'samples': {e}") from None
    if not isinstance(samples, list):
        raise TaskError(f"{where}: 'samples' must be a list of {{\"input\", \"output\"}}")
    raw = obj.get("subtasks")
    if not isinstance(raw, list) or not raw:
        raise TaskError(f"{where}: 'subtasks' must be a non-empty list of {{\"points\", \"tests\"}}")
    subtasks = []
    for i, st in enumerate(raw):
        points = st.get("points") if isinstance(st, dict) else None
        if not isinstance(points, (int, float)) or isinstance(points, bool) or points < 0:
            raise TaskError(f"{where}: subtask {i}: 'points' must be a number >= 0")
        tests = st.get("tests")
        try:
            if isinstance(tests, str):
                raise CaseFormatError("expected stdin/stdout cases, got a string of asserts")
            check_tests(tests)
        except CaseFormatError as e:
            raise TaskError(f"{where}: subtask {i}: 'tests': {e}") from None
        subtasks.append(Subtask(float(points), tests))
    return Problem(str(obj.get("id", default_id)), messages, samples, subtasks,
                   obj.get("time_limit"), obj.get("memory_mb"))


def load_problems(path: str | Path) -> list[Problem]:
    """The problems of a JSONL file (blank lines skipped); ids must be unique."""
    return read_jsonl(path, _problem, "problem")


def candidate(judge: CodeJudge, problem: Problem, sample: Sample, index: int, thinking: bool,
              measure: Callable[[str], int] = len, refusal_judge: Callable[[str], bool] = refuses
              ) -> tuple[Candidate, str | None]:
    """(the Candidate a sample makes, its program or None). Sample tests run only for a program."""
    reasoning, answer = split_reply(sample.text, thinking)
    program = extract_program(answer) if answer is not None else None
    passes = program is not None
    if passes and problem.samples:
        results = judge.run_tests(program, problem.samples, problem.time_limit, problem.memory_mb,
                                  stop_at_failure=True)
        passes = all(r.passed for r in results)
    within = answer is not None and sample.finish_reason != "length"
    refused = answer is not None and refusal_judge(answer)
    return Candidate(f"{problem.id}#{index}", measure(reasoning), passes, within, refused), program


def subtask_scores(judge: CodeJudge, problem: Problem, program: str) -> list[float]:
    """1.0 for each subtask whose tests the program all passes, else 0.0."""
    return [float(all(r.passed for r in judge.run_tests(program, st.tests, problem.time_limit, problem.memory_mb,
                                                        stop_at_failure=True))) for st in problem.subtasks]


def judge_problem(judge: CodeJudge, problem: Problem, samples: list[Sample], protocol: str, thinking: bool,
                  submissions: int | None = None, measure: Callable[[str], int] = len,
                  refusal_judge: Callable[[str], bool] = refuses) -> dict:
    """The protocol on one problem's samples: a results record (candidates, submissions, score)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    made = [candidate(judge, problem, s, i, thinking, measure, refusal_judge) for i, s in enumerate(samples)]
    programs = {c.id: prog for c, prog in made}
    limit = submissions if submissions is not None else (50 if protocol == "ioi" else len(samples))
    chosen = [replace(c, subtask_scores=subtask_scores(judge, problem, programs[c.id]))
              for c in select_submissions([c for c, _ in made], limit)]
    scored = {c.id: c.subtask_scores for c in chosen}
    points = [st.points for st in problem.subtasks]
    record = {"id": problem.id, "protocol": protocol, "n": len(samples), "points": sum(points),
              "submitted": [c.id for c in chosen], "candidates": [
                  {"id": c.id, "thinking_length": c.thinking_length, "passes_samples": c.passes_samples,
                   "within_length": c.within_length, "refused": c.refused, "subtask_scores": scored.get(c.id),
                   "finish_reason": s.finish_reason, "num_tokens": s.num_tokens, "text": s.text}
                  for (c, _), s in zip(made, samples)]}
    if protocol == "ioi":
        record["score"] = ioi_score(chosen, points)
    else:
        record["solved"], record["attempts"] = icpc_result(chosen)
    return record


def summarize_contest(records: list[dict], protocol: str) -> dict:
    """Totals over problems: IOI points out of the maximum, or ICPC problems solved."""
    kept = {r["id"]: {k: r[k] for k in ("score", "solved", "attempts", "points") if k in r} for r in records}
    counts = {"candidates": sum(r["n"] for r in records), "submitted": sum(len(r["submitted"]) for r in records),
              "failed_samples": sum(not c["passes_samples"] for r in records for c in r["candidates"]),
              "over_length": sum(not c["within_length"] for r in records for c in r["candidates"]),
              "refused": sum(c["refused"] for r in records for c in r["candidates"])}
    if protocol == "ioi":
        total = {"score": sum(r["score"] for r in records), "max_score": sum(r["points"] for r in records)}
    else:
        total = {"solved": sum(r["solved"] for r in records)}
    return {"protocol": protocol, "problems": len(records), **total, **counts, "per_problem": kept}


def render_contest(summary: dict, title: str) -> str:
    """Markdown for a contest summary."""
    ioi = summary["protocol"] == "ioi"
    head = (f"IOI score {summary['score']:g} of {summary['max_score']:g}" if ioi
            else f"ICPC: {summary['solved']} of {summary['problems']} problems solved")
    lines = [f"# {title}", "", f"{head}.", "",
             (f"{summary['candidates']} candidates: {summary['failed_samples']} failed the sample tests, "
              f"{summary['over_length']} over length, {summary['refused']} refused; "
              f"{summary['submitted']} submitted."),
             "", "| problem | " + ("score | points |" if ioi else "solved | attempts |"), "|---|---|---|"]
    for pid, r in summary["per_problem"].items():
        lines.append(f"| {pid} | {r['score']:g} | {r['points']:g} |" if ioi else
                     f"| {pid} | {'yes' if r['solved'] else 'no'} | {r['attempts']} |")
    return "\n".join(lines) + "\n"


def run_contest(problems: list[Problem], sampler, cfg: SamplingConfig, out_dir: str | Path, protocol: str,
                judge: CodeJudge, submissions: int | None = None, measure: Callable[[str], int] = len,
                refusal_judge: Callable[[str], bool] = refuses, title: str = "Contest") -> dict:
    """Sample cfg.n candidates per problem with sampler, judge them under the protocol, write one
    results line per problem as it finishes (a rerun skips those there), then summary and report."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["id"]: r for r in read_results(results)}
    if (other := {r.get("protocol") for r in done.values()} - {protocol}):
        raise ValueError(f"{results} holds problems judged under {sorted(map(str, other))}, not {protocol}: "
                         "use another output folder")
    by_id = {p.id: p for p in problems}
    todo = [p.task for p in problems if p.id not in done]
    with results.open("a", encoding="utf-8") as f, \
            tqdm(total=len(todo) * cfg.n, desc="candidates", disable=not todo) as bar:
        for task, samples in sampler.sample(todo, cfg, progress=bar):
            record = judge_problem(judge, by_id[task.id], samples, protocol, cfg.thinking, submissions, measure,
                                   refusal_judge)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    summary = summarize_contest([r for r in read_results(results) if r["id"] in by_id], protocol)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(render_contest(summary, title))
    return summary
