"""Run the long-context suite: every sample under every attention variant, one forward each, and
the summary as JSON and a markdown table."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from dsv32.eval.longctx.score import position_buckets, score_sample
from dsv32.eval.longctx.selectors import Selector
from dsv32.eval.longctx.tasks import Sample

log = logging.getLogger(__name__)


def variant_list(names: list[str], keys: list[int]) -> list[tuple[str, Selector | None]]:
    """(label, selector) per variant: dense once (selector None), each other variant at each key
    budget, e.g. "dsa k=512"."""
    out = []
    for name in names:
        if name == "dense":
            out.append(("dense", None))
        else:
            out += [(f"{name} k={k}", Selector(name, k)) for k in keys]
    return out


def model_forward(model, selector: Selector | None):
    """A model_fn (see score.py) for `model` under one variant: dense when selector is None."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        out = model(x.to(device), sparse=selector is not None, key_selector=selector)
        return out.logits[0, rows].float().cpu()
    return fn


def run_suite(model_fn_for, samples_by_length: dict[int, list[Sample]], variants, on_row=None) -> list[dict]:
    """One row per (length, variant, sample): the sample's metrics. model_fn_for(selector) gives
    the model_fn of a variant; on_row, if given, sees each row as it is scored."""
    rows = []
    for length, samples in samples_by_length.items():
        for label, selector in variants:
            fn = model_fn_for(selector)
            for s in samples:
                t = time.perf_counter()
                m = score_sample(s, fn)
                rows.append({"length": length, "variant": label, "sample": s.name, "task": s.task,
                             "seconds": round(time.perf_counter() - t, 3), **m})
                log.info("%d %s %s: %s", length, label, s.name, {k: v for k, v in m.items() if k != "nll_by_pos"})
                if on_row is not None:
                    on_row(rows[-1])
    return rows


def summarize(rows: list[dict]) -> dict:
    """Means over samples: {length: {variant: {sample name: {metric: mean}}}} (nll_by_pos per bucket)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["length"], {}).setdefault(r["variant"], {}).setdefault(r["sample"], []).append(r)
    out: dict = {}
    for length, by_var in groups.items():
        for var, by_sample in by_var.items():
            for name, rs in by_sample.items():
                keys = [k for k in rs[0] if isinstance(rs[0][k], float) and k != "seconds"]
                m = {k: sum(r[k] for r in rs) / len(rs) for k in keys}
                if "nll_by_pos" in rs[0]:
                    m["nll_by_pos"] = {b: sum(r["nll_by_pos"][b] for r in rs) / len(rs) for b in rs[0]["nll_by_pos"]}
                m["samples"] = len(rs)
                out.setdefault(str(length), {}).setdefault(var, {})[name] = m
    return out


def _cell(m: dict | None, key: str, fmt: str) -> str:
    return "—" if m is None or key not in m else format(m[key], fmt)


def markdown(summary: dict, title: str) -> str:
    """Per length: retrieval and copy table (NLL, greedy accuracy), then NLL by position."""
    lines = [f"# {title}", ""]
    for length, by_var in summary.items():
        names = sorted({n for v in by_var.values() for n in v})
        needles = [n for n in names if n.startswith("needle@")]
        n_samples = max(m["samples"] for v in by_var.values() for m in v.values())
        lines += [f"## {length} tokens ({n_samples} sample(s) per task)", "",
                  ("copy: NLL of the second copy (first copy in brackets) and share of its tokens predicted "
                   "greedily; needle, multi-key: share of answers read back exactly (greedy on every answer token), "
                   "the answer tokens' NLL in brackets."),
                  ""]
        head = ["variant", "copy random NLL", "copy random acc", "copy text NLL", "copy text acc"] + \
            needles + ["multi-key", "ppl NLL"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for var, m in by_var.items():
            cr, ct = m.get("copy_random"), m.get("copy_text")
            cells = [var,
                     f"{_cell(cr, 'nll', '.2f')} ({_cell(cr, 'ref_nll', '.2f')})", _cell(cr, "acc", ".3f"),
                     f"{_cell(ct, 'nll', '.2f')} ({_cell(ct, 'ref_nll', '.2f')})", _cell(ct, "acc", ".3f")]
            cells += [f"{_cell(m.get(n), 'correct', '.2f')} ({_cell(m.get(n), 'nll', '.2f')})"
                      for n in [*needles, "multikey"]]
            cells.append(_cell(m.get("ppl"), "nll", ".3f"))
            lines.append("| " + " | ".join(cells) + " |")
        buckets = [f"{a}-{b}" for a, b in position_buckets(int(length))]
        if any("ppl" in m for m in by_var.values()):
            lines += ["", "NLL of real text by position:", "",
                      "| variant | " + " | ".join(buckets) + " |", "|" + "---|" * (len(buckets) + 1)]
            for var, m in by_var.items():
                pos = m.get("ppl", {}).get("nll_by_pos", {})
                lines.append(f"| {var} | " + " | ".join(f"{pos[b]:.3f}" if b in pos else "—" for b in buckets) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(out: str | Path, meta: dict, rows: list[dict], title: str) -> dict:
    """results.json (meta, every row, summary) and report.md under `out`; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    (out / "results.json").write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    (out / "report.md").write_text(markdown(summary, title))
    return summary
