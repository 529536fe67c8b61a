"""Forward throughput of a preset, dense attention vs DSA, at growing sequence length.

    python bench/model_forward.py --preset tiny                 # CPU
    python bench/model_forward.py --preset small --device cuda  # GPU (bf16)

Writes bench/results/model_forward-<device>.json and .md. These are the plain-torch paths: DSA
here still scores every key in the indexer and, in MHA mode, masks a dense score matrix, so it only
shows the cost of selection until the sparse kernels land (issue: DSA kernels).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dsv32.config import preset
from dsv32.model import Transformer


def timed(fn, device, reps):
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--index-topk", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    cfg = preset(args.preset)
    if args.index_topk:
        cfg = cfg.replace(index_topk=args.index_topk)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else (
        [256, 512, 1024, 2048, 4096] if args.device == "cuda" else [64, 128, 256, 512, 1023])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Transformer(cfg).to(dtype).eval()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    rows = []
    for s in seqs:
        if s + 1 > cfg.max_position_embeddings:
            continue
        ids = torch.randint(0, cfg.vocab_size, (1, s), device=args.device)
        row = {"seq": s}
        for name, sparse, mode in [("dense_mha", False, "mha"), ("dsa_mha", True, "mha"), ("dsa_mqa", True, "mqa")]:
            try:
                with torch.inference_mode():
                    t = timed(lambda: model(ids, sparse=sparse, mode=mode), args.device, args.reps)
                row[name + "_tok_s"] = round(s / t, 1)
            except torch.OutOfMemoryError:
                row[name + "_tok_s"] = None
                torch.cuda.empty_cache()
        # one decode step at context length s (absorbed MQA over the cache), dense vs DSA
        with torch.inference_mode():
            cache = model.new_cache(1, s + 1)
            model(ids, cache=cache)
            nxt = ids[:, :1]
            for name, sparse in [("decode_dense", False), ("decode_dsa", True)]:
                t = timed(lambda: model(nxt, start_pos=s, cache=cache, sparse=sparse, mode="mqa"),
                          args.device, args.reps * 3)
                row[name + "_tok_s"] = round(1 / t, 1)
            del cache
        rows.append(row)
        print(row, flush=True)
    res = {"bench": "model_forward", "preset": args.preset, "index_topk": cfg.index_topk,
           "device": args.device, "device_name": gpu, "dtype": str(dtype), "torch": torch.__version__,
           "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"model_forward-{args.preset}-{args.device}"
    (out / f"{tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Forward throughput: preset `{args.preset}` on {gpu} ({dtype}), index_topk={cfg.index_topk}", "",
             "Plain-torch paths (no kernels yet), tokens/s.", "",
             "Prefill columns: one forward over [1, seq]. Decode columns: one token at context seq, "
             "absorbed MQA over the cache (batch 1).", "",
             "| seq | prefill dense MHA | prefill DSA MHA | prefill DSA MQA | decode dense | decode DSA |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['seq']} | {r['dense_mha_tok_s']} | {r['dsa_mha_tok_s']} | {r['dsa_mqa_tok_s']} | "
              f"{r['decode_dense_tok_s']} | {r['decode_dsa_tok_s']} |" for r in rows]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
