"""What a rerun of a run directory continues from, and what it refuses to.

A run directory (`--out`) holds `checkpoint/state.json` (the step and the config that wrote it) and
`metrics.jsonl` (one row per step). Rerunning the same command resumes from the checkpoint:
- a config that differs from the checkpoint's in a field that changes the run (`CHANGES_RUN`:
  anything but how long it runs, how often it saves or logs, and where) is refused with the
  fields named, unless `--overwrite` (delete the old run, start fresh) or `--no-resume` (start
  fresh, the old checkpoint left until the first new one replaces it);
- metrics.jsonl is cut back to the checkpoint's step, so the steps the killed run logged after it
  and the resumed run logs again appear once.
The trainer and the RL trainer both run through `prepare`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

RESUME_MODES = ("auto", "no", "overwrite")
# fields that may change between a run and its resumption: length, bookkeeping, placement
FREE_FIELDS = {"steps", "checkpoint_every", "device", "out", "activation_checkpointing", "eval_every",
               "eval_batches", "plot_every", "rollouts_per_step"}
RUN_FILES = ("checkpoint", "checkpoint.tmp", "checkpoint.old", "metrics.jsonl", "metrics.png", "rollouts.jsonl")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a training loop, with where it stopped and how to go on as its message."""


def interrupted(step: int, total: int, saved: int | None, out: Path) -> Interrupted:
    where = (f"the last checkpoint is step {saved} in {out / 'checkpoint'}: rerun the same command to resume "
             "from it" if saved else f"no checkpoint yet in {out} (--checkpoint-every sets how often): a rerun "
             "starts over")
    return Interrupted(f"stopped at step {step} of {total}; {where}")


def config_changes(saved: dict, current: dict, free=FREE_FIELDS) -> list[str]:
    """'name: old -> new' for each field outside `free` whose value differs."""
    out = []
    for k in sorted(set(saved) | set(current)):
        if k in free:
            continue
        a, b = saved.get(k, "(unset)"), current.get(k, "(unset)")
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def checkpoint_state(out: Path) -> dict | None:
    """The checkpoint's state.json, or None without a complete checkpoint."""
    state = Path(out) / "checkpoint" / "state.json"
    return json.loads(state.read_text()) if state.is_file() else None


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to and including `step` (a torn last line is dropped)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(x + "\n" for x in keep))


def prepare(out: Path, config: dict, mode: str | bool = "auto", metrics_files=("metrics.jsonl",)) -> bool:
    """Get run directory `out` ready for a run of `config` (its asdict) under resume `mode`:
    "auto" (or True) resumes from a checkpoint whose config agrees (else raises, naming the
    fields), "no" (or False) starts fresh over the old files, "overwrite" deletes them first.
    Returns whether the caller should load the checkpoint. Metrics files are trimmed to the
    checkpoint's step (resume) or emptied (a fresh start)."""
    mode = {True: "auto", False: "no"}.get(mode, mode)
    if mode not in RESUME_MODES:
        raise ValueError(f"resume mode must be one of {', '.join(RESUME_MODES)}, got {mode!r}")
    out = Path(out)
    if mode == "overwrite":
        for name in RUN_FILES:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    state = checkpoint_state(out) if mode == "auto" else None
    if state is not None:
        changes = config_changes(state.get("config", {}), config)
        if changes:
            raise ValueError(f"{out / 'checkpoint'} was written with another config ({'; '.join(changes)}): "
                             "rerun with --overwrite to start fresh, --no-resume to start fresh keeping "
                             "the old checkpoint until the first new one, or the old values to resume")
    out.mkdir(parents=True, exist_ok=True)
    for name in metrics_files:
        if state is not None:
            trim_metrics(out / name, state["step"])
        else:
            (out / name).write_text("")
    return state is not None
