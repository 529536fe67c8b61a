"""Block-scaled FP8 GEMMs, as DeepSeek-V3 runs its linear layers and MoE experts.

Activations carry one fp32 scale per 1x128 block along K, weights one per 128x128 block (the
checkpoint's `weight_scale_inv`): out[m, n] = sum_k a[m, k] sa[m, k//128] b[n, k] sb[n//128, k//128].

Hopper's FP8 tensor cores accumulate in reduced precision, so the kernels follow DeepGEMM: each
128-deep K block is one tl.dot into a fresh fp32 tile, which is then scaled and added to the
running fp32 accumulator (the "promotion" DeepGEMM does on CUDA cores every K block). Long K
never accumulates in the imprecise tensor-core accumulator.

- `act_quant`: x [M, K] -> (e4m3 [M, K], scales [M, K/128]); the scales come back M-major
  (strides (1, M)), which the GEMM reads coalesced and cuBLASLt requires.
- `fp8_gemm`: one GEMM; small M splits K across programs so a decode step fills the GPU.
- `fp8_grouped_gemm`: MoE experts in one launch; rows grouped by expert, each program finds its
  expert from the group offsets on the device (no host sync, CUDA-graph safe).
- `fp8_gemm_cublas`: the same product through torch's cuBLASLt path (SM90, CUDA >= 12.9).
"""

import torch
import torch.nn.functional as F

from dsv32.kernels import has_triton, use_triton

if has_triton():
    import triton
    import triton.language as tl

BLOCK = 128                          # quantisation block: 1x128 activations, 128x128 weights
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max      # 448


def _check_operands(a, a_scale, b, b_scale):
    if a.dtype != FP8 or b.dtype != FP8:
        raise ValueError(f"a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() not in (2, 3):
        raise ValueError(f"a must be [M, K] and b [N, K] or [E, N, K], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[-2]
    if b.shape[-1] != k or k % BLOCK:
        raise ValueError(f"K must match and be a multiple of {BLOCK}: a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a_scale.shape != (m, k // BLOCK) or a_scale.dtype != torch.float32:
        raise ValueError(f"a_scale must be fp32 [{m}, {k // BLOCK}], "
                         f"got {a_scale.dtype} {tuple(a_scale.shape)}")
    want = (*b.shape[:-2], -(-n // BLOCK), k // BLOCK)
    if b_scale.shape != want or b_scale.dtype != torch.float32:
        raise ValueError(f"b_scale must be fp32 {list(want)}, got {b_scale.dtype} {tuple(b_scale.shape)}")


# ---------------------------------------------------------------- references (plain torch)

def act_quant_ref(x: torch.Tensor, pow2_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (e4m3 [M, K], fp32 scales [M, K/128]) with x ~= q * scale per 1x128 block.
    scale = amax / 448 (amax clamped to 1e-4), rounded up to a power of two with pow2_scale."""
    m, k = x.shape
    if k % BLOCK:
        raise ValueError(f"x's last dim {k} is not a multiple of {BLOCK}")
    xb = x.float().reshape(m, k // BLOCK, BLOCK)
    scale = xb.abs().amax(-1).clamp(min=1e-4) / FP8_MAX                  # [M, K/128]
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (xb / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(m, k), scale


def _dequant_b(b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """b: [..., N, K] e4m3, b_scale: [..., ceil(N/128), K/128] -> fp32 [..., N, K]."""
    n = b.shape[-2]
    s = b_scale.repeat_interleave(BLOCK, -2)[..., :n, :].repeat_interleave(BLOCK, -1)
    return b.float() * s


def fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """a: [M, K] e4m3, a_scale: [M, K/128]; b: [N, K] e4m3, b_scale: [ceil(N/128), K/128] -> [M, N]."""
    _check_operands(a, a_scale, b, b_scale)
    a32 = a.float() * a_scale.repeat_interleave(BLOCK, 1)
    return (a32 @ _dequant_b(b, b_scale).t()).to(out_dtype)


def fp8_grouped_gemm_ref(a, a_scale, b, b_scale, group_offsets, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Rows group_offsets[e]:group_offsets[e+1] of a times expert e of b: [E, N, K] -> [M, N]."""
    _check_grouped(a, a_scale, b, b_scale, group_offsets)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    bounds = group_offsets.tolist()
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = fp8_gemm_ref(a[lo:hi], a_scale[lo:hi], b[e], b_scale[e], out_dtype)
    return out


def _check_grouped(a, a_scale, b, b_scale, group_offsets):
    _check_operands(a, a_scale, b, b_scale)
    if b.dim() != 3:
        raise ValueError(f"b must be [E, N, K] for the grouped GEMM, got {tuple(b.shape)}")
    if group_offsets.shape != (b.shape[0] + 1,) or group_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_offsets must be int32 [E+1] = [{b.shape[0] + 1}], "
                         f"got {group_offsets.dtype} {tuple(group_offsets.shape)}")


# ---------------------------------------------------------------- Triton kernels

def _configs():
    """Short list: 128x128 tiles (acc + per-block partial = 128 fp32 registers a thread at 8
    warps; 128x256 would spill), 4 stages of (128 + 128) x 128 B = 128 KB shared memory."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 4), (128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4)]]


if has_triton():
    @triton.jit
    def _round_e4m3(v):
        """Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, in fp32 arithmetic,
        so the conversion after it is exact on every backend (Triton's interpreter rounds up
        without carrying into the exponent). No division: on the GPU `/` is approximate. Spacing: 2^(e-3) in binade e, 2^-9 below 2^-6."""
        e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3  # ulp = 2^e
        ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 1 / ulp: scaling by it is exact
        r = (tl.abs(v) * inv + 8388608.0) - 8388608.0         # + 2^23 - 2^23: round half to even
        sign = (v.to(tl.int32, bitcast=True) >> 31) << 31      # v's sign bit, kept for -0 too
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True) * ulp

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
                          POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program: BLOCK_M rows x one 128-wide K block."""
        pid_m, kb = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < M)[:, None]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4), 448.0)  # [BLOCK_M], exact
        if POW2:  # round up to a power of two on the bits: exact, unlike exp2(ceil(log2(.)))
            bits = scale.to(tl.int32, bitcast=True)
            scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        q = _round_e4m3(tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0)).to(tl.float8e4nv)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
        tl.store(s_ptr + rows * stride_sm + kb * stride_sk, scale, mask=rows < M)

    @triton.jit
    def _scaled_tile(a_ptr, b_ptr, sa_ptr, sb_ptr, rows, cols, kb_lo, kb_hi,
                     stride_am, stride_bn, stride_sam, stride_sak, stride_sbk,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 [BLOCK_M, BLOCK_N] = sum over K blocks [kb_lo, kb_hi) of (a sa) (b sb)^T.
        rows / cols are in bounds (clamped by the caller); K is a multiple of BLOCK_K; the tile's
        columns lie in one 128-row weight block (BLOCK_N divides 128), whose scales sb_ptr points at."""
        tl.static_assert(BLOCK_K % BLOCK_N == 0)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + (kb_lo * BLOCK_K + offs_k)[None, :]
        b_ptrs = b_ptr + cols[None, :] * stride_bn + (kb_lo * BLOCK_K + offs_k)[:, None]  # [BK, BN], K-major
        sa_ptrs = sa_ptr + rows * stride_sam + kb_lo * stride_sak
        sb_ptrs = sb_ptr + kb_lo * stride_sbk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(kb_lo, kb_hi):
            partial = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs))         # one 128-deep block, fp32
            acc += partial * (tl.load(sa_ptrs) * tl.load(sb_ptrs))[:, None]   # promote: one FMA each
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
            sa_ptrs += stride_sak
            sb_ptrs += stride_sbk
        return acc

    @triton.jit
    def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Program id -> (tile row, tile col), GROUP_M tile rows at a time so their B tiles stay in L2."""
        width = GROUP_M * num_pid_n
        first_m = (pid // width) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        return first_m + (pid % width) % group_m, (pid % width) // group_m

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, M_BUCKET,
                         stride_am, stride_bn, stride_cs, stride_cm,
                         stride_sam, stride_sak, stride_sbn, stride_sbk,
                         SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """c[s] = a @ b^T over K split s's blocks (one split: c is the output itself)."""
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        pid_m, pid_n = _swizzle(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        num_kb = K // BLOCK_K
        per_split = tl.cdiv(num_kb, SPLIT_K)
        kb_lo = pid_k * per_split
        kb_hi = min(kb_lo + per_split, num_kb)
        # out-of-range rows / cols read valid memory (wrapped) and are dropped at the store
        acc = _scaled_tile(a_ptr, b_ptr, sa_ptr, sb_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_sbn,
                           offs_m % M, offs_n % N, kb_lo, kb_hi, stride_am, stride_bn,
                           stride_sam, stride_sak, stride_sbk, BLOCK_M, BLOCK_N, BLOCK_K)
        c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, go_ptr, M, N, K, E, M_BUCKET,
                                 stride_am, stride_be, stride_bn, stride_cm,
                                 stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
                                 E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """Tile row t of the concatenated per-expert tile rows; the grid has cdiv(M, BLOCK_M) + E of
        them, an upper bound, and programs past the real count return at once."""
        pid = tl.program_id(0)
        t, pid_n = _swizzle(pid, tl.cdiv(M, BLOCK_M) + E, tl.cdiv(N, BLOCK_N), GROUP_M)
        experts = tl.arange(0, E_POW2)
        starts = tl.load(go_ptr + experts, mask=experts < E, other=0).to(tl.int32)
        ends = tl.load(go_ptr + experts + 1, mask=experts < E, other=0).to(tl.int32)
        tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M                    # tile rows per expert
        first = tl.cumsum(tiles, 0) - tiles                                 # first tile row of each
        if t >= tl.sum(tiles):
            return
        e = tl.sum((first + tiles <= t).to(tl.int32))                       # the expert holding row t
        mine = experts == e
        row0 = tl.sum(tl.where(mine, starts + (t - first) * BLOCK_M, 0))
        row_end = tl.sum(tl.where(mine, ends, 0))
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        sb_ptr += e * stride_sbe + (pid_n * BLOCK_N // BLOCK_K) * stride_sbn
        acc = _scaled_tile(a_ptr, b_ptr + e * stride_be, sa_ptr, sb_ptr, tl.minimum(offs_m, M - 1),
                           offs_n % N, 0, K // BLOCK_K, stride_am, stride_bn,
                           stride_sam, stride_sak, stride_sbk, BLOCK_M, BLOCK_N, BLOCK_K)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        mask = (offs_m < row_end)[:, None] & (offs_n < N)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    _CONFIGS = _configs()
    # tuned once per power-of-two bucket of M (M_BUCKET: the key only), not again for every prefill length
    _fp8_gemm_tuned = triton.autotune(_CONFIGS, key=["M_BUCKET", "N", "K"])(_fp8_gemm_kernel)
    _fp8_grouped_tuned = triton.autotune(_CONFIGS, key=["M_BUCKET", "N", "K", "E"])(_fp8_grouped_gemm_kernel)


def _launcher(tuned, kernel, device):
    """The autotuned kernel on CUDA; under the interpreter (no GPU to time configs on) the first config."""
    if device.type == "cuda":
        return tuned, {}
    return kernel, dict(_CONFIGS[0].kwargs)


_SMALL_M = 128  # at and below: memory-bound on b; one fixed config, K split to fill the SMs


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so that CPU tests exercise the split


def _split_k(tiles: int, num_kb: int, num_sms: int) -> int:
    """Largest power of two giving <= ~2 programs a SM, each with >= 4 K blocks."""
    split = 1
    while tiles * split * 2 <= 2 * num_sms and num_kb // (split * 2) >= 4:
        split *= 2
    return split


def _fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype):
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    strides = (a.stride(0), b.stride(0))
    scale_strides = (*a_scale.stride(), *b_scale.stride())
    if m > _SMALL_M:
        launch, fixed = _launcher(_fp8_gemm_tuned, _fp8_gemm_kernel, a.device)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)
        launch[grid](a, b, out, a_scale, b_scale, m, n, k, triton.next_power_of_2(m), *strides, 0,
                     out.stride(0), *scale_strides, SPLIT_K=1, BLOCK_K=BLOCK, **fixed)
        return out
    bm, bn = 64, 64
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = _split_k(tiles, k // BLOCK, _num_sms(a.device))
    c = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=a.device)
    _fp8_gemm_kernel[(tiles, split)](a, b, c, a_scale, b_scale, m, n, k, 0, *strides, m * n, n,
                                     *scale_strides, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn,
                                     BLOCK_K=BLOCK, GROUP_M=8, num_warps=4, num_stages=4)
    return out if split == 1 else c.sum(0, dtype=torch.float32).to(out_dtype)


def _fp8_grouped_gemm_triton(a, a_scale, b, b_scale, group_offsets, out_dtype):
    m, k = a.shape
    e, n, _ = b.shape
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    launch, fixed = _launcher(_fp8_grouped_tuned, _fp8_grouped_gemm_kernel, a.device)
    grid = lambda meta: ((triton.cdiv(m, meta["BLOCK_M"]) + e) * triton.cdiv(n, meta["BLOCK_N"]),)
    launch[grid](a, b, out, a_scale, b_scale, group_offsets, m, n, k, e, triton.next_power_of_2(m),
                 a.stride(0), b.stride(0), b.stride(1), out.stride(0), *a_scale.stride(), *b_scale.stride(),
                 E_POW2=triton.next_power_of_2(e), BLOCK_K=BLOCK, **fixed)
    return out


def _act_quant_triton(x, pow2_scale):
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(k // BLOCK, m, dtype=torch.float32, device=x.device).t()   # [M, K/128], M-major
    if m:
        bm = 32
        _act_quant_kernel[(triton.cdiv(m, bm), k // BLOCK)](
            x, q, scale, m, k, x.stride(0), q.stride(0), *scale.stride(),
            POW2=pow2_scale, BLOCK_M=bm, BLOCK_K=BLOCK, num_warps=4)
    return q, scale


# ---------------------------------------------------------------- public ops (dispatch)

def act_quant(x: torch.Tensor, pow2_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (e4m3 [M, K], fp32 scales [M, K/128]); see act_quant_ref."""
    if x.dim() != 2 or x.shape[1] % BLOCK:
        raise ValueError(f"x must be [M, K] with K a multiple of {BLOCK}, got {tuple(x.shape)}")
    if not use_triton(x):
        return act_quant_ref(x, pow2_scale)
    if x.stride(1) != 1:
        x = x.contiguous()
    return _act_quant_triton(x, pow2_scale)


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale)^T: a [M, K] e4m3, a_scale [M, K/128] fp32, b [N, K] e4m3,
    b_scale [ceil(N/128), K/128] fp32 (the checkpoint's weight_scale_inv) -> [M, N] out_dtype."""
    _check_operands(a, a_scale, b, b_scale)
    if b.dim() != 2:
        raise ValueError(f"b must be [N, K], got {tuple(b.shape)}")
    if not use_triton(a):
        return fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype)
    return _fp8_gemm_triton(a.contiguous(), a_scale, b.contiguous(), b_scale, out_dtype)


def fp8_grouped_gemm(a, a_scale, b, b_scale, group_offsets, out_dtype=torch.bfloat16) -> torch.Tensor:
    """MoE experts: rows group_offsets[e]:group_offsets[e+1] of a ([M, K] e4m3, grouped by expert,
    [M, K/128] scales) times b[e] ([E, N, K] e4m3, [E, ceil(N/128), K/128] scales) -> [M, N].
    The offsets (on the device; never read back) rise from 0 to M; empty groups are fine."""
    _check_grouped(a, a_scale, b, b_scale, group_offsets)
    if not use_triton(a):
        return fp8_grouped_gemm_ref(a, a_scale, b, b_scale, group_offsets, out_dtype)
    return _fp8_grouped_gemm_triton(a.contiguous(), a_scale, b.contiguous(), b_scale,
                                    group_offsets, out_dtype)


# ---------------------------------------------------------------- torch / cuBLASLt path

def cublas_weight_scale(b_scale: torch.Tensor) -> torch.Tensor:
    """[ceil(N/128), K/128] -> the layout cuBLASLt reads for 128x128 blocks of b^T: K/128 padded
    to a multiple of 4, K-major; shape [round4(K/128), ceil(N/128)], strides (1, round4(K/128))."""
    kb = b_scale.shape[1]
    return F.pad(b_scale, (0, -kb % 4)).contiguous().t()


def fp8_gemm_cublas(a, a_scale, b, b_scale_cublas, out_dtype=torch.bfloat16) -> torch.Tensor:
    """fp8_gemm through torch.nn.functional.scaled_mm (cuBLASLt's 1x128 x 128x128 recipe, SM90
    only, torch >= 2.10 and CUDA >= 12.9). b_scale_cublas = cublas_weight_scale(weight_scale_inv),
    converted once per weight. M is padded to a multiple of 4, as cuBLASLt needs."""
    m = a.shape[0]
    pad = -m % 4
    if pad:
        a = F.pad(a.view(torch.uint8), (0, 0, 0, pad)).view(FP8)
        a_scale = F.pad(a_scale, (0, 0, 0, pad), value=1.0)
    a_scale = a_scale.t().contiguous().t()                              # M-major
    kind = getattr(F, "ScalingType", None) or torch._C._ScalingType    # the latter on older torch
    out = F.scaled_mm(a, b.t(), a_scale, kind.BlockWise1x128, b_scale_cublas, kind.BlockWise128x128,
                      output_dtype=out_dtype)
    return out[:m] if pad else out
