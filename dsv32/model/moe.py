"""DeepSeekMoE: sigmoid gate with group-limited, bias-corrected top-k; routed + shared experts.

The score-correction bias (updated by aux-loss-free balancing, not by gradients) only decides
*which* experts are chosen; the mixing weights come from the uncorrected sigmoid scores,
renormalised over the chosen experts and multiplied by routed_scaling_factor.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv32.config import ModelConfig


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


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None = None):
        """x: [B, S, D] -> (y [B, S, D], expert ids [B*S, k], gate scores [B*S, E])."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                    # [T, D]
        weights, ids, scores = self.gate(x, forced_ids)
        y = torch.zeros_like(x)
        counts = torch.bincount(ids.flatten(), minlength=self.cfg.n_routed_experts).tolist()
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok, slot = torch.where(ids == e)
            y.index_add_(0, tok, (self.experts[e](x[tok]) * weights[tok, slot, None]).to(x.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape), ids, scores
