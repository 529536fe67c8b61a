"""Kernel benchmark (GPU): every DSA kernel of dsv32/kernels against its torch reference and its
best published peer, measured side by side in one process on one GPU.

    python bench/kernels.py [--quick] [--only indexer topk ...] [--out bench/results]

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


def markdown(res: dict) -> str:
    lines = [f"# Kernels on {res['gpu']}", "",
             f"torch {res['torch']}, triton {res['triton']}, {res['date']}. Times are medians of CUDA-event "
             "timings with the L2 flushed (triton.testing.do_bench) of CUDA-graph replays (eager where a "
             "call cannot be captured), so no row pays Python launch overhead; every row of a table was "
             "measured in the same run.", ""]
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
