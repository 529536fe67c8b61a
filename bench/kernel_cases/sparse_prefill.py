"""Sparse MLA prefill (MQA mode) at FlashMLA's benchmark shapes: s_q = 4096, h = 128, d_qk = 576,
d_v = 512, topk = 2048, s_kv in {8K, 32K, 128K}, bf16, unique random indices per query.

Forward: ours vs the torch reference vs FlashMLA's `flash_mla_sparse_fwd` (sgl-flash-mla), with
FlashMLA's FLOP count 2·s_q·topk·h·(d_qk + d_v). Backward: ours vs the torch reference, counting
2·s_q·topk·h·(3·d_qk + 2·d_v) (S recomputed, dP, dQ, dK, dV; our two kernels compute S and dP twice,
which this count does not credit). FlashMLA has no sparse backward.
"""

import torch

from bench.kernel_cases import time_us
from dsv32.kernels import sparse_mla as sm

S_Q, H, D_QK, D_V, TOPK = 4096, 128, 576, 512, 2048


def _inputs(s_kv: int):
    """q [S_Q, H, D_QK], kv [s_kv, D_QK] bf16 and duplicate-free random idx [S_Q, TOPK] int32."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(S_Q, H, D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.cat([torch.rand(256, s_kv, device="cuda", generator=g).topk(TOPK, -1).indices
                     for _ in range(S_Q // 256)]).int()
    return q, kv, idx


def _flashmla():
    try:
        import flash_mla
    except ImportError as e:
        return None, f"flash_mla not importable ({e}); pip install sgl-flash-mla --no-deps"
    return flash_mla, None


def _row(kernel, shape, impl, us, flops, note=None):
    return {"kernel": kernel, "shape": shape, "impl": impl, "us": us,
            "tflops": None if us is None else flops / us / 1e6, "tbps": None, "note": note}


def _config(kernel) -> str:
    c = kernel.best_config
    return f"{c.kwargs} warps={c.num_warps} stages={c.num_stages}"


def _rel_err(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def cases(quick: bool) -> list[dict]:
    flash_mla, fm_note = _flashmla()
    scale = D_QK ** -0.5
    rows = []
    for s_kv in [8192] if quick else [8192, 32768, 131072]:
        shape = f"s_q={S_Q} s_kv={s_kv} h={H} topk={TOPK}"
        fwd_flops = 2 * S_Q * TOPK * H * (D_QK + D_V)
        bwd_flops = 2 * S_Q * TOPK * H * (3 * D_QK + 2 * D_V)
        q, kv, idx = _inputs(s_kv)

        out, lse = sm.sparse_mla_fwd(q, kv, idx, scale, D_V)  # autotunes once per shape
        ref_out, ref_lse = sm.sparse_mla_fwd_ref(q, kv, idx, scale, D_V)
        note = (f"config {_config(sm._fwd_kernel)}; max |ours - torch| / max |torch| = "
                f"{_rel_err(out, ref_out):.2e}")
        rows.append(_row("sparse_mla_prefill", shape, "ours",
                         time_us(lambda: sm.sparse_mla_fwd(q, kv, idx, scale, D_V)), fwd_flops, note))
        rows.append(_row("sparse_mla_prefill", shape, "torch",
                         time_us(lambda: sm.sparse_mla_fwd_ref(q, kv, idx, scale, D_V)), fwd_flops,
                         "fp32 gather + einsum in query chunks"))
        if flash_mla is None:
            rows.append(_row("sparse_mla_prefill", shape, "flashmla", None, fwd_flops, fm_note))
        else:
            kv3, idx3 = kv.unsqueeze(1), idx.unsqueeze(1)

            def fm():
                return flash_mla.flash_mla_sparse_fwd(q, kv3, idx3, scale, d_v=D_V, use_legacy=True)
            fm_out = fm()[0]
            rows.append(_row("sparse_mla_prefill", shape, "flashmla", time_us(fm), fwd_flops,
                             f"max |flashmla - torch| / max |torch| = {_rel_err(fm_out, ref_out):.2e}"))

        dout = torch.randn_like(out)
        bwd = lambda: sm.sparse_mla_bwd(q, kv, idx, ref_out, ref_lse, dout, scale, D_V)  # noqa: E731
        dq, dkv = bwd()
        dq_ref, dkv_ref = sm.sparse_mla_bwd_ref(q, kv, idx, ref_out, ref_lse, dout, scale, D_V)
        note = (f"configs dq {_config(sm._dq_kernel)}, dkv {_config(sm._dkv_kernel)}; "
                f"rel err dq {_rel_err(dq, dq_ref):.2e}, dkv {_rel_err(dkv, dkv_ref):.2e}")
        rows.append(_row("sparse_mla_prefill_bwd", shape, "ours", time_us(bwd), bwd_flops, note))
        if s_kv == 8192:
            rows.append(_row("sparse_mla_prefill_bwd", shape, "torch", time_us(
                lambda: sm.sparse_mla_bwd_ref(q, kv, idx, ref_out, ref_lse, dout, scale, D_V)),
                bwd_flops, "fp32 gather + einsum + index_add_ in query chunks"))
        else:
            rows.append(_row("sparse_mla_prefill_bwd", shape, "torch", None, bwd_flops,
                             "timed at s_kv=8192 only: it gathers the same number of rows at every "
                             "s_kv, and each timing takes seconds"))
        del q, kv, idx, out, lse, ref_out, ref_lse, dout, dq, dkv, dq_ref, dkv_ref
        torch.cuda.empty_cache()
    return rows
