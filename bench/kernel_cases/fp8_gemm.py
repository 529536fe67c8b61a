"""FP8 block-scaled GEMM (1x128 activation, 128x128 weight scales) at DeepSeek-V3's projection
shapes, and the grouped GEMM of MoE experts. Implementations, all on the same operands:

- ours:           dsv32.kernels.fp8_gemm (Triton), operands already quantised (as DeepGEMM times it);
                  ours+act_quant adds quantising the bf16 activations (FP8Linear's whole forward)
- cublas-block:   F.scaled_mm with cuBLASLt's 1x128 x 128x128 recipe (same numerics as ours)
- cublas-tensor:  torch._scaled_mm with one scale per tensor (other numerics; the cuBLAS FP8 ceiling)
- torch-bf16:     torch.matmul on bf16 (grouped: torch._grouped_mm)

FLOPs are 2*M*N*K; bytes count a, b, their scales and the output once. The DeepGEMM numbers in
the notes are H800 (= H100 SXM for one GPU) from kernel-anchors §2.2, for context only.
"""

import torch

from bench.kernel_cases import time_us
from dsv32.kernels import fp8_gemm as K
from dsv32.model.fp8 import weight_quant

V3_SHAPES = [(7168, 2048), (2112, 7168), (24576, 1536), (4096, 7168)]   # (N, K)
DEEPGEMM_M4096 = {(7168, 2048): 1168, (2112, 7168): 1009, (24576, 1536): 1125, (4096, 7168): 1265}


def _row(kernel, shape, impl, fn, flops, nbytes, note=None):
    try:
        fn()  # autotune / compile outside the timing
        us = time_us(fn)
    except Exception as e:  # a peer this torch / GPU does not support: say so, keep going
        return {"kernel": kernel, "shape": shape, "impl": impl, "us": None, "tflops": None, "tbps": None,
                "note": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    row = {"kernel": kernel, "shape": shape, "impl": impl, "us": us,
           "tflops": flops / us / 1e6 if flops else None, "tbps": nbytes / us / 1e6}
    if note:
        row["note"] = note
    return row


def _gemm_rows(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    a, sa = K.act_quant(x)
    b, sb = weight_quant(w)
    sb_cublas = K.cublas_weight_scale(sb)
    one = torch.ones((), device="cuda")
    flops = 2 * m * n * k
    fp8_bytes = m * k + n * k + 4 * (sa.numel() + sb.numel()) + 2 * m * n
    shape, kernel = f"M={m} N={n} K={k}", "fp8_gemm"
    anchor = f"DeepGEMM H800: {DEEPGEMM_M4096[(n, k)]} TF" if m == 4096 else "DeepGEMM H800 M=64: 206-336 TF"
    return [
        _row(kernel, shape, "ours", lambda: K.fp8_gemm(a, sa, b, sb), flops, fp8_bytes, anchor),
        _row(kernel, shape, "ours+act_quant", lambda: K.fp8_gemm(*K.act_quant(x), b, sb), flops,
             fp8_bytes + 2 * m * k, "what FP8Linear costs: bf16 x in"),
        _row(kernel, shape, "cublas-block", lambda: K.fp8_gemm_cublas(a, sa, b, sb_cublas), flops, fp8_bytes,
             "F.scaled_mm BlockWise1x128 x BlockWise128x128"),
        _row(kernel, shape, "cublas-tensor",
             lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16), flops, fp8_bytes,
             "per-tensor scales: not the same numerics"),
        _row(kernel, shape, "torch-bf16", lambda: x @ w.t(), flops, 2 * (m * k + n * k + m * n)),
    ]


def _grouped_rows(e, rows, n, k):
    m = e * rows
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    a, sa = K.act_quant(x)
    qs = [weight_quant(w) for w in ws]
    b, sb = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    sb_cublas = [K.cublas_weight_scale(s) for s in sb]
    offsets = torch.arange(0, m + 1, rows, device="cuda", dtype=torch.int32)
    flops = 2 * m * n * k
    fp8_bytes = m * k + e * n * k + 4 * (sa.numel() + sb.numel()) + 2 * m * n
    shape, kernel = f"E={e} rows={rows} N={n} K={k}", "fp8_grouped_gemm"

    def cublas_loop():
        for i in range(e):
            lo = i * rows
            K.fp8_gemm_cublas(a[lo:lo + rows], sa[lo:lo + rows], b[i], sb_cublas[i])

    return [
        _row(kernel, shape, "ours", lambda: K.fp8_grouped_gemm(a, sa, b, sb, offsets), flops, fp8_bytes,
             "DeepGEMM H800 grouped: 1346 TF (4x8192 rows, N=4096 K=7168), 1214 (N=7168 K=2048); "
             "masked 2x512: 1040"),
        _row(kernel, shape, "cublas-block-loop", cublas_loop, flops, fp8_bytes,
             "one F.scaled_mm (1x128 x 128x128) per expert"),
        _row(kernel, shape, "torch-bf16", lambda: torch._grouped_mm(x, ws.transpose(1, 2), offs=offsets[1:]),
             flops, 2 * (m * k + e * n * k + m * n), "torch._grouped_mm"),
    ]


def _act_quant_row(m, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    nbytes = 2 * m * k + m * k + 4 * m * (k // 128)
    return _row("fp8_act_quant", f"M={m} K={k}", "ours", lambda: K.act_quant(x), None, nbytes)


def cases(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    shapes = [(4096, 7168, 2048), (64, 4096, 7168)] if quick else [
        (m, n, k) for m in (64, 4096) for n, k in V3_SHAPES]
    rows = [r for m, n, k in shapes for r in _gemm_rows(m, n, k)]
    grouped = [(8, 512, 4096, 7168)] if quick else [(8, 512, 4096, 7168), (8, 512, 7168, 2048)]
    rows += [r for g in grouped for r in _grouped_rows(*g)]
    rows.append(_act_quant_row(4096, 7168))
    return rows

