"""The sharded layers `parallelize` swaps in (by class, keeping parameter names), and the
collectives they use: plain torch.distributed calls, wrapped for autograd where training needs them.

Row-parallel linears and the vocabulary-parallel embedding add up partial results (all-reduce);
the vocabulary-parallel head gathers its logits. FP8Linear and RowParallelLinear with an e4m3
weight multiply through `dsv32.model.fp8.fp8_linear`, the same function as the single-device
FP8Linear (activations quantised per 1x128, FP8 GEMM with the 128x128 scales), whenever the
shard lies on whole 128x128 blocks; a shard that cuts a block dequantises per call (see local_linear).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dsv32.model.fp8 import FP8, fp8_kernel_misfit, fp8_linear, weight_dequant

log = logging.getLogger(__name__)


class _AllToAll(torch.autograd.Function):
    """Rows x [sum(send), ...] to the ranks -> rows [sum(recv), ...] from them; the backward sends
    the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return _AllToAll.apply(g, ctx.recv, ctx.send, ctx.group), None, None, None


# torch 2.13 renames all_gather_into_tensor (which older releases have only)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv, group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group (serving path: no gradient flows through tensor parallelism)."""
    dist.all_reduce(x, group=group)
    return x


def all_gather_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """x: [n, ...] on every rank (same n) -> [world * n, ...] in rank order."""
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather(out, x.contiguous(), group=group)
    return out


def weight_of(linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a matrix in dtype: dequantised if it is stored in FP8 (from `fp8_offset`,
    where the shard starts inside its first block, (0, 0) unless the loader set it)."""
    w = linear.weight
    if w.dtype == FP8:
        return weight_dequant(w, linear.weight_scale_inv, linear.fp8_block, dtype,
                              getattr(linear, "fp8_offset", (0, 0)))
    return w


dequantised_calls = 0  # forwards that took local_linear's dequantise-per-call fallback (logged once)


def local_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ W_local^T -> [..., out], no bias, no communication. An e4m3 weight goes through
    fp8_linear (act_quant + the FP8 GEMM, as dsv32.model.fp8.FP8Linear) when it lies on whole
    128x128 blocks; where the shard cuts a block (its rows or columns start inside one, or its
    width is no multiple of 128) the weight is dequantised per call and multiplied unquantised: a
    fallback, counted in `dequantised_calls` and logged the first time. At V3.2's shapes every
    shard for tp = 2, 4, 8, 16 lies on whole blocks."""
    global dequantised_calls
    w = linear.weight
    if w.dtype != FP8:
        return F.linear(x, w)
    misfit = fp8_kernel_misfit(w, linear.weight_scale_inv, linear.fp8_block, getattr(linear, "fp8_offset", (0, 0)))
    if misfit is None:
        return fp8_linear(x, w, linear.weight_scale_inv)
    if not dequantised_calls:
        log.warning("an FP8 shard is dequantised per call, not multiplied in FP8: %s (weight %s)", misfit,
                    tuple(w.shape))
    dequantised_calls += 1
    return F.linear(x, weight_of(linear, x.dtype))


class FP8Linear(nn.Linear):
    """A Linear whose weight stays e4m3 with `weight_scale_inv` (the scale blocks it overlaps),
    `fp8_block` and, for a shard that starts inside a block, `fp8_offset`; see local_linear."""

    def forward(self, x):
        y = local_linear(self, x)
        return y + self.bias if self.bias is not None else y


class RowParallelLinear(nn.Linear):
    """Holds columns [in/tp] of the full weight: y = all_reduce(x_local @ W_local^T) + bias, the
    local product by local_linear (FP8 or not)."""

    def forward(self, x):
        y = all_reduce(local_linear(self, x), self.tp_group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Embedding):
    """Holds rows [vocab_start, vocab_start + vocab/tp): ids elsewhere give zeros, summed over ranks."""

    def forward(self, ids):
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside[..., None]
        return all_reduce(x, self.tp_group)


class VocabParallelHead(nn.Linear):
    """Holds rows [vocab/tp] of the head: local logits, gathered along the vocabulary."""

    def forward(self, h):
        logits = F.linear(h, self.weight)                                 # [..., V/tp]
        parts = all_gather_rows(logits.movedim(-1, 0), self.tp_group, self.tp)
        return parts.movedim(0, -1)                                       # [..., V]
