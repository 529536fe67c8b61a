"""Sparse MLA in MQA mode (DSA prefill and training): forward, backward, and the autograd op.

Every query head attends to the same top-k rows of the shared latent cache:
    q:   [T, H, Dqk]  Dqk = d_v latent dims + rope dims (512 + 64 in V3.2)
    kv:  [N, Dqk]     one row per key, shared by all heads; V is kv[:, :d_v]
    idx: [T, K] int32 rows of kv, -1 = no key
    out: [T, H, d_v]; lse: [T, H] fp32, natural log (-inf, and out = 0, for a row with no key)

Kernel design (H100). All H heads of a token share its K indices, so the heads are the M side of
the MMA: one program is one token x BLOCK_H = 64 heads, and the two head blocks of a token are
neighbouring programs, so the second one finds the gathered rows in L2. The loop walks the K
indices in blocks of BLOCK_K, gathering [BLOCK_K, Dqk] rows of kv; the dot over Dqk is split into
the latent and rope parts (power-of-two tiles), and the latent tile serves as both K and V. The
[64, 512] fp32 accumulator is 128 registers a thread at num_warps = 8 (two warpgroups, each
holding half of the columns, like FlashMLA's O_L / O_R); num_stages pipelines the gathers.
Known limit: Triton splits every M = 64 dot's N across the two warpgroups, so both read all of Q
from shared memory for S = Q K^T, ~1.5x the bytes the tensor cores can consume there at BLOCK_K =
64; FlashMLA instead gives each warpgroup a whole key block (its "seesaw" schedule).
The kernels take bf16 or fp16, with d_v and Dqk - d_v powers of two >= 16.

Backward: dkv[n] gathers contributions from every query that selected row n. We add them with
fp32 atomics: the alternative, inverting idx and walking each row's queries, would gather all
H x Dqk query values (and dO, lse) per (query, key) pair, ~100x the bytes of the key row, or
materialise dS of size T x H x K. It runs as two kernels: dq keeps a [64, Dqk] fp32 accumulator
across the loop (like the forward), dkv works with keys as the MMA's M side and holds nothing across
iterations; fused, both accumulators would not fit in registers. The price is computing S and dP
twice.
"""

import math
import os

import torch

from dsv32.kernels import has_triton, use_triton

CHUNK = 1 << 26  # elements of the reference's largest per-chunk tensor (fp32: 256 MiB)
LOG2E = math.log2(math.e)

if has_triton():
    import triton
    import triton.language as tl
    INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _check(q, kv, idx, d_v):
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, Dqk], got shape {tuple(q.shape)}")
    if kv.dim() != 2 or kv.shape[1] != q.shape[2]:
        raise ValueError(f"kv must be [N, Dqk={q.shape[2]}], got shape {tuple(kv.shape)}")
    if idx.dim() != 2 or idx.shape[0] != q.shape[0]:
        raise ValueError(f"idx must be [T={q.shape[0]}, K], got shape {tuple(idx.shape)}")
    if idx.dtype != torch.int32:
        raise ValueError(f"idx must be int32, got {idx.dtype}")
    if kv.dtype != q.dtype:
        raise ValueError(f"kv dtype {kv.dtype} differs from q dtype {q.dtype}")
    if not 0 < d_v <= q.shape[2]:
        raise ValueError(f"d_v must be in (0, Dqk={q.shape[2]}], got {d_v}")


# ----------------------------------------------------------------------------- reference

def _chunk_len(q, idx) -> int:
    """Queries per reference chunk, so that [c, K, Dqk] and [c, H, K] stay under CHUNK elements."""
    return max(1, CHUNK // (idx.shape[1] * max(q.shape[1], q.shape[2])))


def _gather_ref(q, kv, idx, scale):
    """One chunk: the gathered keys [c, K, Dqk] and the masked scaled scores [c, H, K]."""
    dt = torch.promote_types(q.dtype, torch.float32)
    k = kv[idx.clamp(min=0).long()].to(dt)                                   # [c, K, Dqk]
    s = torch.einsum("chd,ckd->chk", q.to(dt), k) * scale
    return k, s.masked_fill((idx < 0)[:, None, :], float("-inf"))


def _probs(s, lse):
    """exp(s - lse), 0 for rows with no key (lse = -inf)."""
    return torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse).unsqueeze(-1))


def sparse_mla_fwd_ref(q, kv, idx, scale: float, d_v: int = 512):
    """Plain torch, one chunk of queries at a time, in fp32 (fp64 for fp64 inputs).
    Returns out [T, H, d_v] in q.dtype and lse [T, H]."""
    _check(q, kv, idx, d_v)
    t, h, _ = q.shape
    out = q.new_empty(t, h, d_v)
    lse = torch.empty(t, h, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    c = _chunk_len(q, idx)
    for i in range(0, t, c):
        k, s = _gather_ref(q[i:i + c], kv, idx[i:i + c], scale)
        l = torch.logsumexp(s, -1)                                           # [c, H]
        out[i:i + c] = torch.einsum("chk,ckd->chd", _probs(s, l), k[..., :d_v]).to(q.dtype)
        lse[i:i + c] = l
    return out, lse


def sparse_mla_bwd_ref(q, kv, idx, out, lse, dout, scale: float, d_v: int = 512):
    """Plain torch gradients (dq, dkv) of sparse_mla_fwd_ref, written out:
    P = exp(S - lse), dP = dO V^T, dS = P (dP - rowsum(dO O)), dq = scale dS K,
    dkv = scale dS^T q (all Dqk dims) + P^T dO (first d_v dims), summed over the queries."""
    _check(q, kv, idx, d_v)
    dt = torch.promote_types(q.dtype, torch.float32)
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=dt, device=kv.device)
    delta = (dout.to(dt) * out.to(dt)).sum(-1)                               # [T, H]
    c = _chunk_len(q, idx)
    for i in range(0, q.shape[0], c):
        j = slice(i, i + c)
        k, s = _gather_ref(q[j], kv, idx[j], scale)                          # [c, K, Dqk], [c, H, K]
        p = _probs(s, lse[j].to(dt))
        do = dout[j].to(dt)
        dp = torch.einsum("chd,ckd->chk", do, k[..., :d_v])
        ds = p * (dp - delta[j].unsqueeze(-1)) * scale
        dq[j] = torch.einsum("chk,ckd->chd", ds, k).to(q.dtype)
        dk = torch.einsum("chk,chd->ckd", ds, q[j].to(dt))                   # [c, K, Dqk]
        dk[..., :d_v] += torch.einsum("chk,chd->ckd", p, do)
        ok = idx[j] >= 0
        dkv.index_add_(0, idx[j][ok].long(), dk[ok])
    return dq, dkv.to(kv.dtype)


# ----------------------------------------------------------------------------- Triton kernels

def _configs(warps_stages):
    """(BLOCK_H, BLOCK_K, num_warps, num_stages) tuples -> configs; one small config in the
    interpreter, where autotuning would only cost CPU time."""
    if INTERPRET:
        return [triton.Config({"BLOCK_H": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bh, bk, w, s in warps_stages]


if has_triton():
    # Heads as M with 64-row tiles and 8 warps. Shared memory (227 KB) decides the gather depth: Q
    # is 72 KB (and dO 64 KB in the backward), a [64, 576] kv tile 72 KB per buffer; the indirect
    # load pipelines fully only at num_stages = 3 (idx, then rows, then use). The autotuner drops
    # what does not fit; the last config of each list is small enough to always fit.
    _FWD_CONFIGS = _configs([(64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3), (64, 64, 8, 1)])
    _DQ_CONFIGS = _configs([(64, 32, 8, 3), (64, 32, 8, 2), (64, 64, 8, 1), (64, 16, 8, 2)])
    _DKV_CONFIGS = _configs([(64, 64, 8, 1), (32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)])

    @triton.jit
    def _gather(KV, IDX, k0, TOPK, stride_kv, D_V: tl.constexpr, D_PE: tl.constexpr,
                BLOCK_K: tl.constexpr):
        """Block k0 of one query's indices -> valid [BLOCK_K], rows [BLOCK_K, D_V] and [BLOCK_K, D_PE]
        (zeros where the index is -1 or past TOPK)."""
        offs = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + offs, mask=offs < TOPK, other=-1)
        valid = idx >= 0
        row = KV + idx.to(tl.int64)[:, None] * stride_kv
        k_lat = tl.load(row + tl.arange(0, D_V)[None, :], mask=valid[:, None], other=0.0)
        k_pe = tl.load(row + D_V + tl.arange(0, D_PE)[None, :], mask=valid[:, None], other=0.0)
        return idx, valid, k_lat, k_pe

    @triton.jit
    def _load_heads(PTR, t, heads, h_ok, stride_t, stride_h, off, D: tl.constexpr):
        """[BLOCK_H, D] slice starting at column `off` of token t's heads (zeros past H)."""
        ptr = PTR + t * stride_t + heads[:, None] * stride_h + off + tl.arange(0, D)[None, :]
        return tl.load(ptr, mask=h_ok[:, None], other=0.0)

    @triton.autotune(configs=_FWD_CONFIGS, key=["H", "TOPK_BUCKET", "D_V", "D_PE"])
    @triton.jit
    def _fwd_kernel(Q, KV, IDX, OUT, LSE, scale_log2, H, TOPK, TOPK_BUCKET,
                    stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh,
                    D_V: tl.constexpr, D_PE: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        n_hb = tl.cdiv(H, BLOCK_H)
        t = (tl.program_id(0) // n_hb).to(tl.int64)
        heads = (tl.program_id(0) % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = heads < H
        q_lat = _load_heads(Q, t, heads, h_ok, stride_qt, stride_qh, 0, D_V)      # [BH, D_V]
        q_pe = _load_heads(Q, t, heads, h_ok, stride_qt, stride_qh, D_V, D_PE)    # [BH, D_PE]
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max, log2 units
        l = tl.zeros([BLOCK_H], tl.float32)                # running sum of exp2(s - m)
        acc = tl.zeros([BLOCK_H, D_V], tl.float32)
        for k0 in range(0, TOPK, BLOCK_K):
            _, valid, k_lat, k_pe = _gather(KV, IDX + t * stride_it, k0, TOPK, stride_kv,
                                            D_V, D_PE, BLOCK_K)
            s = tl.dot(q_pe, tl.trans(k_pe))
            s = tl.dot(q_lat, tl.trans(k_lat), s)                                  # [BH, BK]
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: p = alpha = 0
            p = tl.exp2(s - m_sub[:, None])
            alpha = tl.exp2(m - m_sub)
            l = l * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(k_lat.dtype), k_lat, acc * alpha[:, None])          # [BH, D_V]
            m = m_new
        has = l > 0
        out = acc / tl.where(has, l, 1.0)[:, None]
        o_ptr = OUT + t * stride_ot + heads[:, None] * stride_oh + tl.arange(0, D_V)[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=h_ok[:, None])
        lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) / 1.4426950408889634,
                       float("-inf"))
        tl.store(LSE + t * H + heads, lse, mask=h_ok)

    @triton.jit
    def _bwd_rows(Q, DO, LSE, DELTA, H, stride_qt, stride_qh, stride_dot, stride_doh,
                  D_V: tl.constexpr, D_PE: tl.constexpr, BLOCK_H: tl.constexpr):
        """What both backward kernels read once per program (one token x BLOCK_H heads): the token
        t, the heads and their mask, q's latent [BH, D_V] and rope [BH, D_PE] parts, dO [BH, D_V],
        lse in log2 units and delta = rowsum(dO O) [BH]."""
        n_hb = tl.cdiv(H, BLOCK_H)
        t = (tl.program_id(0) // n_hb).to(tl.int64)
        heads = (tl.program_id(0) % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = heads < H
        q_lat = _load_heads(Q, t, heads, h_ok, stride_qt, stride_qh, 0, D_V)
        q_pe = _load_heads(Q, t, heads, h_ok, stride_qt, stride_qh, D_V, D_PE)
        do = _load_heads(DO, t, heads, h_ok, stride_dot, stride_doh, 0, D_V)
        lse2 = tl.load(LSE + t * H + heads, mask=h_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + t * H + heads, mask=h_ok, other=0.0)
        return t, heads, h_ok, q_lat, q_pe, do, lse2, delta

    @triton.autotune(configs=_DQ_CONFIGS, key=["H", "TOPK_BUCKET", "D_V", "D_PE"])
    @triton.jit
    def _dq_kernel(Q, KV, IDX, DO, LSE, DELTA, DQ, scale, scale_log2, H, TOPK, TOPK_BUCKET,
                   stride_qt, stride_qh, stride_kv, stride_it, stride_dot, stride_doh,
                   D_V: tl.constexpr, D_PE: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        t, heads, h_ok, q_lat, q_pe, do, lse2, delta = _bwd_rows(
            Q, DO, LSE, DELTA, H, stride_qt, stride_qh, stride_dot, stride_doh, D_V, D_PE, BLOCK_H)
        dq_lat = tl.zeros([BLOCK_H, D_V], tl.float32)
        dq_pe = tl.zeros([BLOCK_H, D_PE], tl.float32)
        for k0 in range(0, TOPK, BLOCK_K):
            _, valid, k_lat, k_pe = _gather(KV, IDX + t * stride_it, k0, TOPK, stride_kv,
                                            D_V, D_PE, BLOCK_K)
            s = tl.dot(q_pe, tl.trans(k_pe))
            s = tl.dot(q_lat, tl.trans(k_lat), s)                                  # [BH, BK]
            p = tl.where(valid[None, :], tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(k_lat))
            ds = (p * (dp - delta[:, None])).to(k_lat.dtype)
            dq_lat = tl.dot(ds, k_lat, dq_lat)
            dq_pe = tl.dot(ds, k_pe, dq_pe)
        ptr = DQ + t * stride_qt + heads[:, None] * stride_qh
        tl.store(ptr + tl.arange(0, D_V)[None, :], (dq_lat * scale).to(DQ.dtype.element_ty),
                 mask=h_ok[:, None])
        tl.store(ptr + D_V + tl.arange(0, D_PE)[None, :], (dq_pe * scale).to(DQ.dtype.element_ty),
                 mask=h_ok[:, None])

    @triton.autotune(configs=_DKV_CONFIGS, key=["H", "TOPK_BUCKET", "D_V", "D_PE"], reset_to_zero=["DKV"])
    @triton.jit
    def _dkv_kernel(Q, KV, IDX, DO, LSE, DELTA, DKV, scale, scale_log2, H, TOPK, TOPK_BUCKET,
                    stride_qt, stride_qh, stride_kv, stride_it, stride_dot, stride_doh,
                    D_V: tl.constexpr, D_PE: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        """Keys as M: everything here is the transpose of the dq kernel's [heads, keys] tiles."""
        t, heads, h_ok, q_lat, q_pe, do, lse2, delta = _bwd_rows(
            Q, DO, LSE, DELTA, H, stride_qt, stride_qh, stride_dot, stride_doh, D_V, D_PE, BLOCK_H)
        for k0 in range(0, TOPK, BLOCK_K):
            idx, valid, k_lat, k_pe = _gather(KV, IDX + t * stride_it, k0, TOPK, stride_kv,
                                              D_V, D_PE, BLOCK_K)
            s = tl.dot(k_pe, tl.trans(q_pe))
            s = tl.dot(k_lat, tl.trans(q_lat), s)                                  # [BK, BH]
            p = tl.where(valid[:, None], tl.exp2(s * scale_log2 - lse2[None, :]), 0.0)
            dp = tl.dot(k_lat, tl.trans(do))
            ds = (p * (dp - delta[None, :]) * scale).to(q_lat.dtype)
            dkv_lat = tl.dot(p.to(do.dtype), do, tl.dot(ds, q_lat))                # [BK, D_V]
            dkv_pe = tl.dot(ds, q_pe)                                              # [BK, D_PE]
            row = DKV + idx.to(tl.int64)[:, None] * (D_V + D_PE)
            tl.atomic_add(row + tl.arange(0, D_V)[None, :], dkv_lat, mask=valid[:, None],
                          sem="relaxed")
            tl.atomic_add(row + D_V + tl.arange(0, D_PE)[None, :], dkv_pe, mask=valid[:, None],
                          sem="relaxed")


def triton_supports(q, d_v: int) -> bool:
    """Whether the Triton kernel takes these inputs (else the dispatcher runs the reference)."""
    d_pe = q.shape[-1] - d_v
    return q.dtype in (torch.bfloat16, torch.float16) and all(d >= 16 and not d & (d - 1) for d in (d_v, d_pe))


def _check_triton(q, d_v):
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton kernel takes bf16 or fp16 q and kv, got {q.dtype}")
    d_pe = q.shape[2] - d_v
    for name, d in (("d_v", d_v), ("Dqk - d_v", d_pe)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"the Triton kernel needs {name} a power of two >= 16, got {d}")


def _bucket(topk: int) -> int:
    """The autotuners' key for TOPK: its next power of two. Keyed on TOPK itself, a context shorter
    than index_topk (TOPK = min(index_topk, T)) re-tuned every config at every new length: each
    step of a decode that runs this kernel (a verifying decode off the paged path: 3.5 tokens/s)."""
    return triton.next_power_of_2(max(1, topk))


def _grid(t, h):
    return lambda meta: (t * triton.cdiv(h, meta["BLOCK_H"]),)


def sparse_mla_fwd(q, kv, idx, scale: float, d_v: int = 512):
    """The Triton forward; same contract as sparse_mla_fwd_ref."""
    _check(q, kv, idx, d_v)
    _check_triton(q, d_v)
    q, kv, idx = q.contiguous(), kv.contiguous(), idx.contiguous()
    t, h, d = q.shape
    out = q.new_empty(t, h, d_v)
    lse = torch.empty(t, h, dtype=torch.float32, device=q.device)
    if t == 0:
        return out, lse
    _fwd_kernel[_grid(t, h)](q, kv, idx, out, lse, scale * LOG2E, h, idx.shape[1], _bucket(idx.shape[1]),
                             q.stride(0), q.stride(1), kv.stride(0), idx.stride(0),
                             out.stride(0), out.stride(1), D_V=d_v, D_PE=d - d_v)
    return out, lse


def sparse_mla_bwd(q, kv, idx, out, lse, dout, scale: float, d_v: int = 512):
    """The Triton backward; same contract as sparse_mla_bwd_ref. dkv is summed in fp32."""
    _check(q, kv, idx, d_v)
    _check_triton(q, d_v)
    q, kv, idx, dout = q.contiguous(), kv.contiguous(), idx.contiguous(), dout.contiguous()
    t, h, d = q.shape
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    if t == 0:
        return dq, dkv.to(kv.dtype)
    delta = (dout.float() * out.float()).sum(-1)                            # [T, H]
    lse = lse.float().contiguous()
    args = (scale, scale * LOG2E, h, idx.shape[1], _bucket(idx.shape[1]), q.stride(0), q.stride(1), kv.stride(0),
            idx.stride(0), dout.stride(0), dout.stride(1))
    _dq_kernel[_grid(t, h)](q, kv, idx, dout, lse, delta, dq, *args, D_V=d_v, D_PE=d - d_v)
    _dkv_kernel[_grid(t, h)](q, kv, idx, dout, lse, delta, dkv, *args, D_V=d_v, D_PE=d - d_v)
    return dq, dkv.to(kv.dtype)


# ----------------------------------------------------------------------------- the op

class _SparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, idx, scale, d_v):
        ctx.kernel = use_triton(q) and triton_supports(q, d_v)
        out, lse = (sparse_mla_fwd if ctx.kernel else sparse_mla_fwd_ref)(q, kv, idx, scale, d_v)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.scale, ctx.d_v = scale, d_v
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, idx, out, lse = ctx.saved_tensors
        dq, dkv = (sparse_mla_bwd if ctx.kernel else sparse_mla_bwd_ref)(q, kv, idx, out, lse, dout, ctx.scale, ctx.d_v)
        return dq, dkv, None, None, None


def sparse_mla(q, kv, idx, scale: float, d_v: int = 512):
    """Sparse MLA attention out [T, H, d_v], differentiable in q and kv; the Triton kernels on
    CUDA for bf16/fp16 and power-of-two dims, the plain-torch reference elsewhere."""
    return _SparseMLA.apply(q, kv, idx, scale, d_v)
