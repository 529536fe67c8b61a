"""Lightning-indexer logits (H = 64, D = 128, kernel-anchors §3 and §4).

Decode: n = 2 queries (MTP) per sequence over the paged FP8 cache (shuffled 64-token pages of
64 x 128 e4m3 keys then 64 fp32 scales, 132 B per token), b in {1, 64}, context 32K and 128K.
Rate = cache bytes read / time, next to a device-to-device copy measured in the same run (the
target is >= 80% of it).
Prefill: S = 4096 queries at the end of L = 32K keys, causal; DeepGEMM's FLOP count,
2 * (valid causal pairs) * H * D. FP8 (e4m3 + per-row scales) and bf16.
Ours vs the plain-torch reference (fp32 gather + einsum in query chunks).
"""

import torch

from bench.kernel_cases import copy_tbps, time_us
from dsv32.engine.cache import _quant_rows
from dsv32.kernels import indexer as ix

H, D, BLOCK = 64, 128, 64


def _row(kernel, shape, impl, us, flops=None, nbytes=None, note=None):
    return {"kernel": kernel, "shape": shape, "impl": impl, "us": us,
            "tflops": None if us is None or flops is None else flops / us / 1e6,
            "tbps": None if us is None or nbytes is None else nbytes / us / 1e6, "note": note}


def _config(kernel) -> str:
    c = kernel.best_config
    return f"{c.kwargs} warps={c.num_warps} stages={c.num_stages}"


def _rel_err(got, want) -> float:
    fin = torch.isfinite(want)
    if not torch.equal(fin, torch.isfinite(got)):
        return float("inf")
    return ((got[fin] - want[fin]).abs().max() / want[fin].abs().max()).item()


def _decode_inputs(b: int, ctx: int):
    """FP8 queries with per-head scales, weights, and an FP8 paged cache of b full sequences."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, 2, H, D, device="cuda", generator=g)
    q_scale = q.abs().amax(-1) / 448
    q8 = (q / q_scale[..., None]).to(ix.FP8)
    w = torch.randn(b, 2, H, device="cuda", generator=g) * (H * D) ** -0.5
    blocks = b * ctx // BLOCK
    cache = torch.empty(blocks, BLOCK * (D + 4), dtype=torch.uint8, device="cuda")
    keys, scales = ix.fp8_pages(cache, D, BLOCK)                  # [blocks, BLOCK, D], [blocks, BLOCK]
    for i in range(0, blocks, 1 << 14):                           # 1M tokens at a time
        n = min(1 << 14, blocks - i)
        rows = _quant_rows(torch.randn(n * BLOCK, D, device="cuda", generator=g), D).view(n, BLOCK, D + 4)
        keys[i:i + n] = rows[..., :D]
        scales[i:i + n] = rows[..., D:].contiguous().view(torch.float32)[..., 0]
    table = torch.randperm(blocks, device="cuda", generator=g).view(b, ctx // BLOCK).int()
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    return q8, w, cache, table, lens, q_scale


def _decode_cases(quick: bool) -> list[dict]:
    copy = copy_tbps()
    rows = [_row("indexer_decode", "1 GiB", "copy", None, note="device-to-device copy, read + write")]
    rows[0]["tbps"] = copy
    for ctx in [131072] if quick else [32768, 131072]:
        for b in (1, 64):
            shape = f"b={b} n=2 ctx={ctx} h={H} d={D} fp8 cache"
            q8, w, cache, table, lens, qs = _decode_inputs(b, ctx)
            nbytes = b * ctx * (D + 4)
            fn = lambda: ix.indexer_logits_paged(q8, w, cache, table, lens, qs, BLOCK)  # noqa: E731
            got = fn()
            want = ix.indexer_logits_paged_ref(q8, w, cache, table, lens, qs, BLOCK)
            us = time_us(fn)
            config, span = ix.paged_launch(b, ctx, q8.device)
            note = (f"{nbytes / us / 1e6 / copy:.0%} of copy; fixed config {config.kwargs} "
                    f"warps={config.num_warps} stages={config.num_stages} span={span}; "
                    f"rel err {_rel_err(got, want):.1e}")
            rows.append(_row("indexer_decode", shape, "ours", us, nbytes=nbytes, note=note))
            ref_us = time_us(lambda: ix.indexer_logits_paged_ref(q8, w, cache, table, lens, qs, BLOCK),
                             warmup=2, rep=20)
            rows.append(_row("indexer_decode", shape, "torch", ref_us, nbytes=nbytes,
                             note="gather + dequant + fp32 einsum"))
            del q8, w, cache, table, lens, qs, got, want
            torch.cuda.empty_cache()
    return rows


def _prefill_cases(quick: bool) -> list[dict]:
    s, t = 4096, 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, s, H, D, device="cuda", generator=g)
    k = torch.randn(1, t, D, device="cuda", generator=g)
    w = torch.randn(1, s, H, device="cuda", generator=g) * (H * D) ** -0.5
    end = (t - s + 1 + torch.arange(s, device="cuda", dtype=torch.int32))[None]
    flops = 2 * int(end.sum()) * H * D
    qs, ks = q.abs().amax(-1) / 448, k.abs().amax(-1) / 448
    variants = {"fp8": ((q / qs[..., None]).to(ix.FP8), (k / ks[..., None]).to(ix.FP8), qs, ks),
                "bf16": (q.bfloat16(), k.bfloat16(), None, None)}
    rows = []
    for name, (qq, kk, qsc, ksc) in variants.items():
        shape = f"S={s} L={t} h={H} d={D} {name} causal"
        fn = lambda: ix.indexer_logits(qq, kk, w, qsc, ksc, end)  # noqa: E731
        got = fn()
        want = ix.indexer_logits_ref(qq, kk, w, qsc, ksc, end)
        note = f"config {_config(ix._prefill_tuned)}; rel err {_rel_err(got, want):.1e}"
        rows.append(_row("indexer_prefill", shape, "ours", time_us(fn), flops=flops, note=note))
        if name == "bf16" or not quick:
            ref_us = time_us(lambda: ix.indexer_logits_ref(qq, kk, w, qsc, ksc, end), warmup=2, rep=20)
            rows.append(_row("indexer_prefill", shape, "torch", ref_us, flops=flops,
                             note="fp32 einsum in query chunks"))
        del got, want
    return rows


def cases(quick: bool) -> list[dict]:
    return _decode_cases(quick) + _prefill_cases(quick)
