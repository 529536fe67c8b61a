"""Training losses: next-token LM, MTP, DeepSeek-V3's balance terms, and the DSA indexer KL.

Indexer KL (spec §1.3-1.4): the target p[t, :] is the main attention's probabilities summed over
heads and L1-normalised over keys (equal to the head average); the indexer is trained towards it
with KL(p || softmax(I[t, :])). Stage 1 uses all causal keys; stage 2 only the selected set S_t,
with p renormalised over S_t so both sides are distributions (the paper does not say; we do).
Both average over queries (the paper sums: a constant factor the learning rate absorbs).
"""

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits: [B, S, V]; labels: [B, S] (IGNORE where no target) -> mean cross-entropy."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def mtp_loss(mtp_logits: list, labels: torch.Tensor) -> torch.Tensor:
    """MTP depth k predicts the token k steps after the main head's: logits [B, S-k, V] align with
    labels[:, k:]. Mean over depths (DeepSeek-V3 weights the sum by lambda / D)."""
    losses = [lm_loss(lg, labels[:, k:]) for k, lg in enumerate(mtp_logits, start=1)]
    return torch.stack(losses).mean()


def sequence_balance_loss(scores: torch.Tensor, expert_ids: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (before the alpha factor), per MoE layer.

    scores: [B*S, E] sigmoid affinities; expert_ids: [B*S, k]. For each sequence,
    f_i = E / (k S) * #tokens routed to i, P_i = mean over tokens of s_i / sum_j s_j;
    loss = mean over sequences of sum_i f_i P_i (1 when perfectly balanced)."""
    e = scores.shape[-1]
    s = scores.view(batch, -1, e)                                   # [B, S, E]
    counts = torch.zeros_like(s[:, 0]).scatter_add_(
        1, expert_ids.view(batch, -1), torch.ones_like(expert_ids.view(batch, -1), dtype=s.dtype))
    f = counts * e / (top_k * s.shape[1])                           # [B, E]
    p = (s / s.sum(-1, keepdim=True)).mean(1)                       # [B, E]
    return (f.detach() * p).sum(-1).mean()


@torch.no_grad()
def update_expert_bias(gate_bias: torch.Tensor, expert_ids: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing: raise the selection bias of under-loaded experts, lower that
    of over-loaded ones, by a fixed step `rate` (DeepSeek-V3 used 0.001)."""
    load = torch.bincount(expert_ids.flatten(), minlength=gate_bias.numel()).float()
    gate_bias += rate * torch.sign(load.mean() - load)


def _kl(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_s p log(p / q), with 0 log 0 = 0. p, log_q: [..., N] -> [...]."""
    return torch.where(p > 0, p * (torch.log(p.clamp(min=1e-30)) - log_q), torch.zeros_like(p)).sum(-1)


def indexer_kl_dense(index_scores: torch.Tensor, attn_probs: torch.Tensor) -> torch.Tensor:
    """Stage 1. index_scores: [B, S, T] (-inf where not causal); attn_probs: [B, S, T] summed
    over heads (detached) -> mean over queries of KL(p || softmax(I))."""
    p = attn_probs / attn_probs.sum(-1, keepdim=True)
    return _kl(p, index_scores.float().log_softmax(-1)).mean()


def indexer_kl_sparse(index_scores: torch.Tensor, attn_probs: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
    """Stage 2: the same KL restricted to the selected set S_t (topk_indices [B, S, k], -1 = none),
    p renormalised over S_t."""
    valid = topk_indices >= 0
    idx = topk_indices.clamp(min=0)
    i_sel = index_scores.gather(-1, idx).float().masked_fill(~valid, float("-inf"))
    p_sel = attn_probs.gather(-1, idx).masked_fill(~valid, 0)
    p_sel = p_sel / p_sel.sum(-1, keepdim=True)
    return _kl(p_sel, i_sel.log_softmax(-1)).mean()


def topk_recall(attn_probs: torch.Tensor, topk_indices: torch.Tensor, k: int) -> float | None:
    """DSA's headline number (docs/dsa-parity.md): the share of the dense attention mass, summed
    over heads and normalised per query, inside the indexer's top-k set, averaged over the queries
    that see more than k keys (the others keep everything). attn_probs: [B, S, T];
    topk_indices: [B, S, k'] (-1 = none). None when no query sees more than k keys."""
    if attn_probs.shape[1] <= k:
        return None
    p = attn_probs.float() / attn_probs.float().sum(-1, keepdim=True)
    kept = (p.gather(-1, topk_indices.clamp(min=0)) * (topk_indices >= 0)).sum(-1)   # [B, S]
    return kept[:, k:].mean().item()
