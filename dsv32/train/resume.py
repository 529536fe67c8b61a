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

import torch
from safetensors.torch import save_file

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
    """'name: old -> new' for each field outside `free` whose value differs (a field the saved
    config predates is not compared: the run that wrote it had no say in it)."""
    out = []
    for k in sorted(set(saved)):
        if k in free:
            continue
        a, b = saved[k], current.get(k, "(unset)")
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


def write_checkpoint(out: Path, tensors: dict[str, dict], state: dict) -> Path:
    """out/checkpoint with one NAME.safetensors per entry of `tensors` and state.json, written to a
    temporary directory and switched in by one rename: a kill leaves a complete checkpoint."""
    out = Path(out)
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, sd in tensors.items():
        save_file(sd, str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def unshared(sd: dict) -> dict:
    """CPU tensors for safetensors, which refuses shared memory: a tied weight's second name
    (e.g. lm_head.weight = embed_tokens.weight) gets a copy; loading writes the same values twice."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[k] = t
    return out


def flatten_state(sd, prefix=""):
    """Optimizer state -> (tensors for safetensors, JSON-able rest)."""
    tensors, meta = {}, {}
    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
            meta[str(k)] = {"__tensor__": key}
        elif isinstance(v, dict):
            t, m = flatten_state(v, key + ".")
            tensors.update(t)
            meta[str(k)] = {"__dict__": m, "__int_keys__": all(isinstance(x, int) for x in v)}
        else:
            meta[str(k)] = {"__value__": v}
    return tensors, meta


def unflatten_state(tensors, meta):
    out = {}
    for k, v in meta.items():
        if "__tensor__" in v:
            out[k] = tensors[v["__tensor__"]]
        elif "__dict__" in v:
            d = unflatten_state(tensors, v["__dict__"])
            out[k] = {int(a) if v["__int_keys__"] else a: b for a, b in d.items()}
        else:
            out[k] = v["__value__"]
    return out
