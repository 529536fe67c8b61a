"""Top-k selection over index scores: the k largest of each row, as a set of indices.

    topk(scores [R, N] fp32, k) -> [R, k] int32, -1 where a row has fewer than k finite scores

-inf marks a key the query may not see (NaN is not supported). The order within a row is not
sorted; ties at the k-th value are broken arbitrarily, but exactly min(k, #finite) indices come back.

The Triton path is a sample-bracketed select, three launches for any number of rows:
  1. bracket: per row, two programs narrow a strided sample (4096 scores for few rows, 2048 for
     many) to two ranges of at most 2 samples around its quantiles r_hi and r_lo; their outer
     ends [t_lo, t_hi] hold the k-th largest score with overwhelming probability (4.5 sigma);
  2. partition: one pass over the scores; keys above t_hi are in the top-k and go straight to
     the output, keys in [t_lo, t_hi] go to a per-row candidate buffer (a few thousand). Few rows
     are split across programs (so one row still fills the GPU) that take slots with one atomic
     per block; many rows get one program each, counting in registers;
  3. select (one program per row): the candidates, held in registers, are narrowed with 32
     equal-width bins of the key range per pass until at most 64 remain around the k-th (about
     two passes); keys above go out, and those 64 are ranked pairwise, exactly (or, when the
     range is one value wide, its first ties are taken). A row whose bracket missed (too many or
     too few candidates: ties, adversarial data) is redone exactly by a radix select over the
     whole row.
Scores are compared as order-preserving uint32 keys (sign-folded float bits), -inf mapped to 0.
So the scores are read once (plus a 3% sample), not once per digit as in a plain radix select.
Launch parameters are fixed per shape class (FEW_ROWS, MANY_ROWS), not autotuned.
"""

import functools
import math
from dataclasses import dataclass

import torch

from dsv32.kernels import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works
    triton = None

SAMPLE_RUN = 8  # samples come in runs of 8 contiguous scores (one 32 B sector)
SIGMAS = 4.5  # bracket half-width in standard deviations of the sample rank
MAX_CAP = 8192  # candidates a select program holds in registers
BRACKET_STOP = 2  # the bracket's sample quantiles are narrowed to ranges of at most 2 samples
SELECT_STOP = 64  # the select narrows to at most 64 candidates, then ranks them pairwise


@dataclass(frozen=True)
class Launch:
    """Fixed launch parameters of one shape class (no autotuning: see docs/kernels.md).
    groups: sample runs per row (groups * SAMPLE_RUN samples); *_warps: warps per program of
    each kernel; block: scores a partition program scans per step; programs_per_sm: partition
    programs per SM that a row is split into, or 0 for one program per row, which keeps its
    counts in registers instead of taking slots with atomics."""
    groups: int
    bracket_warps: int
    select_warps: int
    block: int
    partition_warps: int
    programs_per_sm: int


# few rows (decode): a larger sample narrows the bracket, so the one-program select holds
# 4096 candidates instead of 8192; many rows (prefill): one program per row partitions it with
# its counters in registers (no atomics), and the 2048-sample bracket is cheaper per row
FEW_ROWS = Launch(groups=512, bracket_warps=8, select_warps=8, block=1024, partition_warps=4, programs_per_sm=4)
MANY_ROWS = Launch(groups=256, bracket_warps=4, select_warps=8, block=2048, partition_warps=8, programs_per_sm=0)


def topk_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores: [R, N] fp32 -> [R, k] int32 indices of the k largest, -1 where the score is -inf
    (or past the end of a row shorter than k)."""
    r, n = scores.shape
    vals, idx = scores.topk(min(k, n), dim=-1)
    idx = idx.masked_fill(vals == float("-inf"), -1).int()
    return torch.nn.functional.pad(idx, (0, k - idx.shape[1]), value=-1)


def topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest scores of each row, as indices: see the module docstring."""
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be [R, N] float32, got {tuple(scores.shape)} {scores.dtype}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    return (topk_triton if use_triton(scores) else topk_ref)(scores, k)


# --- Triton ------------------------------------------------------------------------------------

MODE_SAMPLE, MODE_ALL_CANDIDATES, MODE_ALL, MODE_FULL = 0, 1, 2, 3


@functools.lru_cache(maxsize=None)
def _plan(n: int, k: int, groups: int) -> tuple[int, int, int, int]:
    """(mode, r_hi, r_lo, cap) for rows of n scores and a sample of groups * SAMPLE_RUN: sample
    ranks that bracket the k-th largest at SIGMAS standard deviations, and the candidate capacity
    (a power of two holding the expected candidates plus 5 standard deviations of their count)."""
    if k >= n:
        return MODE_ALL, 0, 0, 1024
    if n <= MAX_CAP:
        return MODE_ALL_CANDIDATES, 0, 0, max(1024, triton.next_power_of_2(n))
    s = groups * SAMPLE_RUN
    m = k * s / n  # expected sample rank of the k-th largest
    half = SIGMAS * math.sqrt(m * (1 - k / n)) + 2
    r_hi, r_lo = max(0, math.floor(m - half)), math.ceil(m + half)
    expected = (r_lo - r_hi + 2 * BRACKET_STOP) / s * n  # each end widens by <= BRACKET_STOP samples
    cap = max(1024, triton.next_power_of_2(int(expected * (1 + 5 / math.sqrt(r_lo - r_hi)))))
    if r_lo > s or cap > MAX_CAP:
        return MODE_FULL, 0, 0, 1024
    return MODE_SAMPLE, r_hi, r_lo, cap


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _launch(rows: int, device) -> Launch:
    """MANY_ROWS once one partition program per row gives every SM 4 of them, else FEW_ROWS."""
    return MANY_ROWS if rows >= 4 * _num_sms(device) else FEW_ROWS


def _bracket(scores: torch.Tensor, k: int, launch: Launch):
    """Launch the bracket kernel: returns (mode, cap, bounds [R, 2] int64 (t_lo, t_hi) keys,
    counts [R, 2] int32 zeroed for the partition)."""
    r, n = scores.shape
    # at least two sample runs' worth of scores per group, so the sample spans the whole row
    groups = max(1, min(launch.groups, triton.next_power_of_2(n // (2 * SAMPLE_RUN) + 1) // 2))
    mode, r_hi, r_lo, cap = _plan(n, k, groups)
    bounds = torch.empty(r, 2, dtype=torch.int64, device=scores.device)
    counts = torch.empty(r, 2, dtype=torch.int32, device=scores.device)  # (#sure, #candidates)
    gstride = (n // groups) // SAMPLE_RUN * SAMPLE_RUN
    _bracket_kernel[(r, 2)](scores, scores.stride(0), counts, bounds, gstride, r_hi, r_lo,
                            MODE=mode, GROUPS=groups, RUN=SAMPLE_RUN, STOP=BRACKET_STOP,
                            num_warps=launch.bracket_warps)
    return mode, cap, bounds, counts


def topk_triton(scores: torch.Tensor, k: int, launch: Launch | None = None) -> torch.Tensor:
    """launch: fixed launch parameters to use instead of the shape class's (tests, sweeps)."""
    r, n = scores.shape
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    out = torch.empty(r, k, dtype=torch.int32, device=scores.device)
    if r == 0:
        return out
    if n == 0:
        return out.fill_(-1)
    launch = launch or _launch(r, scores.device)
    mode, cap, bounds, counts = _bracket(scores, k, launch)
    cand = _partition(scores, k, launch, mode, cap, bounds, counts, out)
    scratch = torch.empty(r, 2, SELECT_STOP, dtype=torch.int32, device=scores.device)
    _select_kernel[(r,)](scores, scores.stride(0), n, k, bounds, counts, out, cand, scratch,
                         MODE=mode, CAP=cap, BLOCK=2048, STOP=SELECT_STOP, num_warps=launch.select_warps)
    return out


def _partition(scores, k, launch, mode, cap, bounds, counts, out):
    """Launch the partition kernel (sure keys into out, counts filled): returns the candidate
    buffer [R, 2, cap] int32 (keys, indices)."""
    r, n = scores.shape
    cand = torch.empty(r, 2, cap, dtype=torch.int32, device=scores.device)
    if mode != MODE_FULL:
        blocks = triton.cdiv(n, launch.block)
        per = blocks
        if launch.programs_per_sm:
            per = max(1, min(blocks, (r * blocks) // (launch.programs_per_sm * _num_sms(scores.device))))
        split = triton.cdiv(blocks, per)
        # one program per row counts in registers; split rows take slots with atomics
        _partition_kernel[(r, split)](
            scores, scores.stride(0), n, k, bounds, counts, out, cand, per,
            CAP=cap, BLOCK=launch.block, LOCAL=split == 1, num_warps=launch.partition_warps)
    return cand


if triton is not None:

    @triton.jit
    def _keys(x):
        """fp32 -> uint32 keys in the same order; -inf (not allowed) -> 0, everything else >= 1."""
        u = x.to(tl.uint32, bitcast=True)
        key = tl.where((u >> 31) != 0, ~u, u | 0x80000000)
        return tl.where(key > 0x7FFFFF, key, 0)

    @triton.jit
    def _pick_bin(hist, rem, shift):
        """hist: [32] counts of the next digit; the digit holding the rem-th largest and how many
        counted keys lie above it. Returns (digit << shift as uint32, above)."""
        d = tl.arange(0, 32)
        above = tl.sum(hist) - tl.cumsum(hist)  # keys in higher digits than d
        hit = (above < rem) & (above + hist >= rem)
        digit = tl.max(tl.where(hit, d, 0))
        return digit.to(tl.uint32) << shift, tl.sum(tl.where(d == digit, above, 0))

    @triton.jit
    def _high_bits(shift):
        """uint32 mask of the bits at and above `shift` (0 <= shift <= 32)."""
        return ((tl.full((), 0xFFFFFFFF, tl.int64) << shift) & 0xFFFFFFFF).to(tl.uint32)

    @triton.jit
    def _narrow(key, valid, rank, lo, hi, STOP: tl.constexpr):
        """key: [M] uint32, valid: [M]; the rank-th largest valid key lies in [lo, hi] (1 <= rank
        <= #valid keys inside). Narrows [lo, hi] around it, 32 equal-width bins per pass, until at
        most STOP valid keys lie inside or it is one key wide. Equal-width bins of the key range,
        not radix digits: a bracket that straddles an exponent splits evenly from the first pass.
        Returns (lo, hi) int64, the rank within them, and how many valid keys lie inside."""
        d32 = tl.arange(0, 32)
        lo = tl.zeros((), tl.int64) + lo  # the range's ends as int64 scalars (hi + 1 may be 2^32);
        hi = tl.zeros((), tl.int64) + hi  # the per-key work stays in uint32
        rank = tl.zeros((), tl.int32) + rank
        inside = tl.sum((valid & (key >= lo.to(tl.uint32)) & (key <= hi.to(tl.uint32))).to(tl.int32))
        while (inside > STOP) & (hi > lo):
            s = tl.zeros((), tl.int64)  # bins 2^s keys wide: (hi - lo) >> s < 32
            while ((hi - lo) >> s) >= 32:
                s += 1
            lo32 = lo.to(tl.uint32)
            m = valid & (key >= lo32) & (key <= hi.to(tl.uint32))
            hist = tl.histogram(tl.where(m, (key - lo32) >> s.to(tl.uint32), 0).to(tl.int32), 32, mask=m)
            higher = inside - tl.cumsum(hist)  # keys inside, in bins above each bin
            hit = (higher < rank) & (higher + hist >= rank)
            dig = tl.max(tl.where(hit, d32, 0))
            rank -= tl.sum(tl.where(d32 == dig, higher, 0))
            inside = tl.sum(tl.where(d32 == dig, hist, 0))
            lo = lo + (dig.to(tl.int64) << s)
            hi = tl.minimum(hi, lo + (tl.full((), 1, tl.int64) << s) - 1)
        return lo, hi, rank, inside

    @triton.jit
    def _bracket_kernel(x_ptr, stride_x, counts_ptr, bounds_ptr, gstride, r_hi, r_lo,
                        MODE: tl.constexpr, GROUPS: tl.constexpr, RUN: tl.constexpr,
                        STOP: tl.constexpr):
        """Program (row, 0) zeroes the row's partition counters and stores t_lo, program (row, 1)
        stores t_hi: the two sample selections run side by side (one row is latency-bound)."""
        row, hi = tl.program_id(0), tl.program_id(1)
        if hi == 0:
            tl.store(counts_ptr + 2 * row + tl.arange(0, 2), tl.zeros([2], tl.int32))
        # defaults: MODE_ALL_CANDIDATES takes every allowed key as a candidate and none as sure;
        # MODE_ALL (t_hi = 0) takes every allowed key as sure
        bound = tl.where(hi == 0, 1, tl.where(MODE == 2, 0, 0xFFFFFFFF)).to(tl.int64)
        if MODE == 0:  # sample quantiles: ranks r_lo and r_hi (1-based, from the top)
            offs = tl.arange(0, GROUPS)[:, None] * gstride + tl.arange(0, RUN)[None, :]
            keys = _keys(tl.load(x_ptr + row.to(tl.int64) * stride_x + offs))
            keys = tl.reshape(keys, [GROUPS * RUN])
            allowed = keys > 0
            rank = tl.where(hi == 0, r_lo, r_hi)
            if (rank > 0) & (tl.sum(allowed.to(tl.int32)) >= rank):
                # a range of at most STOP samples holding the rank-th: its low end bounds t_lo
                # from below, its high end t_hi from above (the bracket only widens)
                lo, up, _, _ = _narrow(keys, allowed, rank, 1, 0xFFFFFFFF, STOP)
                bound = tl.where(hi == 0, lo, up)
        tl.store(bounds_ptr + 2 * row + hi, bound)

    @triton.jit
    def _partition_kernel(x_ptr, stride_x, n, k, bounds_ptr, counts_ptr, out_ptr, cand_ptr,
                          blocks_per_prog, CAP: tl.constexpr, BLOCK: tl.constexpr, LOCAL: tl.constexpr):
        """Keys > t_hi -> out[row, :k]; keys in [t_lo, t_hi] -> the row's candidates (<= CAP).
        LOCAL: this program owns the whole row and keeps the two counts in registers, storing
        them at the end; else slots are taken with one atomic per count and block."""
        row = tl.program_id(0)
        t_lo = tl.load(bounds_ptr + 2 * row).to(tl.uint32)
        t_hi = tl.load(bounds_ptr + 2 * row + 1).to(tl.uint32)
        x_row = x_ptr + row.to(tl.int64) * stride_x
        out_row = out_ptr + row.to(tl.int64) * k
        cand_row = cand_ptr + row.to(tl.int64) * 2 * CAP
        start = tl.program_id(1) * blocks_per_prog * BLOCK
        n_s = tl.zeros((), tl.int32)
        n_m = tl.zeros((), tl.int32)
        for b in range(0, blocks_per_prog):
            offs = start + b * BLOCK + tl.arange(0, BLOCK)
            key = _keys(tl.load(x_row + offs, mask=offs < n, other=float("-inf")))
            sure = key > t_hi
            mid = (key >= t_lo) & (key <= t_hi)
            # one scan for both sets: sure counts in the low 16 bits, candidates in the high
            tag = sure.to(tl.int32) + (mid.to(tl.int32) << 16)
            total = tl.sum(tag)
            if total > 0:
                rank = tl.cumsum(tag) - tag  # exclusive
                if LOCAL:
                    base_s = n_s
                    base_m = n_m
                else:
                    base_s = tl.atomic_add(counts_ptr + 2 * row, total & 0xFFFF, sem="relaxed")
                    base_m = tl.atomic_add(counts_ptr + 2 * row + 1, total >> 16, sem="relaxed")
                pos_s = base_s + (rank & 0xFFFF)
                pos_m = base_m + (rank >> 16)
                tl.store(out_row + pos_s, offs, mask=sure & (pos_s < k))
                tl.store(cand_row + pos_m, key.to(tl.int32, bitcast=True), mask=mid & (pos_m < CAP))
                tl.store(cand_row + CAP + pos_m, offs, mask=mid & (pos_m < CAP))
                n_s += total & 0xFFFF
                n_m += total >> 16
        if LOCAL:
            tl.store(counts_ptr + 2 * row + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, n_s, n_m))

    @triton.jit
    def _write(out_row, base, key, idx, valid, tau, ties, eq_seen, k):
        """Write idx where key > tau, and where key == tau while fewer than `ties` were taken."""
        gt = valid & (key > tau)
        eq = valid & (key == tau)
        eq_rank = eq_seen + tl.cumsum(eq.to(tl.int32)) - 1
        take = gt | (eq & (eq_rank < ties))
        pos = base + tl.cumsum(take.to(tl.int32)) - 1
        tl.store(out_row + pos, idx, mask=take & (pos < k))
        return base + tl.sum(take.to(tl.int32)), eq_seen + tl.sum(eq.to(tl.int32))

    @triton.jit
    def _select_candidates(cand_row, n_cand, need, t_lo, t_hi, out_row, base, scratch_row,
                           CAP: tl.constexpr, STOP: tl.constexpr):
        """Write the `need` largest of the row's n_cand candidates (keys in [t_lo, t_hi]) at
        out_row[base:]: narrow to a range holding at most STOP of them (or one key value), take
        every key above it, and pick the rest of the range by exact pairwise rank (ties by
        position) after compacting it through scratch_row; a one-value range takes its first."""
        i = tl.arange(0, CAP)
        valid = i < n_cand
        key = tl.load(cand_row + i, mask=valid, other=0).to(tl.uint32, bitcast=True)
        idx = tl.load(cand_row + CAP + i, mask=valid, other=-1)
        lo, hi, rank, inside = _narrow(key, valid, need, t_lo.to(tl.int64), t_hi.to(tl.int64), STOP)
        gt = valid & (key > hi.to(tl.uint32))
        inb = valid & (key >= lo.to(tl.uint32)) & (key <= hi.to(tl.uint32))
        tag = gt.to(tl.int32) + (inb.to(tl.int32) << 16)  # one scan: above in low bits, inside high
        pre = tl.cumsum(tag) - tag
        n_gt = need - rank
        tl.store(out_row + base + (pre & 0xFFFF), idx, mask=gt)
        pos = pre >> 16  # order among the keys inside
        if inside <= STOP:
            tl.store(scratch_row + pos, key.to(tl.int32, bitcast=True), mask=inb)
            tl.store(scratch_row + STOP + pos, idx, mask=inb)
            tl.debug_barrier()  # the compacted range, written by all threads, read by all
            j = tl.arange(0, STOP)
            ok = j < inside
            kj = tl.load(scratch_row + j, mask=ok, other=0).to(tl.uint32, bitcast=True)
            ij = tl.load(scratch_row + STOP + j, mask=ok, other=-1)
            # keys ahead of j: larger, or equal and earlier
            ahead = (kj[None, :] > kj[:, None]) | ((kj[None, :] == kj[:, None]) & (j[None, :] < j[:, None]))
            r = tl.sum((ahead & ok[None, :]).to(tl.int32), axis=1)
            tl.store(out_row + base + n_gt + r, ij, mask=ok & (r < rank))
        else:  # lo == hi: all ties
            tl.store(out_row + base + n_gt + pos, idx, mask=inb & (pos < rank))
        return base + need

    @triton.jit
    def _select_row(x_row, n, k, out_row, BLOCK: tl.constexpr):
        """Exact top-k of a whole row from memory: 5-bit radix passes over all n scores."""
        tau = tl.zeros((), tl.uint32)
        rem = k
        shift = 32
        while shift > 0:
            width = tl.minimum(shift, 5)
            shift -= width
            known = _high_bits(shift + width)
            hist = tl.zeros([32], tl.int32)
            for s in range(0, n, BLOCK):
                offs = s + tl.arange(0, BLOCK)
                key = _keys(tl.load(x_row + offs, mask=offs < n, other=float("-inf")))
                digit = (key >> shift) & ((1 << width) - 1).to(tl.uint32)
                hist += tl.histogram(digit.to(tl.int32), 32,
                                     mask=(key > 0) & ((key & known) == (tau & known)))
            if shift + width == 32:  # first pass: fewer allowed keys than k -> take them all
                if tl.sum(hist) <= rem:
                    rem = 0
                    shift = 0
                    width = 0
            if width > 0:
                bits, above = _pick_bin(hist, rem, shift)
                tau = tau | bits
                rem -= above
        written = tl.zeros((), tl.int32)
        eq_seen = tl.zeros((), tl.int32)
        for s in range(0, n, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            key = _keys(tl.load(x_row + offs, mask=offs < n, other=float("-inf")))
            written, eq_seen = _write(out_row, written, key, offs, key > 0, tau, rem, eq_seen, k)
        return written

    @triton.jit
    def _select_kernel(x_ptr, stride_x, n, k, bounds_ptr, counts_ptr, out_ptr, cand_ptr, scratch_ptr,
                       MODE: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, STOP: tl.constexpr):
        row = tl.program_id(0)
        out_row = out_ptr + row.to(tl.int64) * k
        n_sure = tl.load(counts_ptr + 2 * row)
        n_cand = tl.load(counts_ptr + 2 * row + 1)
        t_lo = tl.load(bounds_ptr + 2 * row).to(tl.uint32)
        t_hi = tl.load(bounds_ptr + 2 * row + 1).to(tl.uint32)
        ok = (n_sure <= k) & (n_cand <= CAP) & ((n_sure + n_cand >= k) | (t_lo == 1)) & (MODE != 3)
        if ok:
            need = tl.minimum(k - n_sure, n_cand)
            written = n_sure
            if need > 0:
                written = _select_candidates(cand_ptr + row.to(tl.int64) * 2 * CAP, n_cand, need,
                                             t_lo, t_hi, out_row, n_sure,
                                             scratch_ptr + row.to(tl.int64) * 2 * STOP, CAP, STOP)
        else:  # the bracket missed: redo the row exactly
            written = _select_row(x_ptr + row.to(tl.int64) * stride_x, n, k, out_row, BLOCK)
        for s in range(0, k, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            tl.store(out_row + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs >= written) & (offs < k))
