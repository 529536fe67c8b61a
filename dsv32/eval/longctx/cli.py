"""`dsv32 eval longctx`: long-range copy, needle, multi-key retrieval and perplexity by position,
under dense attention, DSA and the baselines at the same number of attended keys.

    dsv32 eval longctx --lengths 2048,8192 --variants dense,dsa,window,sinks,quest --out runs/longctx
    dsv32 eval longctx --model DIR --keys 256,512 --samples 4 --out runs/longctx
    dsv32 eval longctx --indexer runs/indexer/smollm2_indexer.safetensors --lengths 1024 --keys 64 --out runs/lc

Without --model it runs the default model (SmolLM2-135M-Instruct with its DSA indexers); --indexer
replaces the model's indexers with a `save_indexer` file (e.g. one experiments/smollm2_indexer.py
trained), the rest of the model as loaded. Writes results.json (every sample's metrics and the
means) and report.md (the tables) under --out, and rows.jsonl as it goes (a run cut short keeps
what it scored).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from dsv32.eval.longctx.run import model_forward, run_suite, variant_list, write_results
from dsv32.eval.longctx.selectors import VARIANTS
from dsv32.eval.longctx.tasks import DEPTHS, TASKS, LongCtxError, build_tasks


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise LongCtxError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise LongCtxError(f"{flag} takes positive integers, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 eval longctx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model for dsv32.load (default: the default model)")
    p.add_argument("--tokenizer", help="a tokenizer.json (or its directory) for --model")
    p.add_argument("--indexer", default=None, help="load the indexers from this save_indexer file (safetensors)")
    p.add_argument("--lengths", default="2048", help="comma-separated sequence lengths in tokens")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--keys", default=None, help="attended keys per query for the sparse variants, comma-separated "
                   "(default: the model's index_topk)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEPTHS), help="needle depths in [0, 1]")
    p.add_argument("--multikey-keys", type=int, default=4, help="key-value sentences in a multi-key sample")
    p.add_argument("--samples", type=int, default=1, help="samples of each task (and needle depth) per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="output folder: results.json, report.md")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        lengths = _ints(args.lengths, "--lengths")
        variants = [v for v in args.variants.split(",") if v]
        bad = [v for v in variants if v not in VARIANTS]
        if bad or not variants:
            raise LongCtxError(f"unknown variant(s) {', '.join(bad) or '(none)'}; the variants are {', '.join(VARIANTS)}")
        tasks = [t for t in args.tasks.split(",") if t]
        depths = [float(d) for d in args.depths.split(",") if d]
        keys = _ints(args.keys, "--keys") if args.keys else None
        if args.samples < 1 or args.multikey_keys < 1:
            raise LongCtxError(f"--samples and --multikey-keys must be >= 1, got {args.samples} and {args.multikey_keys}")
    except (LongCtxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the composition root, a layer above eval (as in eval/cli.py)
    from safetensors import SafetensorError

    from dsv32.checkpoint import CheckpointError, load_indexer
    from dsv32.loader import load

    model, tok = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    if args.indexer:
        try:
            load_indexer(model, args.indexer)
        except (CheckpointError, SafetensorError, OSError) as e:
            print(f"error: --indexer {args.indexer}: {e}", file=sys.stderr)
            return 2
    if tok is None:
        print("error: the model has no tokenizer; pass --tokenizer", file=sys.stderr)
        return 2
    limit = model.cfg.max_position_embeddings
    if max(lengths) > limit:
        print(f"error: length {max(lengths)} exceeds the model's max_position_embeddings={limit}", file=sys.stderr)
        return 2
    keys = keys or [model.cfg.index_topk]
    try:
        samples = {n: build_tasks(tok, n, args.seed, args.samples, tasks, depths, args.multikey_keys) for n in lengths}
        chosen = variant_list(variants, keys)
    except (LongCtxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = (out / "rows.jsonl").open("w")  # each row as it comes, for a run cut short

    def keep(row: dict) -> None:
        partial.write(json.dumps(row) + "\n")
        partial.flush()

    start = time.perf_counter()
    with partial:
        rows = run_suite(lambda sel: model_forward(model, sel), samples, chosen, keep)
    wall = time.perf_counter() - start
    what = args.model or "the default model"
    meta = {"model": what, "indexer": args.indexer, "lengths": lengths, "keys": keys, "variants": [v for v, _ in chosen], "tasks": tasks,
            "depths": depths, "samples": args.samples, "seed": args.seed, "device": str(next(model.parameters()).device),
            "wall_s": round(wall, 1)}
    write_results(args.out, meta, rows, f"Long-context suite: {what}, keys {','.join(map(str, keys))}")
    print(f"{len(rows)} forwards in {wall:.0f} s; report in {args.out}/report.md")
    return 0
