"""Sparse MLA decode at FlashMLA's benchmark shapes (kernel-anchors §1b, §4): h=128, topk=2048,
s_q=2, b in {1, 2, 64, 128}, s_k in {32K, 128K} (plus b=64 at s_q=1), FP8-656 and bf16 caches.

Ours vs the torch reference vs FlashMLA (sgl-flash-mla): its sparse decode for FP8 KV, and its
sparse prefill kernel for bf16 KV (FlashMLA has no bf16 sparse decode). Every sequence owns s_k
cache slots; each query picks topk unique ones of its own. FLOPs = 2*b*s_q*h*topk*(576+512);
bytes = the selected cache rows + q + out (FlashMLA's formulas).
"""

from functools import partial

import torch

from bench.kernel_cases import time_us
from dsv32.engine.cache import _quant_rows
from dsv32.kernels.sparse_mla_decode import auto_num_splits, sparse_mla_decode_ref, sparse_mla_decode_triton

H, TOPK, D, D_V = 128, 2048, 576, 512
SCALE = D ** -0.5
CHUNK = 1 << 20  # cache rows generated at a time


def build_caches(num_slots: int) -> dict[str, torch.Tensor]:
    """Random latents as a bf16 cache [num_slots, 576] and the same quantised to FP8 [num_slots, 656]."""
    bf16 = torch.empty(num_slots, D, dtype=torch.bfloat16, device="cuda")
    fp8 = torch.empty(num_slots, 656, dtype=torch.uint8, device="cuda")
    for i in range(0, num_slots, CHUNK):
        kv = torch.randn(min(CHUNK, num_slots - i), D, device="cuda").to(torch.bfloat16)
        bf16[i:i + len(kv)] = kv
        fp8[i:i + len(kv)] = torch.cat([_quant_rows(kv[:, :D_V], 128), kv[:, D_V:].contiguous().view(torch.uint8)], -1)
    return {"bf16": bf16, "fp8": fp8}


def make_inputs(b: int, s_q: int, s_k: int):
    """q [b, s_q, H, 576] and global slots [b, s_q, TOPK]: sequence i owns slots [i*s_k, (i+1)*s_k)."""
    q = torch.randn(b, s_q, H, D, device="cuda").to(torch.bfloat16)
    own = torch.rand(b * s_q, s_k, device="cuda").topk(TOPK, -1).indices.view(b, s_q, TOPK)
    idx = own + s_k * torch.arange(b, device="cuda")[:, None, None]
    return q, idx.to(torch.int32)


def flashmla_calls(q, cache, idx, kv):
    """FlashMLA's call for this cache (kernel-anchors §1b), or the reason there is none."""
    try:
        import flash_mla
    except ImportError as e:
        return None, f"flash_mla not importable ({e}); pip install sgl-flash-mla --no-deps"
    b, s_q = idx.shape[:2]
    if kv == "fp8":
        sched, _ = flash_mla.get_mla_metadata()
        blocks = cache.view(torch.float8_e4m3fn).view(-1, 64, 1, 656)
        return (lambda: flash_mla.flash_mla_with_kvcache(
            q, blocks, None, None, D_V, sched, None, softmax_scale=SCALE, causal=False,
            is_fp8_kvcache=True, indices=idx, use_legacy=True)), "sparse decode (FP8 KV)"
    q3, kv3, idx3 = q.view(b * s_q, H, D), cache.view(-1, 1, D), idx.view(b * s_q, 1, TOPK)
    return (lambda: flash_mla.flash_mla_sparse_fwd(q3, kv3, idx3, SCALE, d_v=D_V, use_legacy=True)), \
        "sparse prefill kernel on bf16 KV (no split-KV)"


def cases(quick: bool) -> list[dict]:
    shapes = [(1, 2, 32768), (64, 2, 32768)] if quick else \
        [(b, 2, s_k) for s_k in (32768, 131072) for b in (1, 2, 64, 128)] + [(64, 1, 32768)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for s_k in sorted({s for *_, s in shapes}):
        caches = build_caches(max(b for b, _, s in shapes if s == s_k) * s_k)
        for b, s_q, _ in (sh for sh in shapes if sh[2] == s_k):
            q, idx = make_inputs(b, s_q, s_k)
            flops = 2 * b * s_q * H * TOPK * (D + D_V)
            splits = auto_num_splits(b * s_q, H // 64, TOPK, sms)
            for kv, cache in caches.items():
                shape = f"b={b} s_q={s_q} s_k={s_k} topk={TOPK} kv={kv}"
                nbytes = b * s_q * (TOPK * cache.shape[1] * cache.element_size() + H * (D + D_V) * 2)
                peer, note = flashmla_calls(q, cache, idx, kv)
                impls = [("ours", partial(sparse_mla_decode_triton, q, cache, idx, SCALE), f"num_splits={splits}"),
                         ("torch", partial(sparse_mla_decode_ref, q, cache, idx, SCALE), ""),
                         ("flashmla", peer, note)]
                for impl, fn, why in impls:
                    us = None
                    if fn is not None:
                        try:
                            us = time_us(fn)
                        except Exception as e:  # noqa: BLE001 -- a peer's API drift must not sink the whole run
                            why = f"{why}; failed: {type(e).__name__}: {e}"[:300]
                    rows.append({"kernel": "sparse_mla_decode", "shape": shape, "impl": impl, "us": us,
                                 "tflops": flops / us / 1e6 if us else None,
                                 "tbps": nbytes / us / 1e6 if us else None, "note": why})
        del caches
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    for r in cases(ap.parse_args().quick):
        us = f"{r['us']:9.1f} us {r['tflops']:6.1f} TF {r['tbps']:5.2f} TB/s" if r["us"] else "   skipped"
        print(f"{r['shape']:48s} {r['impl']:9s} {us}  {r['note']}")
