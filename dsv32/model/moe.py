"""DeepSeekMoE: sigmoid gate with group-limited, bias-corrected top-k; routed + shared experts.

The score-correction bias (updated by aux-loss-free balancing, not by gradients) only decides
*which* experts are chosen; the mixing weights come from the uncorrected sigmoid scores,
renormalised over the chosen experts and multiplied by routed_scaling_factor.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv32.config import ModelConfig
from dsv32.model.fp8 import FP8, fp8_kernel_misfit, moe_experts_fp8, stack_fp8_experts


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense FFN, each routed expert and the shared expert."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None = None):
        """x: [T, D] -> (weights [T, k] fp32, ids [T, k] int64, sigmoid scores [T, E] fp32).

        forced_ids [T, k] replays a given routing (Keep Routing): selection is skipped, and the
        weights are recomputed from the current scores over those ids, so the router still learns.
        """
        cfg = self.cfg
        scores = (x.float() @ self.weight.float().t()).sigmoid()        # [T, E]
        if forced_ids is None:
            choice = scores.detach() + self.e_score_correction_bias
            if cfg.n_group > 1:  # keep the topk_group groups whose best two experts score highest
                g = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
                group_scores = g.topk(2, dim=-1).values.sum(-1)         # [T, G]
                keep = torch.zeros_like(group_scores, dtype=torch.bool)
                keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
                choice = g.masked_fill(~keep[..., None], float("-inf")).flatten(1)
            ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        else:
            if forced_ids.shape != (x.shape[0], cfg.num_experts_per_tok):
                raise ValueError(f"forced expert ids have shape {tuple(forced_ids.shape)}, expected "
                                 f"{(x.shape[0], cfg.num_experts_per_tok)} (tokens, num_experts_per_tok)")
            ids = forced_ids.long()
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids, scores


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    """The routed experts as two grouped GEMMs over expert-sorted rows, without a host sync (the
    per-expert row counts stay on the device, as group offsets): sum_j weights[t, j] *
    expert_{ids[t, j]}(x[t]). x: [T, D]; weights, ids: [T, k]; w13: [E, 2I, D] (each expert's
    gate rows, then its up rows); w2: [E, D, I] -> [T, D]."""
    t, k = ids.shape
    flat = ids.flatten()
    order = flat.argsort(stable=True)                               # [T*k] (token, slot) pairs by expert
    tok = order // k
    counts = torch.zeros(w13.shape[0], dtype=torch.long, device=x.device)
    ends = counts.scatter_add_(0, flat, torch.ones_like(flat)).cumsum(0).to(torch.int32)  # [E]
    h = torch._grouped_mm(x[tok], w13.transpose(1, 2), offs=ends)  # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=ends)      # [T*k, D]
    y = y.float() * weights.flatten()[order, None]
    return torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.stacked: tuple[torch.Tensor, ...] | None = None   # (w13, w2) or FP8 (w13, s13, w2, s2), see stack_experts

    @torch.no_grad()
    def stack_experts(self) -> bool:
        """For serving: move the routed experts' weights into two stacked tensors, w13 [E, 2I, D]
        and w2 [E, D, I], and make each expert's parameters views of them, so inference runs the
        experts as grouped GEMMs (no host sync, CUDA-graph safe) with no second copy of the
        weights; loading or copying into the parameters writes the stacks. FP8 experts (e4m3
        weights on whole 128x128 blocks, as keep_fp8 loads them) stack their scales too and run as
        two grouped FP8 GEMMs (moe_experts_fp8). Returns False (and changes nothing) where the
        experts are neither plain dense linears nor such FP8 linears on one device."""
        linears = [lin for e in self.experts for lin in (e.gate_proj, e.up_proj, e.down_proj)]
        w = linears[0].weight
        if any(lin.weight.device != w.device or lin.weight.dtype != w.dtype or lin.weight.device.type == "meta"
               for lin in linears):
            return False
        if w.dtype == FP8:
            return self._stack_fp8(linears)
        if any(type(lin) is not nn.Linear for lin in linears):
            return False
        w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
        w2 = torch.stack([e.down_proj.weight for e in self.experts])
        inter = self.cfg.moe_intermediate_size
        for i, e in enumerate(self.experts):
            e.gate_proj.weight.data, e.up_proj.weight.data = w13[i, :inter], w13[i, inter:]
            e.down_proj.weight.data = w2[i]
        self.stacked = (w13, w2)
        return True

    def _stack_fp8(self, linears) -> bool:
        inter = self.cfg.moe_intermediate_size
        if inter % 128 or any(getattr(lin, "bias", None) is not None or not hasattr(lin, "weight_scale_inv")
                              or fp8_kernel_misfit(lin.weight, lin.weight_scale_inv, getattr(lin, "fp8_block", (128, 128)),
                                                   getattr(lin, "fp8_offset", (0, 0))) for lin in linears):
            return False
        w13, s13, w2, s2 = stack_fp8_experts(self.experts)
        for i, e in enumerate(self.experts):
            e.gate_proj.weight.data, e.up_proj.weight.data = w13[i, :inter], w13[i, inter:]
            e.gate_proj.weight_scale_inv.data = s13[i, :inter // 128]
            e.up_proj.weight_scale_inv.data = s13[i, inter // 128:]
            e.down_proj.weight.data, e.down_proj.weight_scale_inv.data = w2[i], s2[i]
        self.stacked = (w13, s13, w2, s2)
        return True

    def _grouped(self, x: torch.Tensor) -> bool:
        """Whether this forward runs the stacked experts: inference, stacks still backing the
        parameters (a .to() or a re-sharding replaces them), and an input dtype the device's
        grouped GEMM takes (dense: bf16 on CUDA, any on CPU; FP8 experts: any float, quantised)."""
        if self.stacked is None or torch.is_grad_enabled():
            return False
        w13, w2 = self.stacked[0], self.stacked[1 if len(self.stacked) == 2 else 2]
        e = self.experts[-1]
        backed = (e.gate_proj.weight.data_ptr() == w13[-1].data_ptr()
                  and e.down_proj.weight.data_ptr() == w2[-1].data_ptr())
        if w13.dtype == FP8:  # act_quant takes any float input
            return backed and e.down_proj.weight_scale_inv.data_ptr() == self.stacked[3][-1].data_ptr()
        return backed and x.dtype == w13.dtype and (x.device.type == "cpu" or x.dtype == torch.bfloat16)

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None = None):
        """x: [B, S, D] -> (y [B, S, D], expert ids [B*S, k], gate scores [B*S, E])."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                    # [T, D]
        weights, ids, scores = self.gate(x, forced_ids)
        if self._grouped(x):
            y = (moe_experts_fp8(x, ids, weights, *self.stacked) if len(self.stacked) == 4
                 else grouped_experts(x, weights, ids, *self.stacked))
        else:  # one expert at a time (training; its autograd is torch's), summed in fp32 in the
            # grouped path's order (by expert) and arithmetic, so both give the same bits
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            counts = torch.bincount(ids.flatten(), minlength=self.cfg.n_routed_experts).tolist()
            for e, n in enumerate(counts):
                if n == 0:
                    continue
                tok, slot = torch.where(ids == e)
                y.index_add_(0, tok, self.experts[e](x[tok]).float() * weights[tok, slot, None])
            y = y.to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape), ids, scores
