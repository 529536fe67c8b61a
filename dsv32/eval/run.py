"""An evaluation run: sample n completions per task, grade each, write one results line per
task as it finishes (a rerun with the same output folder skips the tasks already there), then
the report.

out_dir/results.jsonl   one task a line: id, n, correct, and per sample its verdict and text
out_dir/summary.json    the report's numbers
out_dir/report.md       pass@k with standard errors, verdicts, lengths
"""

import json
from pathlib import Path

from tqdm import tqdm

from dsv32.eval.code import CodeJudge, grade_code
from dsv32.eval.grade import GradingWorker, grade
from dsv32.eval.reply import split_reply
from dsv32.eval.report import read_results, render, summarize
from dsv32.eval.sample import SamplingConfig
from dsv32.eval.tasks import Task


def _record(task: Task, samples, cfg: SamplingConfig, worker: GradingWorker, judge: CodeJudge | None) -> dict:
    rows = []
    for s in samples:
        if task.grader == "code":
            g = grade_code(judge, s.text, task.tests, cfg.thinking, task.time_limit, task.memory_mb)
        else:
            g = grade(worker, s.text, task.grader, task.answer, task.entry, thinking=cfg.thinking)
        reasoning, answer = split_reply(s.text, cfg.thinking)
        rows.append({"status": g.status, "score": g.score, "extracted": g.extracted, "detail": g.detail,
                     "finish_reason": s.finish_reason, "num_tokens": s.num_tokens,
                     "thinking_chars": len(reasoning), "answer_chars": len(answer or ""), "text": s.text,
                     **({"tests": list(g.tests)} if task.grader == "code" else {})})
    return {"id": task.id, "answer": task.answer, "grader": task.grader, "n": len(rows),
            "correct": sum(r["status"] == "correct" for r in rows), "samples": rows}


def run_eval(tasks: list[Task], sampler, cfg: SamplingConfig, out_dir: str | Path, ks: list[int],
             grade_timeout: float = 30.0, title: str = "Evaluation", judge: CodeJudge | None = None) -> dict:
    """Evaluate tasks with sampler (an EngineSampler or EndpointSampler); returns the summary.
    Code tasks are run by `judge` (a CodeJudge: its sandbox), which they require."""
    if judge is None and (code := [t.id for t in tasks if t.grader == "code"]):
        raise ValueError(f"task {code[0]!r} is graded by running code, which needs a CodeJudge (its sandbox)")
    if any(k > cfg.n for k in ks):
        raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples per task, but n={cfg.n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["id"]: r["n"] for r in read_results(results)}
    if (other := {n for n in done.values()} - {cfg.n}):
        raise ValueError(f"{results} holds tasks sampled with n={sorted(other)}, not n={cfg.n}: "
                         "use another output folder")
    todo = [t for t in tasks if t.id not in done]
    with GradingWorker(grade_timeout) as worker, results.open("a", encoding="utf-8") as f, \
            tqdm(total=len(todo) * cfg.n, desc="samples", disable=not todo) as bar:
        for task, samples in sampler.sample(todo, cfg, progress=bar):
            f.write(json.dumps(_record(task, samples, cfg, worker, judge), ensure_ascii=False) + "\n")
            f.flush()
    ids = {t.id for t in tasks}
    summary = summarize([r for r in read_results(results) if r["id"] in ids], ks)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(render(summary, title))
    return summary
