"""The report of an evaluation, computed from its results file alone (so a resumed run reports
every task, old and new): pass@k with standard errors, verdict counts, reasoning and answer lengths."""

import json
import statistics
from pathlib import Path

from dsv32.eval.grade import STATUSES
from dsv32.eval.passk import aggregate


def read_results(path: str | Path) -> list[dict]:
    """The task records of a results JSONL (one line per task)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _stats(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "max": 0}
    return {"mean": statistics.mean(values), "median": statistics.median(values), "max": max(values)}


def summarize(records: list[dict], ks: list[int]) -> dict:
    """pass@k per k (k beyond a task's samples is left out), verdict counts, length stats (chars)."""
    counts = [(r["n"], r["correct"]) for r in records]
    n_min = min((n for n, _ in counts), default=0)
    passk = {k: vars(aggregate(counts, k)) for k in ks if records and k <= n_min}
    samples = [s for r in records for s in r["samples"]]
    verdicts = {status: sum(s["status"] == status for s in samples) for status in STATUSES}
    return {"tasks": len(records), "samples": len(samples), "pass_at_k": passk, "verdicts": verdicts,
            "thinking_chars": _stats([s["thinking_chars"] for s in samples]),
            "answer_chars": _stats([s["answer_chars"] for s in samples if s["status"] != "truncated"])}


def render(summary: dict, title: str = "Evaluation") -> str:
    """Markdown for a summary."""
    lines = [f"# {title}", "", f"{summary['tasks']} tasks, {summary['samples']} samples.", "",
             "| k | pass@k | standard error | tasks |", "|---|---|---|---|"]
    for k, p in summary["pass_at_k"].items():
        lines.append(f"| {k} | {p['mean']:.4f} | {p['stderr']:.4f} | {p['tasks']} |")
    v = summary["verdicts"]
    lines += ["", "| verdict | samples |", "|---|---|"] + [f"| {s} | {c} |" for s, c in v.items()]
    lines += ["", f"Truncated samples (thinking never closed within the token budget) are counted as "
              f"wrong and not graded: {v['truncated']} of {summary['samples']}.", "",
              "| length (chars) | mean | median | max |", "|---|---|---|---|"]
    for name in ("thinking_chars", "answer_chars"):
        s = summary[name]
        lines.append(f"| {name.removesuffix('_chars')} | {s['mean']:.1f} | {s['median']:.1f} | {s['max']} |")
    return "\n".join(lines) + "\n"
