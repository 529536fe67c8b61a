"""metrics.png: one panel per metric of a run's metrics.jsonl, redrawn while the run goes on.

matplotlib is a dependency of dsv32; where it is missing anyway (a trimmed install), `can_plot`
says so and the runs log a line instead of a plot, since metrics.jsonl has every number.
"""

from __future__ import annotations

import json
from pathlib import Path

# (metric keys drawn together, panel title): the training panels, losses first
TRAIN_PANELS = (
    (("lm", "eval_lm"), "LM loss (train, held out)"),
    (("mtp",), "MTP loss"),
    (("indexer_kl",), "indexer KL"),
    (("topk_recall",), "DSA top-k recall (attention mass kept)"),
    (("balance",), "MoE balance loss"),
    (("lr",), "learning rate"),
    (("grad_norm", "indexer_grad_norm"), "grad norm (before clipping)"),
    (("tokens_per_s",), "tokens/s"),
)


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401  (an optional import: only its presence is asked)
    except ImportError:
        return False
    return True


def read_rows(jsonl: Path) -> list[dict]:
    """The rows of a metrics.jsonl, a torn last line (a run killed mid-write) skipped."""
    rows = []
    for line in Path(jsonl).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_metrics(jsonl: Path | list, png: Path, panels=TRAIN_PANELS, labels: list[str] | None = None,
                 xlabel: str = "step", columns: int = 4) -> bool:
    """Draw the panels that have data (several runs, a list of files, are overlaid with `labels`)
    and write png atomically (a viewer never sees half a file). False without matplotlib or data."""
    if not can_plot():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_rows(f) for f in (jsonl if isinstance(jsonl, list) else [jsonl])]
    shown = [(keys, title) for keys, title in panels if any(k in r for rows in runs for r in rows for k in keys)]
    if not shown:
        return False
    ncols = min(columns, len(shown))
    nrows = -(-len(shown) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax, (keys, title) in zip(axes.flat, shown):
        for i, rows in enumerate(runs):
            for k in keys:
                pts = [(r["step"], r[k]) for r in rows if k in r]
                if pts:
                    name = " ".join(x for x in ((labels[i] if labels else ""), k if len(keys) > 1 else "") if x)
                    ax.plot(*zip(*pts), label=name or None, marker="o" if len(pts) < 20 else None, ms=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or labels:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
    return True
