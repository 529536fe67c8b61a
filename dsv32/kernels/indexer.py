"""Lightning-indexer logits with ReLU, per-head weights and the head sum fused, so the per-head
scores [.., H, T] never exist:

    logits[b, s, t] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, t] * q_scale[b, s, h] * k_scale[b, t])

`indexer_logits` is the prefill op: every query of a sequence against all of its keys, -inf at
keys t >= k_end[b, s] (causality); it is differentiable in q, k and w (stage 1 and 2 train the
indexer through it), with a backward that recomputes the per-head dots a query chunk at a time
instead of storing them. `indexer_logits_paged` is the decode op: n >= 1 new queries per sequence (1
or 2 held in registers; more, a verifying decode's, reloaded per key tile) against the paged indexer
cache of dsv32/engine/cache.py, either bf16 rows [num_slots, D] (slot = block * PAGE + offset) or
FP8 pages [num_blocks, PAGE * (D + 4)] uint8, DeepGEMM's and vLLM's layout: a page's PAGE keys of D
e4m3 bytes each, then their PAGE fp32 scales. 132 B per token at D = 128, the bytes that bound
decode at long context (kernel-anchors §2.2, §3); keeping the scales apart starts every key at a
multiple of D bytes, so the kernel loads keys in 16-byte vectors (132-byte interleaved rows allowed
only 4-byte loads).

FP8 inputs run the dot on the raw e4m3 values (Hopper's FP8 tensor cores). The scales are
positive, so relu(d * qs * ks) * w = relu(d) * (w * qs) * ks: w absorbs the query scale before
the ReLU-weighted sum and the key scale multiplies each key's head sum once. (Scales must be
non-negative, as amax-based scales are.)
"""

import functools
import os

import torch

from dsv32.kernels import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work
    triton = None

FP8 = torch.float8_e4m3fn
LOGIT_CHUNK = 1 << 28  # fp32 elements of per-head logits the reference holds at once (~1 GiB)
NEG = float("-inf")


# --- references --------------------------------------------------------------------------------

def indexer_logits_ref(q, k, w, q_scale=None, k_scale=None, k_end=None) -> torch.Tensor:
    """q: [B, S, H, D], k: [B, T, D], w: [B, S, H] fp32, q_scale: [B, S, H], k_scale: [B, T],
    k_end: [B, S] int -> [B, S, T] fp32. The fp32 einsums of Indexer.forward, chunked over queries."""
    b, s, h, _ = q.shape
    t = k.shape[1]
    qf = q.float() if q_scale is None else q.float() * q_scale.float()[..., None]
    kf = k.float() if k_scale is None else k.float() * k_scale.float()[..., None]
    out = torch.empty(b, s, t, dtype=torch.float32, device=q.device)
    chunk = max(1, LOGIT_CHUNK // max(1, b * h * t))
    for i in range(0, s, chunk):
        per_head = torch.einsum("bshd,btd->bsht", qf[:, i:i + chunk], kf).relu()
        out[:, i:i + chunk] = torch.einsum("bsht,bsh->bst", per_head, w[:, i:i + chunk].float())
    if k_end is not None:
        out.masked_fill_(torch.arange(t, device=q.device) >= k_end[..., None], NEG)
    return out


def indexer_logits_bwd_ref(q, k, w, k_end, grad) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of indexer_logits (no scales): q: [B, S, H, D], k: [B, T, D], w: [B, S, H],
    k_end: [B, S] or None, grad: [B, S, T] -> (dq, dk, dw) in the dtypes of q, k, w. With
    d = q[s, h] . k[t] and g = grad (0 at masked keys):
        dw[s, h] = sum_t g[s, t] relu(d),   dq[s, h] = sum_t g w[s, h] 1[d > 0] k[t],
        dk[t] = sum_{s, h} g w[s, h] 1[d > 0] q[s, h].
    Recomputes d one query chunk at a time, so only q, k, w are kept for the backward."""
    b, s, h, _ = q.shape
    t = k.shape[1]
    qf, kf, wf = q.float(), k.float(), w.float()
    g = grad.float()
    if k_end is not None:  # -inf logits carry no gradient
        g = g.masked_fill(torch.arange(t, device=q.device) >= k_end[..., None], 0.0)
    dq, dw = torch.empty_like(qf), torch.empty_like(wf)
    dk = torch.zeros_like(kf)
    chunk = max(1, LOGIT_CHUNK // max(1, b * h * t))
    for i in range(0, s, chunk):
        d = torch.einsum("bshd,btd->bsht", qf[:, i:i + chunk], kf)             # [B, c, H, T]
        gi = g[:, i:i + chunk, None]                                            # [B, c, 1, T]
        dw[:, i:i + chunk] = (d.relu() * gi).sum(-1)
        dd = (d > 0) * gi * wf[:, i:i + chunk, :, None]                          # [B, c, H, T]
        dq[:, i:i + chunk] = torch.einsum("bsht,btd->bshd", dd, kf)
        dk += torch.einsum("bsht,bshd->btd", dd, qf[:, i:i + chunk])
    return dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype)


def fp8_pages(cache, d: int, block_size: int = 64):
    """An FP8 paged indexer cache [num_blocks, block_size * (d + 4)] uint8 as views of its bytes:
    (keys [num_blocks, block_size, d] uint8 e4m3 bits, scales [num_blocks, block_size] fp32)."""
    keys = cache[:, :block_size * d].unflatten(1, (block_size, d))
    return keys, cache[:, block_size * d:].view(torch.float32)


def gather_paged(cache, block_table, d: int, block_size: int = 64):
    """The keys of every position 0..max_len-1 of each sequence: ([B, max_len, D] fp32 or the
    cache dtype, k_scale [B, max_len] fp32 or None). Blocks past a sequence's end read block 0."""
    max_len = block_table.shape[1] * block_size
    t = torch.arange(max_len, device=cache.device)
    if cache.dtype != torch.uint8:
        blocks = block_table.long().clamp(0, cache.shape[0] // block_size - 1)
        return cache[blocks[:, t // block_size] * block_size + t % block_size], None  # [B, max_len, D]
    blocks = block_table.long().clamp(0, cache.shape[0] - 1)[:, t // block_size]  # [B, max_len]
    keys, scales = fp8_pages(cache, d, block_size)
    return keys[blocks, t % block_size].view(FP8).float(), scales[blocks, t % block_size]


def indexer_logits_paged_ref(q, w, cache, block_table, seq_lens, q_scale=None, block_size=64):
    """q: [B, n, H, D], w: [B, n, H], cache: [num_slots, D] or FP8 pages [num_blocks,
    block_size * (D + 4)] uint8, block_table: [B, max_blocks] int32, seq_lens: [B] (the n new
    tokens included) -> [B, n, max_blocks * block_size] fp32; query j sees keys t < seq_len - n + 1 + j."""
    n = q.shape[1]
    k, k_scale = gather_paged(cache, block_table, q.shape[-1], block_size)
    k_end = seq_lens.long()[:, None] - n + 1 + torch.arange(n, device=q.device)
    return indexer_logits_ref(q, k, w, q_scale, k_scale, k_end)


# --- dispatchers -------------------------------------------------------------------------------

_DTYPES = (torch.bfloat16, torch.float16, torch.float32, FP8)


def _check(name, x, shape, dtypes=None):
    if x is None:
        return
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {x.dtype}")


def indexer_logits(q, k, w, q_scale=None, k_scale=None, k_end=None) -> torch.Tensor:
    """Prefill indexer logits [B, S, T] fp32: see the module docstring."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, S, H, D], got {tuple(q.shape)}")
    b, s, h, d = q.shape
    if k.dim() != 3:
        raise ValueError(f"k must be [B, T, D], got {tuple(k.shape)}")
    t = k.shape[1]
    _check("q", q, (b, s, h, d), _DTYPES)
    _check("k", k, (b, t, d), _DTYPES)
    _check("w", w, (b, s, h), (torch.float32,))
    _check("q_scale", q_scale, (b, s, h), (torch.float32,))
    _check("k_scale", k_scale, (b, t), (torch.float32,))
    _check("k_end", k_end, (b, s), (torch.int32, torch.int64))
    if (q.dtype == FP8) != (q_scale is not None) or (k.dtype == FP8) != (k_scale is not None):
        raise ValueError("q_scale / k_scale go with float8_e4m3fn q / k, and only with them")
    fn = indexer_logits_triton if use_triton(q) else indexer_logits_ref
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, w)):
        if q_scale is not None or k_scale is not None:
            raise ValueError("indexer_logits is differentiable only in bf16/fp16/fp32 q and k "
                             "(FP8 inputs with scales are for inference)")
        return _IndexerLogits.apply(q, k, w, k_end, fn)
    return fn(q, k, w, q_scale, k_scale, k_end)


class _IndexerLogits(torch.autograd.Function):
    """The prefill op with a gradient (training the indexer): the forward is the Triton kernel or
    the reference, the backward indexer_logits_bwd_ref, recomputing the per-head dots."""

    @staticmethod
    def forward(ctx, q, k, w, k_end, fn):
        ctx.save_for_backward(q, k, w, k_end)
        return fn(q, k, w, None, None, k_end)

    @staticmethod
    def backward(ctx, grad):
        q, k, w, k_end = ctx.saved_tensors
        dq, dk, dw = indexer_logits_bwd_ref(q, k, w, k_end, grad)
        return dq, dk, dw, None, None


def indexer_logits_paged(q, w, cache, block_table, seq_lens, q_scale=None, block_size=64) -> torch.Tensor:
    """Decode indexer logits [B, n, max_blocks * block_size] fp32 over the paged cache: see the
    module docstring. seq_lens must not exceed max_blocks * block_size."""
    if q.dim() != 4 or q.shape[1] < 1:
        raise ValueError(f"q must be [B, n, H, D] with n >= 1, got {tuple(q.shape)}")
    b, n, h, d = q.shape
    _check("q", q, (b, n, h, d), _DTYPES)
    _check("w", w, (b, n, h), (torch.float32,))
    _check("q_scale", q_scale, (b, n, h), (torch.float32,))
    if (q.dtype == FP8) != (q_scale is not None):
        raise ValueError("q_scale goes with a float8_e4m3fn q, and only with it")
    width = block_size * (d + 4) if cache.dtype == torch.uint8 else d
    if cache.dim() != 2 or cache.shape[1] != width or cache.dtype not in _DTYPES[:3] + (torch.uint8,) \
            or cache.stride(1) != 1:
        raise ValueError(f"cache must be [num_slots, {d}] bf16/fp16/fp32 rows or [num_blocks, "
                         f"{block_size} * ({d} + 4)] uint8 FP8 pages ({block_size} x {d} e4m3 bytes, "
                         f"then {block_size} fp32 scales), each row contiguous; got "
                         f"{tuple(cache.shape)} {cache.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [{b}, max_blocks], got {tuple(block_table.shape)}")
    _check("seq_lens", seq_lens, (b,), (torch.int32, torch.int64))
    fn = indexer_logits_paged_triton if use_triton(q) else indexer_logits_paged_ref
    return fn(q, w, cache, block_table, seq_lens, q_scale, block_size)


# --- Triton ------------------------------------------------------------------------------------

def _interpreted() -> bool:
    # Triton's interpreter multiplies bf16 operands of tl.dot as raw 16-bit integers; under it
    # the kernels upcast dot operands to fp32 (exact for bf16 and e4m3 values)
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _prefill_configs():
    return [triton.Config({"BLOCK_S": bs, "BLOCK_T": bt}, num_warps=wp, num_stages=st)
            for bs, bt, wp, st in [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3)]]


# The decode launch is fixed, not autotuned (an autotuner's pick between configs a few percent
# apart changed run to run): BLOCK_T = 64 tokens per step, 4 warps, 3 stages, the config the
# autotuner chose at every benchmark shape. What depends on the shape is the span, the tokens one
# program scans: the longest of 2048, 1024, .., 128 that still gives PAGED_PROGRAMS_PER_SM
# programs per SM, so the last wave of programs is a small part of the run (b = 64 at 32K had
# 1024 programs of 2048 tokens, about 2.6 waves, and reached 70% of copy where 128K's 4096
# reached 85%). Few sequences (b = 1) get 128-token spans: the context is split across the GPU
# (split-K over tokens; every logit is independent, so nothing is reduced). Many sequences keep
# long spans, which load the [H, D] queries once per span. docs/kernels.md has the reasons.
PAGED_CONFIG = {"BLOCK_T": 64, "num_warps": 4, "num_stages": 3}
PAGED_SPANS = (2048, 1024, 512, 256, 128)
PAGED_PROGRAMS_PER_SM = 16


def _paged_configs():
    """The fixed decode config, as a list (tests run each)."""
    c = PAGED_CONFIG
    return [triton.Config({"BLOCK_T": c["BLOCK_T"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])]


def paged_launch(b: int, max_len: int, device) -> tuple["triton.Config", int]:
    """(config, span): the fixed decode launch for b sequences of max_len tokens."""
    target = PAGED_PROGRAMS_PER_SM * _num_sms(device)
    span = next((s for s in PAGED_SPANS if b * triton.cdiv(max_len, s) >= target), PAGED_SPANS[-1])
    return _paged_configs()[0], span


def _row_align(element_size: int, *strides: int) -> int:
    """The alignment, in elements, of every key row start block * page_stride + offset * row_stride
    (the base is 16-byte aligned): the largest power of two dividing both strides in bytes, at most 16."""
    align = 16
    for stride in strides:
        nbytes = stride * element_size
        align = min(align, nbytes & -nbytes) if nbytes else align
    return max(1, align // element_size)


def _check_head_dim(d: int):
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton indexer needs a power-of-two head dim >= 16, got {d}")


def _launch(kernel, tuned, grid, args, config):
    """The given config, or autotuned (the interpreter cannot time: there, the first config)."""
    if config is None and not _interpreted():
        tuned[grid](*args)
    else:
        config = config or tuned.configs[0]
        kernel[grid](*args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def indexer_logits_triton(q, k, w, q_scale=None, k_scale=None, k_end=None, *, config=None):
    """config: a triton.Config to run instead of autotuning (tests)."""
    b, s, h, d = q.shape
    t = k.shape[1]
    _check_head_dim(d)
    out = torch.empty(b, s, t, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    q, k = q.contiguous(), k.contiguous()
    w = w if q_scale is None else w * q_scale
    w = w.float().transpose(1, 2).contiguous()                  # [B, H, S]: one head's weights are contiguous
    has_ks, has_end = k_scale is not None, k_end is not None
    k_scale = k_scale.float().contiguous() if has_ks else w    # unread stand-ins when absent
    k_end = k_end.to(torch.int32).contiguous() if has_end else w
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(s, meta["BLOCK_S"]), b)
    args = (q, k, w, k_scale, k_end, out, s, t, h, has_ks, has_end, _interpreted(), d)
    _launch(_prefill_kernel, _prefill_tuned, grid, args, config)
    return out


def indexer_logits_paged_triton(q, w, cache, block_table, seq_lens, q_scale=None, block_size=64, *,
                                config=None):
    """config: a triton.Config to run instead of the fixed one of paged_launch (tests)."""
    _check_head_dim(q.shape[-1])
    out, grid, args, fixed = _paged_args(q, w, cache, block_table, seq_lens, q_scale, block_size)
    config = config or fixed
    if out.numel():
        _paged_kernel[grid](*args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def _paged_args(q, w, cache, block_table, seq_lens, q_scale, block_size):
    """The output [B, n, max_len], _paged_kernel's grid and arguments, and its fixed config."""
    b, n, h, d = q.shape
    max_len = block_table.shape[1] * block_size
    out = torch.empty(b, n, max_len, dtype=torch.float32, device=q.device)
    w = (w if q_scale is None else w * q_scale).float()
    hp = max(16, triton.next_power_of_2(h))  # heads are the MMA's N side: zero-weight padding
    if hp != h:
        q = torch.nn.functional.pad(q.view(torch.uint8) if q.dtype == FP8 else q, (0, 0, 0, hp - h))
        q = q.view(FP8) if q.dtype == torch.uint8 else q
        w = torch.nn.functional.pad(w, (0, hp - h))
    q, w = q.contiguous(), w.contiguous()
    fp8_cache = cache.dtype == torch.uint8
    if fp8_cache:  # pages: keys at block * page_stride + offset * D, scales [num_blocks, PAGE] apart
        keys, page_stride, row_stride = cache.view(FP8), cache.stride(0), d
        k_scale = fp8_pages(cache, d, block_size)[1]
    else:          # rows: slot = block * PAGE + offset
        keys, page_stride, row_stride = cache, block_size * cache.stride(0), cache.stride(0)
        k_scale = w  # unread stand-in
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    config, span = paged_launch(b, max_len, q.device)
    grid = (triton.cdiv(max_len, span), b)
    args = (q, w, keys, k_scale, table, lens, out, table.shape[1], max_len, span,
            page_stride, row_stride, k_scale.stride(0), n, hp, d, block_size,
            _row_align(keys.element_size(), page_stride, row_stride), fp8_cache, _interpreted())
    return out, grid, args, config


if triton is not None:

    @triton.jit
    def _dot(a, b_t, UPCAST: tl.constexpr):
        """a: [M, K] @ b_t: [N, K]^T -> [M, N] fp32. Mixed operands meet in fp32 if either is
        fp32, else in bf16 (exact for FP8), as do FP8 ones with K < 32 (no FP8 MMA that short)."""
        if UPCAST or a.dtype == tl.float32 or b_t.dtype == tl.float32:
            a = a.to(tl.float32)
            b_t = b_t.to(tl.float32)
        elif a.dtype != b_t.dtype or (a.dtype.primitive_bitwidth == 8 and a.shape[1] < 32):
            a = a.to(tl.bfloat16)
            b_t = b_t.to(tl.bfloat16)
        if a.dtype == tl.float32:
            out = tl.dot(a, tl.trans(b_t), input_precision="ieee")
        else:
            out = tl.dot(a, tl.trans(b_t))
        return out

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, w_ptr, ks_ptr, end_ptr, out_ptr, S, T, H,
                        HAS_KS: tl.constexpr, HAS_END: tl.constexpr, UPCAST: tl.constexpr,
                        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
        """One [BLOCK_S, BLOCK_T] tile of logits: the key tile stays put while the heads stream
        by, one MMA each (queries x keys), and the ReLU-weighted head sum accumulates in place.
        w: [B, H, S] with the query scales folded in."""
        pid_t, pid_s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, D)
        s_ok, t_ok = offs_s < S, offs_t < T
        rows = b.to(tl.int64) * S + offs_s                          # [BLOCK_S] query rows
        if HAS_END:
            end = tl.load(end_ptr + rows, mask=s_ok, other=0)
        else:
            end = tl.where(s_ok, T, 0)
        acc = tl.zeros([BLOCK_S, BLOCK_T], tl.float32)
        if pid_t * BLOCK_T < tl.max(end):  # else every key of the tile is in the future
            keys = b.to(tl.int64) * T + offs_t
            kt = tl.load(k_ptr + keys[:, None] * D + d[None, :], mask=t_ok[:, None], other=0.0)
            q_ptrs = q_ptr + rows[:, None] * (H * D) + d[None, :]   # head 0 of each query
            w_ptrs = w_ptr + b.to(tl.int64) * H * S + offs_s
            for _ in range(H):
                qh = tl.load(q_ptrs, mask=s_ok[:, None], other=0.0)  # [BLOCK_S, D]
                wh = tl.load(w_ptrs, mask=s_ok, other=0.0)           # [BLOCK_S]
                acc += tl.maximum(_dot(qh, kt, UPCAST), 0.0) * wh[:, None]
                q_ptrs += D
                w_ptrs += S
            if HAS_KS:
                acc *= tl.load(ks_ptr + keys, mask=t_ok, other=0.0)[None, :]
        acc = tl.where(offs_t[None, :] < end[:, None], acc, float("-inf"))
        tl.store(out_ptr + rows[:, None] * T + offs_t[None, :], acc, mask=s_ok[:, None] & t_ok[None, :])

    @triton.jit
    def _head_sum(kt, q, w, UPCAST: tl.constexpr):
        """kt: [BLOCK_T, D] keys, q: [H, D], w: [H] -> sum_h w[h] relu(kt . q[h]): [BLOCK_T].
        Keys are the MMA's M side, so the head sum is a row reduction inside each thread group."""
        return tl.sum(tl.maximum(_dot(kt, q, UPCAST), 0.0) * w[None, :], axis=1)

    @triton.jit
    def _paged_kernel(q_ptr, w_ptr, cache_ptr, ks_ptr, table_ptr, lens_ptr, out_ptr,
                      max_blocks, max_len, span, page_stride, row_stride, ks_stride,
                      NQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                      ROW_ALIGN: tl.constexpr, HAS_KS: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_T: tl.constexpr):
        """Tokens [span * pid, span * (pid + 1)) of sequence b, for its NQ queries; w has the
        query scales folded in. Past seq_len nothing is read, -inf is written. The key of token
        (block, off) starts at block * page_stride + off * row_stride elements of cache_ptr, its
        scale at block * ks_stride + off of ks_ptr."""
        b = tl.program_id(1)
        seq_len = tl.load(lens_ptr + b)
        hd = tl.arange(0, H)[:, None] * D + tl.arange(0, D)[None, :]
        q0 = tl.load(q_ptr + b * NQ * H * D + hd)                   # [H, D]
        w0 = tl.load(w_ptr + b * NQ * H + tl.arange(0, H))          # [H]
        if NQ == 2:
            q1 = tl.load(q_ptr + (b * NQ + 1) * H * D + hd)
            w1 = tl.load(w_ptr + (b * NQ + 1) * H + tl.arange(0, H))
        out0 = out_ptr + b.to(tl.int64) * NQ * max_len
        start = tl.program_id(0) * span
        stop = tl.minimum(start + span, max_len)
        live = tl.minimum(stop, seq_len)                            # tokens with keys to read
        d = tl.arange(0, D)
        for t0 in range(start, live, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            ok = offs < seq_len
            block = tl.load(table_ptr + b * max_blocks + offs // PAGE, mask=ok, other=0).to(tl.int64)
            off = offs % PAGE
            # every key row starts ROW_ALIGN-aligned (16 bytes for bf16 rows, and for FP8 pages
            # with PAGE % 4 == 0) and runs D contiguous elements: 16-byte vector loads
            row = tl.multiple_of(block * page_stride + off * row_stride, ROW_ALIGN)
            kt = tl.load(cache_ptr + row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            if NQ <= 2:  # the queries stay in registers across the tiles
                l0 = _head_sum(kt, q0, w0, UPCAST)
                if NQ == 2:
                    l1 = _head_sum(kt, q1, w1, UPCAST)
                if HAS_KS:
                    ks = tl.load(ks_ptr + block * ks_stride + off, mask=ok, other=0.0)
                    l0 *= ks
                    if NQ == 2:
                        l1 *= ks
                tl.store(out0 + offs, tl.where(offs < seq_len - NQ + 1, l0, float("-inf")), mask=offs < stop)
                if NQ == 2:
                    tl.store(out0 + max_len + offs, tl.where(ok, l1, float("-inf")), mask=offs < stop)
            else:  # more queries (a verifying decode's drafts): each is reloaded per tile (L1/L2 hits)
                if HAS_KS:
                    ks = tl.load(ks_ptr + block * ks_stride + off, mask=ok, other=0.0)
                for j in tl.static_range(NQ):
                    qj = tl.load(q_ptr + (b * NQ + j) * H * D + hd)
                    wj = tl.load(w_ptr + (b * NQ + j) * H + tl.arange(0, H))
                    lj = _head_sum(kt, qj, wj, UPCAST)
                    if HAS_KS:
                        lj *= ks
                    tl.store(out0 + j * max_len + offs, tl.where(offs < seq_len - NQ + 1 + j, lj, float("-inf")),
                             mask=offs < stop)
        for t0 in range(tl.maximum(live, start), stop, BLOCK_T):   # past the end: no reads
            offs = t0 + tl.arange(0, BLOCK_T)
            for j in tl.static_range(NQ):
                tl.store(out0 + j * max_len + offs, tl.full([BLOCK_T], float("-inf"), tl.float32),
                         mask=offs < stop)

    _prefill_tuned = triton.autotune(_prefill_configs(), key=["H", "D", "HAS_END"])(_prefill_kernel)
