"""The sharded layers `parallelize` swaps in (by class, keeping parameter names), and the
collectives they use: plain torch.distributed calls, wrapped for autograd where training needs them.

Row-parallel linears and the vocabulary-parallel embedding add up partial results (all-reduce);
the vocabulary-parallel head gathers its logits. FP8Linear keeps the checkpoint's e4m3 weight and
its 128x128 scales and dequantises per call (the plain-torch path; an FP8 GEMM kernel replaces it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dsv32.model.fp8 import FP8, weight_dequant


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
    """The weight to multiply with: dequantised if it is stored in FP8."""
    w = linear.weight
    if w.dtype == FP8:
        return weight_dequant(w, linear.weight_scale_inv, linear.fp8_block, dtype)
    return w


class FP8Linear(nn.Linear):
    """A Linear whose weight stays e4m3 with `weight_scale_inv` [ceil(out/bm), ceil(in/bn)]."""

    def forward(self, x):
        return F.linear(x, weight_of(self, x.dtype), self.bias)


class RowParallelLinear(nn.Linear):
    """Holds columns [in/tp] of the full weight: y = all_reduce(x_local @ W_local^T) + bias."""

    def forward(self, x):
        y = all_reduce(F.linear(x, weight_of(self, x.dtype)), self.tp_group)
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
