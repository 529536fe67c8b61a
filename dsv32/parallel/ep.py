"""Expert parallelism: each of ep ranks holds n_routed_experts / ep routed experts; tokens go to
the rank of each chosen expert and come back with one all-to-all each way (variable splits).

Training (FSDP2): every rank routes its own tokens. Serving: every rank holds the same tokens (after
the tensor-parallel attention), so each rank dispatches only its 1/ep slice of them and the
results are all-gathered, and no expert runs twice on a token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from dsv32.model.moe import MoE
from dsv32.parallel.layers import all_gather_rows, all_to_all


def dispatch_combine(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: nn.ModuleDict,
                     n_experts: int, ep: int, group) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for this rank's tokens, every expert on its
    owner rank. x: [T, D]; weights, ids: [T, k] -> [T, D]."""
    k = ids.shape[1]
    n_local = n_experts // ep
    flat = ids.flatten()
    order = flat.argsort(stable=True)                                  # rows grouped by expert
    tok = order // k                                                   # [T*k] source token of each row
    counts = torch.bincount(flat, minlength=n_experts)                 # [E] rows for each expert
    got = torch.empty_like(counts)                                     # [ep * n_local] from each rank
    dist.all_to_all_single(got, counts, group=group)
    send = counts.view(ep, n_local).sum(1).tolist()
    recv = got.view(ep, n_local).sum(1).tolist()
    xr = all_to_all(x[tok], send, recv, group)                         # [R, D] by source, then expert
    which = torch.arange(n_local, device=x.device).repeat(ep).repeat_interleave(got)  # [R]
    out = torch.zeros_like(xr)
    first = next(iter(experts))
    for j, n in enumerate(got.view(ep, n_local).sum(0).tolist()):
        if n:
            rows = torch.where(which == j)[0]
            out.index_add_(0, rows, experts[str(int(first) + j)](xr[rows]).to(xr.dtype))
    back = all_to_all(out, recv, send, group)                          # [T*k, D] in `order`
    y = torch.zeros_like(x)
    return y.index_add_(0, tok, (back * weights.flatten()[order, None]).to(x.dtype))


class ExpertParallelMoE(MoE):
    """MoE with `experts` = this rank's ModuleDict {str(e): MLP} (so names stay the official
    ones); set by `parallelize`: ep, ep_group, replicated_tokens."""

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None = None):
        """x: [B, S, D] -> (y [B, S, D], expert ids [B*S, k], gate scores [B*S, E]), as MoE."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # [T, D]
        weights, ids, scores = self.gate(x, forced_ids)
        lo, hi = 0, x.shape[0]
        if self.replicated_tokens:                                     # this rank's slice of the tokens
            per = -(-x.shape[0] // self.ep)
            rank = dist.get_rank(self.ep_group)
            lo, hi = min(rank * per, x.shape[0]), min((rank + 1) * per, x.shape[0])
        xs = x[lo:hi]
        y = dispatch_combine(xs, weights[lo:hi], ids[lo:hi], self.experts, self.cfg.n_routed_experts,
                             self.ep, self.ep_group)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xs)
        if self.replicated_tokens:
            y = torch.cat([y, y.new_zeros(per - (hi - lo), y.shape[1])])
            y = all_gather_rows(y, self.ep_group, self.ep)[:x.shape[0]]
        return y.view(shape), ids, scores


def shard_experts(moe: MoE, owned: list[int], ep: int, group, replicated_tokens: bool) -> None:
    """Turn a MoE into an ExpertParallelMoE keeping only the experts in `owned` (consecutive)."""
    moe.experts = nn.ModuleDict({str(e): moe.experts[e] for e in owned})
    moe.__class__ = ExpertParallelMoE
    moe.ep, moe.ep_group, moe.replicated_tokens = ep, group, replicated_tokens
