"""Engine benchmark (GPU): decode throughput and latency, batch-1 decode against the HBM roofline,
and the cost per token by context position for DSA vs dense on one full-width layer of the 671B
shape (the shape of DeepSeek's Figure 3, spec §1.6).

    python bench/engine.py [--quick]

Writes bench/results/engine-<gpu>.json, .md and .png. The model runs through the dsv32.kernels
dispatchers (Triton on CUDA); the decode sweep runs eagerly and with CUDA graphs (EngineConfig.cuda_graphs),
the layer sweep eagerly. DSA decode steps read the paged cache in place with the
paged kernels (indexer logits over the cache bytes, top-k, sparse MLA decode); prefill chunks and
dense attention gather each sequence's cache. The position sweep also times DSA decode on the
gathering path (`dsa_gathered`), which is what the paged kernels replace.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.kernel_cases import kernel_times
from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.engine.batch import Batch
from dsv32.engine.cache import PagedCache
from dsv32.model import Transformer


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


WARMUP_STEPS = 8


def decode_sweep(model, batches, contexts, steps, cuda_graphs=False):
    """Steady-state decode: B sequences prefilled to ctx tokens, then `steps` engine steps."""
    rows = []
    for ctx in contexts:
        for b in batches:
            eng = Engine(model, EngineConfig(max_num_seqs=b, num_blocks=b * (ctx // 64 + (steps + WARMUP_STEPS) // 64 + 4),
                                             max_num_batched_tokens=max(8192, ctx), prefill_chunk=4096,
                                             max_model_len=ctx + steps + WARMUP_STEPS + 64, cuda_graphs=cuda_graphs))
            g = torch.Generator().manual_seed(0)
            params = SamplingParams(temperature=0.0, max_tokens=steps + WARMUP_STEPS + 8, ignore_eos=True)
            for _ in range(b):
                eng.add_request(torch.randint(0, model.cfg.vocab_size, (ctx,), generator=g).tolist(), params)
            while any(not s.prefill_done for s in eng.scheduler.running) or eng.scheduler.waiting:
                eng.step()
            for _ in range(WARMUP_STEPS):  # Triton compiles a variant per new int specialisation
                eng.step()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            sync()
            dt = (time.perf_counter() - t0) / steps
            rows.append({"context": ctx, "batch": b, "cuda_graphs": cuda_graphs, "step_ms": round(dt * 1e3, 2),
                         "tok_s": round(b / dt, 1)})
            print(rows[-1], flush=True)
            del eng
            torch.cuda.empty_cache()
    return rows


def generate_peer(model, batches, prompt_len=128, new_tokens=128, device="cuda"):
    """Greedy generation end to end (prefill + decode), B prompts of prompt_len random tokens,
    new_tokens each: dsv32's engine eager and with CUDA graphs, and the peer, Hugging Face
    transformers' `generate` on the same weights (written by save_model, read by from_pretrained).
    -> rows {system, batch, seconds, tok_s}."""
    import tempfile

    import transformers

    from dsv32.checkpoint import save_model

    g = torch.Generator().manual_seed(0)
    rows = []

    def timed(fn):
        fn(8)  # warm-up: kernels compiled, graphs captured, allocator grown
        sync()
        t0 = time.perf_counter()
        fn(new_tokens)
        sync()
        return time.perf_counter() - t0

    for b in batches:
        prompts = torch.randint(0, model.cfg.vocab_size, (b, prompt_len), generator=g)
        for graphs in (False, True):
            eng = Engine(model, EngineConfig(max_num_seqs=b, num_blocks=b * (-(-(prompt_len + new_tokens) // 64) + 1),
                                             max_model_len=prompt_len + new_tokens + 64, cuda_graphs=graphs))

            def run(n, eng=eng):
                for p in prompts.tolist():
                    eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
                while eng.has_work():
                    eng.step()
            dt = timed(run)
            rows.append({"system": f"dsv32 engine{' + CUDA graphs' if graphs else ''}", "batch": b,
                         "seconds": round(dt, 3), "tok_s": round(b * new_tokens / dt, 1)})
            print(rows[-1], flush=True)
            del eng
    name = f"transformers {transformers.__version__} generate"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=model.embed_tokens.weight.dtype).to(device)
    except Exception as e:  # a transformers without DeepSeek-V3.2: say so in the results
        return rows + [{"system": name, "error": f"{type(e).__name__}: {e}"[:300]}]
    hf.eval()
    for b in batches:
        ids = torch.randint(0, model.cfg.vocab_size, (b, prompt_len), generator=g).to(device)

        def run(n):
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
        dt = timed(run)
        rows.append({"system": name, "batch": b,
                     "seconds": round(dt, 3), "tok_s": round(b * new_tokens / dt, 1)})
        print(rows[-1], flush=True)
    del hf
    return rows


def active_weight_bytes(model) -> int:
    """Bytes a batch-1 decode step must read: everything but the routed experts, plus k of them."""
    cfg = model.cfg
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    expert = sum(p.numel() * p.element_size() for p in model.layers[-1].mlp.experts[0].parameters())
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    mtp = sum(p.numel() * p.element_size() for p in model.mtp.parameters())
    return total - mtp - n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert


@torch.inference_mode()
def position_cost(contexts, batch=1, reps=5):
    """One full-width V3.2 layer (MLA + indexer at the 671B shape, dense FFN, tiny vocab): time of
    a decode token and of a 64-token prefill chunk at each context position, DSA vs dense."""
    cfg = preset("deepseek-v3.2").replace(num_hidden_layers=1, first_k_dense_replace=1, vocab_size=1024,
                                          num_nextn_predict_layers=0, quantization_config=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = Transformer(cfg).to(torch.bfloat16).eval()
    rows = []
    for ctx in contexts:
        cache = PagedCache(cfg, batch * (ctx // 64 + 2), 64, False, torch.bfloat16, "cuda")
        tables = [list(range(i * (ctx // 64 + 2), (i + 1) * (ctx // 64 + 2))) for i in range(batch)]
        row = {"context": ctx}
        for name, q_len in (("decode", 1), ("prefill64", 64)):
            ids = torch.randint(0, 1024, (batch, q_len), device="cuda")
            pos = torch.arange(ctx - q_len, ctx, device="cuda").expand(batch, q_len)
            step = cache.bind(Batch.build(ids, pos, tables, 64))
            variants = [("dense", False, True), ("dsa", True, True)] + \
                ([("dsa_gathered", True, False)] if name == "decode" else [])
            for mode, sparse, paged in variants:
                cache.paged_decode = paged  # decode reads the paged cache in place, or gathers it
                run = lambda: layer(ids, cache=step, positions=pos, sparse=sparse, mode="mqa")  # noqa: E731
                run()
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                sync()
                row[f"{name}_{mode}_us_per_token"] = round((time.perf_counter() - t0) / reps / (batch * q_len) * 1e6, 1)
                gpu = sum(kernel_times(run, reps).values())  # kernels only: what a CUDA-graph replay pays
                row[f"{name}_{mode}_gpu_us_per_token"] = round(gpu / (batch * q_len), 1)
        row["decode_dense_over_dsa"] = round(row["decode_dense_us_per_token"] / row["decode_dsa_us_per_token"], 2)
        row["decode_gpu_dense_over_dsa"] = round(row["decode_dense_gpu_us_per_token"]
                                                 / row["decode_dsa_gpu_us_per_token"], 2)
        row["prefill_gpu_dense_over_dsa"] = round(row["prefill64_dense_gpu_us_per_token"]
                                                  / row["prefill64_dsa_gpu_us_per_token"], 2)
        row["decode_gathered_over_paged"] = round(row["decode_dsa_gathered_us_per_token"]
                                                  / row["decode_dsa_us_per_token"], 2)
        row["prefill_dense_over_dsa"] = round(row["prefill64_dense_us_per_token"] / row["prefill64_dsa_us_per_token"], 2)
        rows.append(row)
        print(row, flush=True)
        del cache
        torch.cuda.empty_cache()
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] / 1024 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("prefill64", "decode")):
        ax.plot(ctx, [r[f"{name}_dense_us_per_token"] for r in rows], "o-", label="dense MLA")
        ax.plot(ctx, [r[f"{name}_dsa_us_per_token"] for r in rows], "o-", label="DSA (top-2048)")
        if name == "decode":
            ax.plot(ctx, [r["decode_dsa_gathered_us_per_token"] for r in rows], "o--", label="DSA, gathered cache")
        ax.set_xlabel("token position (K)")
        ax.set_ylabel("µs per token, one layer")
        ax.set_title(f"{'prefill (64-token chunks)' if name == 'prefill64' else 'decode (batch 1)'}")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Cost by position, one 671B-shape layer, dsv32 kernels (no CUDA graphs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="skip the 671B-shape layer sweep")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' generate on the same weights")
    ap.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default by --quick)")
    ap.add_argument("--contexts", type=int, nargs="+", help="decode context lengths (default by --quick)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/engine.py needs a GPU"
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(preset("small")).to(torch.bfloat16).eval()
    contexts = args.contexts or ([1024, 4096] if args.quick else [1024, 4096, 16384 - 512])
    batches = args.batches or ([1, 8, 32] if args.quick else [1, 8, 32, 64])
    decode = decode_sweep(model, batches, contexts, steps=16)
    decode += decode_sweep(model, batches, contexts, steps=16, cuda_graphs=True)
    peer = [] if args.no_peer else generate_peer(model, [1, 8])
    wbytes = active_weight_bytes(model)
    b1 = min(r["step_ms"] for r in decode if r["batch"] == 1) / 1e3  # the faster of eager and graphs
    roofline = {"active_weight_bytes": wbytes, "copy_bandwidth_TBps": round(bw / 1e12, 2),
                "batch1_step_ms": round(b1 * 1e3, 2), "roofline_step_ms": round(wbytes / bw * 1e3, 3),
                "fraction_of_roofline": round(wbytes / bw / b1, 4)}
    print(roofline, flush=True)
    del model
    torch.cuda.empty_cache()
    pos_ctx = [8192, 32768, 131072] if args.quick else [8192, 16384, 32768, 65536, 98304, 131072]
    position = [] if args.decode_only else position_cost(pos_ctx)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "engine-" + gpu.replace(" ", "_")
    res = {"bench": "engine", "device_name": gpu, "torch": torch.__version__, "preset": "small",
           "decode": decode, "generate_vs_transformers": peer, "roofline": roofline,
           "position_cost_671b_layer": position}
    (out / f"{tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    if position:
        plot(position, out / f"{tag}.png")
    md = [f"# Engine benchmark on {gpu}", "",
          "dsv32 kernels (Triton); decode sweep eager and with CUDA graphs, layer sweep eager; DSA decode reads the paged cache with the paged indexer "
          "and sparse MLA decode kernels. Model: `small` preset, bf16, random weights.", "",
          "## Decode throughput (engine steps, greedy)", "", "| context | batch | CUDA graphs | step ms | tokens/s |",
          "|---|---|---|---|---|"]
    md += [f"| {r['context']} | {r['batch']} | {'yes' if r['cuda_graphs'] else 'no'} | {r['step_ms']} | {r['tok_s']} |"
           for r in decode]
    if peer:
        md += ["", "## Generation against transformers (same weights, greedy, 128-token prompts, 128 new tokens)", "",
               "| system | batch | seconds | tokens/s |", "|---|---|---|---|"]
        md += [f"| {r['system']} | {r.get('batch', '')} | {r.get('seconds', '')} | {r.get('tok_s', r.get('error', ''))} |"
               for r in peer]
    md += ["", "## Batch-1 decode against the HBM roofline", "",
           f"Active weight bytes per step {wbytes / 1e6:.0f} MB; device-to-device copy {bw / 1e12:.2f} TB/s "
           f"(read + write, same run) -> roofline {wbytes / bw * 1e3:.3f} ms/step; measured {b1 * 1e3:.2f} ms: "
           f"**{100 * wbytes / bw / b1:.1f}% of roofline**. The step is bound by Python and kernel-launch "
           "overhead (dozens of small ops per layer, per-expert loops), which CUDA graphs and fused kernels address.",
           "", "## Cost per token by position: one 671B-shape layer (MLA 128 heads + indexer 64x128, bf16)", "",
           "| position | prefill dense µs | prefill DSA µs | dense/DSA | decode dense µs | decode DSA µs | dense/DSA "
           "| decode DSA gathered µs | gathered/paged |",
           "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['context']} | {r['prefill64_dense_us_per_token']} | {r['prefill64_dsa_us_per_token']} | "
           f"{r['prefill_dense_over_dsa']} | {r['decode_dense_us_per_token']} | {r['decode_dsa_us_per_token']} | "
           f"{r['decode_dense_over_dsa']} | {r['decode_dsa_gathered_us_per_token']} | "
           f"{r['decode_gathered_over_paged']} |" for r in position]
    md += ["", "Wall time per token above includes the host: Python and kernel launches, several ms per call of "
           "one layer at batch 1. GPU kernel time per token (torch.profiler, kernels only: what a CUDA-graph "
           "replay of the same launches would pay):", "",
           "| position | prefill dense µs | prefill DSA µs | dense/DSA | decode dense µs | decode DSA µs | dense/DSA |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {r['context']} | {r['prefill64_dense_gpu_us_per_token']} | {r['prefill64_dsa_gpu_us_per_token']} | "
           f"{r['prefill_gpu_dense_over_dsa']} | {r['decode_dense_gpu_us_per_token']} | "
           f"{r['decode_dsa_gpu_us_per_token']} | {r['decode_gpu_dense_over_dsa']} |" for r in position]
    md += ["", f"![cost by position]({tag}.png)", "",
           "DeepSeek's Figure 3 (H800, the deployed service with its kernels) has V3.2 decode 8.65x cheaper "
           "than dense at 128K and prefill 3.56x; these ratios are ours (Triton kernels, no CUDA graphs). "
           "'DSA gathered' is decode through the gathered [B, T] cache, what the paged kernels replace."]
    (out / f"{tag}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
