"""Scale-out benchmark (issue 9): the full 671B DeepSeek-V3.2 shape with tensor-parallel attention
and expert-parallel MoE on one node, from a randomly initialised checkpoint in the official FP8
layout written by our own save code.

    # 1. write the checkpoint once, tensor by tensor (never holding the model; ~690 GB for 61 layers)
    python bench/scale.py write --out DIR [--num-layers N] [--device cuda]
    # 2. load it on 8 GPUs and measure load time, peak memory, prefill and decode throughput
    torchrun --nproc-per-node 8 bench/scale.py run --ckpt DIR
    # a CPU check of the whole script (gloo, 2 processes, a shrunken `small`, tiny lengths)
    torchrun --nproc-per-node 2 bench/scale.py run --preset small --dry

`run` writes bench/results/scale-<name>.json and .md. Everything is the plain-torch path (FP8
weights dequantised per call, no custom kernels, no CUDA graphs): it measures what the reference
code does at full scale, next to the published numbers for the real model (kernel-anchors §2.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dsv32.checkpoint import save_random
from dsv32.config import ModelConfig, preset
from dsv32.engine import EngineConfig, SamplingParams
from dsv32.model import Transformer
from dsv32.parallel import init_distributed, make_parallel
from dsv32.parallel.engine import distributed_engine, follow
from dsv32.parallel.load import load_sharded

RESULTS = Path(__file__).parent / "results"
PREFILL = (4096, 32768, 131072)
BATCHES = (1, 8, 32, 128)
# published end-to-end numbers for the real model (spec/kernel-anchors.md §2.5)
ANCHORS = [
    ("vLLM recipe, V3.2 TP8, 8xH20", "random 2048-in/1024-out at 10 RPS: 791 output tok/s (peak 1300), TPOT 99.7 ms"),
    ("SGLang docs, V3.2, 8xH200 (hardware implied)", "gsm8k accuracy run: 5226 output tok/s"),
    ("Tuned SGLang V3.2, 8xH200 (GPUStack)", "ShareGPT 8968 total tok/s; generation-heavy 3704 tok/s at TPOT 39 ms"),
    ("DeepSeek production V3/R1 (pre-DSA), 8xH800 node", "73.7k input tok/s, 14.8k output tok/s per node"),
]


def bench_config(name: str, num_layers: int | None) -> ModelConfig:
    cfg = preset(name)
    if cfg.quantization_config is None:  # our presets: the official FP8 layout on disk
        cfg = cfg.replace(torch_dtype="bfloat16")
    if num_layers is not None:
        cfg = cfg.replace(num_hidden_layers=num_layers, first_k_dense_replace=min(cfg.first_k_dense_replace, num_layers))
    return cfg


def checkpoint_bytes(cfg: ModelConfig) -> int:
    """On-disk size: FP8 matrices (plus one fp32 scale per 128x128 block), bf16 for the rest."""
    from dsv32.checkpoint import hf_name, is_fp8_weight

    with torch.device("meta"):
        sd = Transformer(cfg).state_dict()
    total = 0
    for name, t in sd.items():
        if is_fp8_weight(hf_name(name, cfg)):
            total += t.numel() + 4 * -(-t.shape[0] // 128) * -(-t.shape[1] // 128)
        else:
            total += 2 * t.numel()
    return total + 4 * cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size  # MTP copies


def write(args) -> None:
    cfg = bench_config(args.preset, args.num_layers)
    need, free = checkpoint_bytes(cfg), shutil.disk_usage(Path(args.out).resolve().parent).free
    print(f"{args.preset} with {cfg.num_hidden_layers} layers: {need / 1e9:.1f} GB; {free / 1e9:.1f} GB free")
    if need > free * 0.98:
        per_layer = (checkpoint_bytes(cfg.replace(num_hidden_layers=cfg.num_hidden_layers + 1)) - need)
        fit = cfg.num_hidden_layers - int(-(-(need - free * 0.95) // per_layer))
        raise SystemExit(f"not enough disk: {need / 1e9:.0f} GB needed, {free / 1e9:.0f} GB free; "
                         f"--num-layers {max(fit, 1)} fits")
    t0 = time.perf_counter()
    total = save_random(cfg, args.out, fp8=True, seed=0, device=args.device, max_shard_bytes=5 << 30)
    print(f"wrote {total / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s to {args.out}")


def peak_memory(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak RSS, GiB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_rate(engine, length: int, vocab: int) -> float:
    """Tokens/s for one prompt of `length` tokens (chunked prefill, DSA), to its first token."""
    prompt = torch.randint(2, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    sync(engine.device)
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    sync(engine.device)
    return length / (time.perf_counter() - t0)


def decode_rate(engine, batch: int, context: int, steps: int, vocab: int) -> float:
    """Output tokens/s of `batch` sequences decoding together at `context` tokens (DSA selects
    index_topk of them). They share their prompt through the prefix cache, so one prefill serves all."""
    prompt = torch.randint(2, vocab, (context,), generator=torch.Generator().manual_seed(7)).tolist()
    engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_work():
        engine.step()
    seqs = [engine.add_request(prompt + [2 + i % (vocab - 2)], SamplingParams(max_tokens=steps + 2, ignore_eos=True))
            for i in range(batch)]
    while not all(s.prefill_done and len(s.output_tokens) >= 1 for s in seqs):
        engine.step()
    sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    dt = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    return batch * steps / dt


def run(args) -> None:
    device = init_distributed("cpu" if args.dry else args.device)
    world, rank = dist.get_world_size(), dist.get_rank()
    lengths, batches, context, steps = PREFILL, BATCHES, args.decode_context, args.decode_steps
    ckpt = Path(args.ckpt) if args.ckpt else None
    if args.dry:  # prove the script on CPU: a shrunken model, tiny lengths
        lengths, batches, context, steps = (64, 128, 256), (1, 2, 4), 48, 3
        ckpt = ckpt or Path("runs") / f"scale-dry-{args.preset}"
        if rank == 0:
            save_random(bench_config(args.preset, args.num_layers or 2), ckpt, fp8=True, max_shard_bytes=64 << 20)
        dist.barrier()
    if ckpt is None or not (ckpt / "config.json").exists():
        raise SystemExit("run needs --ckpt DIR written by `bench/scale.py write` (or --dry)")
    cfg = ModelConfig.load(ckpt)
    dtype = torch.float32 if args.dry else torch.bfloat16
    par = make_parallel(world, world)
    sync(device)
    t0 = time.perf_counter()
    model = load_sharded(ckpt, par, dtype, device, fp8=True)
    sync(device)
    dist.barrier()
    load_s = time.perf_counter() - t0
    weights_gib = peak_memory(device)
    bs = 64
    num_blocks = max(max(lengths) // bs + 4, context // bs + max(batches) * (2 + (steps + 2) // bs) + 4)
    ec = EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(args.prefill_chunk, max(batches)),
                      prefill_chunk=args.prefill_chunk, block_size=bs, num_blocks=num_blocks,
                      max_model_len=max(max(lengths), context + steps + 4) + 1)
    engine = distributed_engine(model, ec)
    if rank > 0:
        follow(engine)
        result = None
    else:
        result = {"prefill_tokens_per_s": {}, "decode_tokens_per_s": {}}
        for n in lengths:
            result["prefill_tokens_per_s"][n] = prefill_rate(engine, n, cfg.vocab_size)
            print(f"prefill {n}: {result['prefill_tokens_per_s'][n]:.1f} tok/s", flush=True)
        for b in batches:
            result["decode_tokens_per_s"][b] = decode_rate(engine, b, context, steps, cfg.vocab_size)
            print(f"decode batch {b}: {result['decode_tokens_per_s'][b]:.2f} tok/s", flush=True)
        engine.runner.stop()
    peaks = [None] * world
    dist.all_gather_object(peaks, {"load_s": load_s, "weights_gib": weights_gib, "peak_gib": peak_memory(device)})
    if rank == 0:
        report(args, cfg, device, world, peaks, result, context, steps)
    dist.destroy_process_group()


def report(args, cfg, device, world, peaks, result, context, steps) -> None:
    name = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    tag = f"{args.preset}-L{cfg.num_hidden_layers}-{world}x{name}" + ("-dry" if args.dry else "")
    data = {"preset": args.preset, "num_hidden_layers": cfg.num_hidden_layers, "tp": world, "ep": world,
            "device": name, "dry": args.dry, "fp8_weights": True, "prefill_chunk": args.prefill_chunk,
            "decode_context": context, "decode_steps": steps, "index_topk": cfg.index_topk,
            "load_s_max": max(p["load_s"] for p in peaks),
            "weights_gib_per_rank": [round(p["weights_gib"], 2) for p in peaks],
            "peak_gib_per_rank": [round(p["peak_gib"], 2) for p in peaks], **result,
            "published": dict(ANCHORS)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scale-{tag}.json").write_text(json.dumps(data, indent=1) + "\n")
    mem = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS (CPU)"
    lines = [f"# Scale-out: {args.preset}, {cfg.num_hidden_layers} layers, TP={world} EP={world}, {name}"
             + (" (dry run: shrunken model and lengths)" if args.dry else ""), "",
             "Random weights in the official FP8 layout, kept FP8 and dequantised per call; plain-torch",
             "path (no custom kernels, no CUDA graphs); DSA on (index_topk "
             f"{cfg.index_topk}); chunked prefill of {args.prefill_chunk} tokens.", "",
             f"- load time (slowest rank): {data['load_s_max']:.1f} s",
             f"- {mem} per rank after loading: {', '.join(f'{g:.1f}' for g in data['weights_gib_per_rank'])} GiB",
             f"- {mem} per rank, whole run: {', '.join(f'{g:.1f}' for g in data['peak_gib_per_rank'])} GiB", "",
             "| prefill length | tokens/s |", "|---|---|"]
    lines += [f"| {n} | {v:.1f} |" for n, v in result["prefill_tokens_per_s"].items()]
    lines += ["", f"| decode batch (context {context}) | output tokens/s |", "|---|---|"]
    lines += [f"| {b} | {v:.2f} |" for b, v in result["decode_tokens_per_s"].items()]
    lines += ["", "Published numbers for the real model (kernel-anchors §2.5; other hardware, kernels and",
              "workloads, so context rather than a like-for-like comparison):", ""]
    lines += [f"- {k}: {v}" for k, v in ANCHORS]
    (RESULTS / f"scale-{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / f'scale-{tag}'}.json/.md")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a random FP8 checkpoint of the preset")
    w.add_argument("--out", required=True)
    w.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to draw and quantise the weights (cuda is much faster)")
    r = sub.add_parser("run", help="load under torchrun and measure")
    r.add_argument("--ckpt", default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--dry", action="store_true", help="CPU check: shrunken model, tiny lengths, writes its own checkpoint")
    r.add_argument("--prefill-chunk", type=int, default=1024)
    r.add_argument("--decode-context", type=int, default=4096, help="> index_topk, so DSA selects")
    r.add_argument("--decode-steps", type=int, default=8)
    for q in (w, r):
        q.add_argument("--preset", default="deepseek-v3.2")
        q.add_argument("--num-layers", type=int, default=None, help="fewer layers of the full width (to fit a disk)")
    args = p.parse_args()
    write(args) if args.cmd == "write" else run(args)


if __name__ == "__main__":
    main()
