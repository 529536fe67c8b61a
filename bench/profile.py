"""Profile one launch of a DSA kernel under Nsight Compute (GPU): where the time of a kernel that
misses its target goes.

    ncu --profile-from-start off --clock-control none --set full -o prefill \
        python bench/profile.py sparse_prefill

Each case builds its inputs at a bench/kernels.py shape and runs the op once outside the profiled
range (Triton autotunes and compiles there), then once between cudaProfilerStart/Stop, so the report
holds exactly that op's kernels. `--time` instead prints each kernel's CUDA-event time per
launch without ncu (the split of a multi-kernel op such as top-k).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.kernel_cases import kernel_times


def sparse_prefill():
    from bench.kernel_cases.sparse_prefill import D_QK, D_V, _inputs
    from dsv32.kernels import sparse_mla as sm

    q, kv, idx = _inputs(32768)
    return {"ours": lambda: sm.sparse_mla_fwd(q, kv, idx, D_QK ** -0.5, D_V),
            "flashmla": _flashmla_prefill(q, kv, idx)}


def _flashmla_prefill(q, kv, idx):
    try:
        import flash_mla
    except ImportError:
        return None
    from bench.kernel_cases.sparse_prefill import D_QK, D_V
    kv3, idx3 = kv.unsqueeze(1), idx.unsqueeze(1)
    return lambda: flash_mla.flash_mla_sparse_fwd(q, kv3, idx3, D_QK ** -0.5, d_v=D_V, use_legacy=True)


def sparse_decode():
    from bench.kernel_cases.sparse_decode import (
        SCALE,
        build_caches,
        flashmla_calls,
        make_inputs,
    )
    from dsv32.kernels.sparse_mla_decode import sparse_mla_decode_triton

    cache = build_caches(64 * 32768)["fp8"]
    q, idx = make_inputs(64, 2, 32768)
    peer, _ = flashmla_calls(q, cache, idx, "fp8")
    return {"ours": lambda: sparse_mla_decode_triton(q, cache, idx, SCALE), "flashmla": peer}


def indexer_decode():
    from bench.kernel_cases.indexer import BLOCK, _decode_inputs
    from dsv32.kernels import indexer as ix

    q8, w, cache, table, lens, qs = _decode_inputs(64, 131072)
    return {"ours": lambda: ix.indexer_logits_paged(q8, w, cache, table, lens, qs, BLOCK)}


def topk():
    from dsv32.kernels import topk as tk

    g = torch.Generator(device="cuda").manual_seed(0)
    cases = {}
    for r in (1, 8, 4096):
        x = torch.randn(r, 131072, device="cuda", generator=g)
        cases[f"rows={r}"] = lambda x=x: tk.topk(x, 2048)
        cases[f"rows={r} torch.topk"] = lambda x=x: torch.topk(x, 2048, dim=-1)
    return cases


def layer_decode():
    """One 671B-shape layer (bench/engine.py's position sweep) decoding one token at 32K, dense and DSA."""
    from dsv32.config import preset
    from dsv32.engine.batch import Batch
    from dsv32.engine.cache import PagedCache
    from dsv32.model import Transformer

    cfg = preset("deepseek-v3.2").replace(num_hidden_layers=1, first_k_dense_replace=1, vocab_size=1024,
                                          num_nextn_predict_layers=0, quantization_config=None)
    ctx = 32768
    with torch.device("cuda"):
        layer = Transformer(cfg).to(torch.bfloat16).eval()
    cache = PagedCache(cfg, ctx // 64 + 2, 64, False, torch.bfloat16, "cuda")
    ids = torch.randint(0, 1024, (1, 1), device="cuda")
    pos = torch.tensor([[ctx - 1]], device="cuda")
    step = cache.bind(Batch.build(ids, pos, [list(range(ctx // 64 + 2))], 64))

    def run(sparse):
        with torch.inference_mode():
            return layer(ids, cache=step, positions=pos, sparse=sparse, mode="mqa")
    return {"dense": lambda: run(False), "dsa": lambda: run(True)}


def engine_step():
    """One engine decode step of the `small` preset (bf16, random weights), batch 1 at 1K context,
    as bench/engine.py's decode sweep times it."""
    from dsv32.config import preset
    from dsv32.engine import Engine, EngineConfig, SamplingParams
    from dsv32.model import Transformer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(preset("small")).to(torch.bfloat16).eval()
    eng = Engine(model, EngineConfig(max_num_seqs=1, num_blocks=64, max_num_batched_tokens=8192, prefill_chunk=4096))
    eng.add_request(torch.randint(0, model.cfg.vocab_size, (1024,)).tolist(),
                    SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
    for _ in range(12):  # prefill, then decode steps past every compile
        eng.step()
    return {"decode": eng.step}


CASES = {f.__name__: f for f in (sparse_prefill, sparse_decode, indexer_decode, topk, layer_decode, engine_step)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--impl", default=None, help="only this implementation of the case (default: all)")
    ap.add_argument("--time", action="store_true", help="per-kernel times instead of a profiled launch")
    ap.add_argument("--table", action="store_true", help="torch.profiler tables (CPU and CUDA time by op)")
    args = ap.parse_args()
    fns = {k: f for k, f in CASES[args.case]().items() if f is not None and (args.impl in (None, k))}
    for f in fns.values():
        f()  # autotune, compile, allocate: all outside the profiled range
    torch.cuda.synchronize()
    if args.table:
        from torch.profiler import ProfilerActivity, profile
        for name, f in fns.items():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    f()
                torch.cuda.synchronize()
            for key in ("cpu_time_total", "cuda_time_total"):
                print(f"== {args.case} {name}: by {key} (5 calls)")
                print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))
        return
    if args.time:
        for name, f in fns.items():
            for kernel, us in kernel_times(f).items():
                print(f"{args.case:15s} {name:22s} {us:9.1f} us  {kernel[:90]}")
        return
    torch.cuda.cudart().cudaProfilerStart()
    for f in fns.values():
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
