"""Sparse MLA decode: every query head attends to the k latents its indexer picked, read straight
from the paged cache of one layer (absorbed-MQA mode: 576-d keys = 512 latent + 64 rope, values =
the 512 latent dims, one shared KV head).

Cache rows [kernel-anchors §1b, §2.1], addressed by global slot = block * 64 + offset:
  bf16: [num_slots, 576];
  fp8:  [num_slots, 656] uint8 = 512 e4m3 latent values, 4 fp32 scales (one per 128 values),
        64 bf16 rope values. FlashMLA's V3.2 FP8 layout, byte for byte.

Kernel design (H100). All heads of one query token share its indices, so heads are the MMA's M
dimension: a program takes 64 heads of one (batch, query) row and 8 warps (the 64x512 fp32
accumulator is 128 registers a thread), gathers 32 or 64 cache rows at a time with cp.async
(pipelined so that the next tile's gather is in flight while one computes), dequantises FP8 in
registers (e4m3 -> fp32 * scale -> bf16, exactly as the reference) and runs an online softmax.
The two programs of a row's 128 heads run side by side, so the second gather hits L2. When the
batch is too small to fill the GPU, the k indices are split into chunks handled by separate
programs (split-KV), whose partial (out, lse) in fp32 a second kernel merges.
"""

import functools
import math

import torch

from dsv32.kernels import has_triton, use_triton

if has_triton():
    import triton
    import triton.language as tl
else:  # the reference still works without Triton
    triton = None

GROUP = 128  # FP8 latent values per scale
BLOCK_H = 64  # heads per program on the GPU: wgmma's M
SPLIT_ALIGN = 64  # split-KV chunks hold a multiple of this many indices (the largest BLOCK_N)


def fp8_row_bytes(d_nope: int, d_rope: int) -> int:
    """Bytes per token of the FP8 cache: e4m3 latent, fp32 scales, bf16 rope (656 for V3.2)."""
    return d_nope + 4 * (d_nope // GROUP) + 2 * d_rope


def _check(q, cache, idx, d_v):
    """Validate shapes and dtypes; return (fp8, d_rope)."""
    if q.dim() != 4 or q.dtype != torch.bfloat16:
        raise ValueError(f"q must be [B, s_q, H, D] bf16, got {tuple(q.shape)} {q.dtype}")
    b, s, _, d = q.shape
    d_rope = d - d_v
    if d_rope <= 0 or d_v % GROUP:
        raise ValueError(f"d_v={d_v} must be a multiple of {GROUP} below q's head dim {d}")
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (b, s) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be [B={b}, s_q={s}, K] int32, got {tuple(idx.shape)} {idx.dtype}")
    if cache.dtype == torch.bfloat16 and cache.shape[-1] == d:
        return False, d_rope
    if cache.dtype == torch.uint8 and cache.shape[-1] == fp8_row_bytes(d_v, d_rope):
        return True, d_rope
    raise ValueError(f"cache must be [num_slots, {d}] bf16 or [num_slots, {fp8_row_bytes(d_v, d_rope)}] "
                     f"uint8 (FP8), got {tuple(cache.shape)} {cache.dtype}")


def dequant_fp8_rows(rows: torch.Tensor, d_nope: int, d_rope: int) -> torch.Tensor:
    """rows: [..., 656] uint8 -> [..., 576] bf16, each value round(e4m3 * its fp32 scale)."""
    shape, n_groups = rows.shape[:-1], d_nope // GROUP
    vals = rows[..., :d_nope].contiguous().view(torch.float8_e4m3fn).float()
    scales = rows[..., d_nope:d_nope + 4 * n_groups].contiguous().view(torch.float32)
    nope = (vals.view(*shape, n_groups, GROUP) * scales[..., None]).view(*shape, d_nope)
    rope = rows[..., d_nope + 4 * n_groups:].contiguous().view(torch.bfloat16)
    return torch.cat([nope.to(torch.bfloat16), rope], -1)


def sparse_mla_decode_ref(q, cache, idx, scale, d_v=512, num_splits=None):
    """Plain torch. q: [B, s_q, H, D] bf16; cache: [num_slots, D] bf16 or [num_slots, 656] uint8;
    idx: [B, s_q, K] global slots, -1 = none -> out [B, s_q, H, d_v] bf16, lse [B, s_q, H] fp32
    (natural log; a row with no valid index gives out 0 and lse -inf). num_splits is the kernel's
    knob and changes nothing here."""
    fp8, d_rope = _check(q, cache, idx, d_v)
    cache = cache.reshape(-1, cache.shape[-1])
    valid = idx >= 0                                                      # [B, S, K]
    rows = cache[idx.clamp(min=0).long()]                                 # [B, S, K, bytes or D]
    kv = (dequant_fp8_rows(rows, d_v, d_rope) if fp8 else rows).float()  # [B, S, K, D]
    att = torch.einsum("bshd,bskd->bshk", q.float(), kv) * scale
    att = att.masked_fill(~valid[:, :, None], float("-inf"))
    lse = att.logsumexp(-1)                                               # [B, S, H]
    p = torch.exp(att - lse[..., None]).nan_to_num(0.0)                   # no valid index: all 0
    out = torch.einsum("bshk,bskc->bshc", p, kv[..., :d_v])
    return out.to(torch.bfloat16), lse


def kernel_fits(d_v: int, d_rope: int) -> bool:
    """Whether the kernel tiles these head dims: d_v in whole FP8 scale groups, both powers of
    two and at least 16 (tl.dot's smallest inner dimension). Smaller models (the tiny preset's
    rope dim is 8) take the twin."""
    return d_v % GROUP == 0 and all(d >= 16 and not d & (d - 1) for d in (d_v, d_rope))


def sparse_mla_decode(q, cache, idx, scale, d_v=512, num_splits=None):
    """The Triton kernel on CUDA where it fits the head dims, the reference elsewhere (see
    dsv32.kernels)."""
    if use_triton(q) and kernel_fits(d_v, q.shape[-1] - d_v):
        return sparse_mla_decode_triton(q, cache, idx, scale, d_v, num_splits)
    return sparse_mla_decode_ref(q, cache, idx, scale, d_v, num_splits)


@functools.lru_cache
def _sm_count(device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: plan as for an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def auto_num_splits(rows: int, head_blocks: int, k: int, sms: int) -> int:
    """Split each row's k indices until the programs fill the SMs once, keeping >= 2 tiles of 64
    indices per split (fewer would spend more on partial outputs than they save)."""
    progs, tiles = rows * head_blocks, -(-k // SPLIT_ALIGN)
    splits = max(1, min(sms // progs, tiles // 2))
    return -(-tiles // -(-tiles // splits))  # even out the tiles per split


def sparse_mla_decode_triton(q, cache, idx, scale, d_v=512, num_splits=None):
    """The kernel; num_splits=None picks the split-KV count from the batch and the SM count."""
    fp8, d_rope = _check(q, cache, idx, d_v)
    if not kernel_fits(d_v, d_rope):
        raise ValueError(f"the kernel needs power-of-two d_v and rope dims of at least 16, got {d_v} and {d_rope}")
    b, s, h, d = q.shape
    rows, k = b * s, idx.shape[-1]
    q3 = q.reshape(rows, h, d)
    idx2 = idx.reshape(rows, k)
    if q3.stride(-1) != 1 or idx2.stride(-1) != 1:
        q3, idx2 = q3.contiguous(), idx2.contiguous()
    cache = cache.reshape(-1, cache.shape[-1])  # also takes FlashMLA's [blocks, 64, 1, 656] view
    if not cache.is_contiguous():
        raise ValueError("cache rows must be contiguous (one layer of the paged cache, e.g. cache.kv[layer])")
    block_h = min(BLOCK_H, max(16, triton.next_power_of_2(h)))
    head_blocks = -(-h // block_h)
    if num_splits is None:
        num_splits = auto_num_splits(rows, head_blocks, k, _sm_count(q.device))
    split_len = -(-k // (num_splits * SPLIT_ALIGN)) * SPLIT_ALIGN
    num_splits = max(1, -(-k // split_len))

    out = torch.empty(b, s, h, d_v, dtype=torch.bfloat16, device=q.device)
    lse = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
    if num_splits == 1:
        o_part, lse_part = out.view(1, rows, h, d_v), lse.view(1, rows, h)
    else:
        o_part = torch.empty(num_splits, rows, h, d_v, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(num_splits, rows, h, dtype=torch.float32, device=q.device)
    # the same bytes seen as each field's type: e4m3 latents, fp32 scales, bf16 rope
    kv8 = cache if fp8 else cache.view(torch.uint8)
    kv32 = cache.view(torch.float32) if fp8 else cache.view(torch.uint8)  # unused for bf16
    kv16 = cache.view(torch.bfloat16)
    grid = (head_blocks, num_splits, rows)
    args = (q3, kv8, kv32, kv16, idx2, o_part, lse_part,
            q3.stride(0), q3.stride(1), idx2.stride(0),
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            h, k, split_len, scale * math.log2(math.e))
    meta = {"D_NOPE": d_v, "D_ROPE": d_rope, "BLOCK_H": block_h, "FP8": fp8}
    if q.is_cuda:
        _decode_tuned[grid](*args, **meta)
    else:  # the interpreter: one small config
        _decode_kernel[grid](*args, **meta, BLOCK_N=16)
    if num_splits > 1:
        _combine_kernel[(h, rows)](o_part, lse_part, out.view(rows, h, d_v), lse.view(rows, h), num_splits,
                                   o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                   lse_part.stride(0), lse_part.stride(1), h * d_v, d_v, h,
                                   D_V=d_v, BLOCK_S=triton.next_power_of_2(num_splits))
    return out, lse


if triton is not None:
    @triton.jit
    def _gather_kv(kv8, kv32, kv16, slot, valid,
                   D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr):
        """Latents of BLOCK_N slots as bf16: nope [BLOCK_N, D_NOPE], rope [BLOCK_N, D_ROPE], zeros
        where not valid. Row strides are constants (contiguous rows) so that the loads vectorise."""
        row = slot.to(tl.int64)
        dr = tl.arange(0, D_ROPE)
        if FP8:
            NG: tl.constexpr = D_NOPE // 128
            ROW: tl.constexpr = D_NOPE + 4 * NG + 2 * D_ROPE                              # bytes
            g = tl.arange(0, NG)
            c = tl.arange(0, 128)
            p8 = kv8 + row[:, None, None] * ROW + g[None, :, None] * 128 + c[None, None, :]
            q8 = tl.load(p8, mask=valid[:, None, None], other=0)                          # [N, NG, 128]
            scl = tl.load(kv32 + row[:, None] * (ROW // 4) + D_NOPE // 4 + g[None, :],
                         mask=valid[:, None], other=0.0)                                  # [N, NG]
            x = q8.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scl[:, :, None]
            nope = tl.reshape(x.to(tl.bfloat16), (BLOCK_N, D_NOPE))
            rope = tl.load(kv16 + row[:, None] * (ROW // 2) + (D_NOPE + 4 * NG) // 2 + dr[None, :],
                           mask=valid[:, None], other=0.0)
        else:
            ROW16: tl.constexpr = D_NOPE + D_ROPE
            dn = tl.arange(0, D_NOPE)
            nope = tl.load(kv16 + row[:, None] * ROW16 + dn[None, :], mask=valid[:, None], other=0.0)
            rope = tl.load(kv16 + row[:, None] * ROW16 + D_NOPE + dr[None, :], mask=valid[:, None], other=0.0)
        return nope, rope

    @triton.jit
    def _decode_kernel(q_ptr, kv8, kv32, kv16, idx_ptr, o_ptr, lse_ptr,
                       sq_r, sq_h, si_r, so_s, so_r, so_h, sl_s, sl_r,
                       H, K, split_len, qk_scale,
                       D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, FP8: tl.constexpr):
        """One program: heads [BLOCK_H] of one row, indices [start, start + split_len)."""
        pid_h, pid_s, r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        dn, dr = tl.arange(0, D_NOPE), tl.arange(0, D_ROPE)
        q_row = q_ptr + r.to(tl.int64) * sq_r + heads[:, None] * sq_h
        q_nope = tl.load(q_row + dn[None, :], mask=hmask[:, None], other=0.0)            # [BH, D_NOPE]
        q_rope = tl.load(q_row + D_NOPE + dr[None, :], mask=hmask[:, None], other=0.0)   # [BH, D_ROPE]

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)   # running max, log2 units
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D_NOPE], tl.float32)
        start = pid_s * split_len
        end = tl.minimum(start + split_len, K)
        idx_row = idx_ptr + r.to(tl.int64) * si_r
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            slot = tl.load(idx_row + offs, mask=offs < end, other=-1)
            valid = slot >= 0
            k_nope, k_rope = _gather_kv(kv8, kv32, kv16, tl.where(valid, slot, 0), valid,
                                        D_NOPE, D_ROPE, BLOCK_N, FP8)
            sc = tl.dot(q_nope, tl.trans(k_nope))
            sc = tl.dot(q_rope, tl.trans(k_rope), sc)                                     # [BH, BN]
            sc = tl.where(valid[None, :], sc * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep p = 0
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(sc - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), k_nope, acc * alpha[:, None])                # [BH, D_NOPE]
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        o_row = o_ptr + pid_s.to(tl.int64) * so_s + r.to(tl.int64) * so_r
        tl.store(o_row + heads[:, None] * so_h + dn[None, :], out.to(o_ptr.dtype.element_ty), mask=hmask[:, None])
        tl.store(lse_ptr + pid_s * sl_s + r * sl_r + heads, lse, mask=hmask)

    # The gather's addresses come from a load, so Triton's pipeliner splits the stages between the
    # index load and the gather: 5 stages put the gather two tiles ahead of the MMAs (one in
    # flight while a tile computes); 2 stages only one ahead, waited for at once. 64 x 576 bf16
    # tiles do not fit 5 stages in shared memory, so the bigger tile gets the shallow pipeline.
    _decode_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn}, num_warps=8, num_stages=st) for bn, st in ((32, 5), (64, 2))],
        key=["H", "split_len", "D_NOPE", "BLOCK_H", "FP8"],
    )(_decode_kernel)

    @triton.jit
    def _combine_kernel(o_part, lse_part, out_ptr, lse_ptr, num_splits,
                        so_s, so_r, so_h, sl_s, sl_r, sout_r, sout_h, slse_r,
                        D_V: tl.constexpr, BLOCK_S: tl.constexpr):
        """Merge the splits of one (head, row): out = sum_s exp(lse_s - lse) * out_s."""
        h, r = tl.program_id(0), tl.program_id(1).to(tl.int64)
        sp = tl.arange(0, BLOCK_S)
        lse_s = tl.load(lse_part + sp * sl_s + r * sl_r + h, mask=sp < num_splits, other=float("-inf"))
        m = tl.max(lse_s, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)  # no split saw a valid index: weights all 0
        total = tl.sum(tl.exp(lse_s - m_use), 0)
        d = tl.arange(0, D_V)
        acc = tl.zeros([D_V], tl.float32)
        for i in range(num_splits):
            w = tl.exp(tl.load(lse_part + i * sl_s + r * sl_r + h) - m_use)
            acc += w * tl.load(o_part + i * so_s + r * so_r + h * so_h + d)
        out = acc / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + r * sout_r + h * sout_h + d, out.to(out_ptr.dtype.element_ty))
        lse = tl.where(total > 0, m_use + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        tl.store(lse_ptr + r * slse_r + h, lse)
