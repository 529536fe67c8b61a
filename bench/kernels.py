"""Kernel benchmark (GPU): every DSA kernel of dsv32/kernels against its torch reference and its
best published peer, measured side by side in one process on one GPU.

    python bench/kernels.py [--quick] [--only indexer topk ...] [--out bench/results] [--merge]

Cases live in bench/kernel_cases/<op>.py (shapes are FlashMLA's and DeepGEMM's own benchmark
shapes, kernel-anchors §1b). Writes kernels-<gpu>.json and .md; a case that fails is recorded with
its error and the run goes on.
"""

import argparse
import gc
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OPS = ("indexer", "topk", "sparse_prefill", "sparse_decode", "fp8_gemm")


def fmt(v, nd=1):
    return "" if v is None else f"{v:.{nd}f}"


def merged(res: dict, old: dict | None, only: list[str], when: str) -> dict:
    """res (this run, measuring the ops `only`) with the other ops' tables of an earlier result
    `old` kept (None: nothing kept); res["runs"] names each table's run: `when` for those measured now."""
    res = {**res, "ops": dict(res["ops"]), "runs": {}}
    if old is not None:
        runs = old.get("runs") or {op: old["date"] for op in old["ops"]}
        res["ops"] = {**{op: rows for op, rows in old["ops"].items() if op not in only}, **res["ops"]}
        res["runs"] = {op: w for op, w in runs.items() if op not in only}
    res["runs"].update({op: when for op in only})
    return res


def _runs_line(res: dict) -> str:
    """Where tables come from separate runs (--merge): the date (and label) of each."""
    runs = res.get("runs") or {}
    if len(set(runs.values())) < 2:
        return ""
    return (" Tables from separate runs of the same code on the same GPU kind: "
            + "; ".join(f"{op} {when}" for op, when in runs.items()) + ".")


def markdown(res: dict) -> str:
    lines = [f"# Kernels on {res['gpu']}", "",
             f"torch {res['torch']}, triton {res['triton']}, {res['date']}. Times are medians of CUDA-event "
             "timings with the L2 flushed (triton.testing.do_bench) of CUDA-graph replays (eager where a "
             "call cannot be captured), so no row pays Python launch overhead; every row of a table was "
             "measured in the same run." + _runs_line(res), ""]
    for op, rows in res["ops"].items():
        lines += [f"## {op}", "", "| kernel | shape | impl | µs | TFLOP/s | TB/s | note |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.get('kernel', '')} | {r.get('shape', '')} | {r.get('impl', '')} | {fmt(r.get('us'))} "
                         f"| {fmt(r.get('tflops'))} | {fmt(r.get('tbps'), 2)} | {r.get('note', '')} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--only", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other ops' tables of an earlier result file in --out (same GPU), replacing "
                         "only those measured now; each table's run date is recorded")
    ap.add_argument("--label", default="", help="with --merge: a note on this run kept beside its date")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    import triton

    gpu = torch.cuda.get_device_name()
    res = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "ops": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels-{gpu.replace(' ', '_')}"
    when = res["date"] + (f" ({args.label})" if args.label else "")
    old = json.loads(stem.with_suffix(".json").read_text()) if args.merge and stem.with_suffix(".json").exists() else None
    res = merged(res, old, args.only, when)
    for op in args.only:
        t0 = time.time()
        try:
            rows = importlib.import_module(f"bench.kernel_cases.{op}").cases(args.quick)
        except Exception as e:  # one broken op must not lose the others' numbers
            traceback.print_exc()
            rows = [{"kernel": op, "impl": "ours", "us": None, "note": f"failed: {type(e).__name__}: {e}"[:300]}]
        res["ops"][op] = rows
        gc.collect()
        torch.cuda.empty_cache()  # the next op's caches need the memory this one's allocator holds
        print(f"{op}: {len(rows)} rows in {time.time() - t0:.0f} s", flush=True)
        for r in rows:
            print("  ", json.dumps(r), flush=True)
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
        stem.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
