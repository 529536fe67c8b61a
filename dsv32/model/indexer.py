"""The lightning indexer of DeepSeek Sparse Attention, and top-k selection.

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])

q comes from MLA's query latent (q_lora), one key per token is shared by all indexer heads. The
score only chooses which latents the main attention reads; it never enters the attention weights.
"""

import functools

import torch
import torch.nn as nn

from dsv32.config import ModelConfig
from dsv32.kernels.indexer import indexer_logits
from dsv32.kernels.topk import topk
from dsv32.model.fp8 import act_quant_dequant
from dsv32.model.rope import apply_rope_half

def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard rotation of the last dim (a power of two). It spreads outliers
    across dims before FP8 quantisation and leaves dot products unchanged."""
    d = x.shape[-1]
    h = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (x.float() @ h * d ** -0.5).to(x.dtype)


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores: [B, S, T] with -inf where not allowed -> indices [B, S, min(k, T)] (a set, in no
    particular order), -1 where the query has fewer than k allowed keys."""
    b, s, t = scores.shape
    return topk(scores.reshape(b * s, t).float(), min(k, t)).view(b, s, -1).long()


def pack_selection(idx: torch.Tensor) -> torch.Tensor:
    """Top-k key sets idx [..., k] (positions, -1 = none, any order) -> the same sets as gaps
    between their sorted positions [..., k]: uint16 when every gap fits (2 bytes a key), else
    int32. The -1s sort first and become 0; each key is stored as 1 + its distance to the one before."""
    x = idx.long().sort(-1).values
    gaps = torch.diff(x, dim=-1, prepend=torch.full_like(x[..., :1], -1))
    return gaps.to(torch.uint16) if gaps.numel() == 0 or int(gaps.max()) < 1 << 16 else gaps.int()


def packed_dtype(records: list[torch.Tensor]) -> torch.dtype:
    """The dtype that holds every one of several pack_selection outputs joined together."""
    return torch.uint16 if all(r.dtype == torch.uint16 for r in records) else torch.int32


def unpack_selection(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_selection: [..., k] gaps -> sorted positions [..., k] int64, -1 first."""
    return packed.long().cumsum(-1) - 1


def all_keys_selection(positions: torch.Tensor, k: int) -> torch.Tensor:
    """The packed selection a query at each position makes when it has at most k causal keys:
    all of them. positions: [...] -> [..., k] uint16 (keys 0..min(p, k - 1))."""
    n_keys = (positions.long() + 1).clamp(max=k)[..., None]
    return (torch.arange(k, device=positions.device) >= k - n_keys).to(torch.uint16)


def forced_selection(forced: torch.Tensor, layer: int, mask: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s replayed key sets: forced [B, S, L, k] packed (pack_selection), mask [B, S, T]
    -> idx [B, S, k] int64, checked against the forward's shape and context."""
    b, s, end = mask.shape
    if forced.dim() != 4 or tuple(forced.shape[:2]) != (b, s) or layer >= forced.shape[2]:
        raise ValueError(f"forced_topk must be [B={b}, S={s}, layers, k] covering layer {layer}, "
                         f"got {tuple(forced.shape)}")
    idx = unpack_selection(forced[:, :, layer].to(mask.device))              # [B, S, k]
    if idx.numel() and int(idx.max()) >= end:
        raise ValueError(f"forced_topk of layer {layer} selects key {int(idx.max())}, beyond the "
                         f"{end} keys of this forward")
    return idx


def select_keys(indexer: "Indexer", step, x, qr, k, cos, sin, attn_q=None, attn_k=None):
    """One attention layer's index scores (when the step needs them) and selected keys: the
    indexer's top-k, the step's forced selection (RL replay), or the step's key_selector. x, qr:
    the indexer's inputs; k: [B, T, head_dim] keys -> (scores [B, S, T] fp32 or None, idx [B, S, k]
    or None).

    A key_selector chooses keys by another rule (the long-context baselines of dsv32.eval) through
    the same sparse attention: key_selector(q, k, mask, index_scores) -> idx [B, S, n] (-1 = none),
    given the layer's attention queries attn_q [B, S, H, D] and keys attn_k [B, T, H_kv, D] after
    RoPE (None where the layer does not expose them: MLA), the mask [B, S, T] and a function that
    computes the indexer's scores [B, S, T] when called."""
    scores = idx = None
    if step.key_selector is not None and step.sparse and step.forced_topk is None:
        index_scores = functools.cache(lambda: indexer(x, qr, k, cos, sin, step.mask, step.indexer_fp8))
        idx = step.key_selector(attn_q, attn_k, step.mask, index_scores)
        return (index_scores() if step.return_aux else None), idx
    if step.return_aux or (step.sparse and step.forced_topk is None):
        scores = indexer(x, qr, k, cos, sin, step.mask, step.indexer_fp8)
    if step.forced_topk is not None:
        idx = forced_selection(step.forced_topk, step.layer_id, step.mask)
    elif scores is not None:
        idx = topk_select(scores.detach(), indexer.cfg.index_topk)
    return scores, idx


def selected_mask(idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sparse attention mask: idx [B, S, k] (-1 = no key) within mask [B, S, T] -> [B, S, T]."""
    end = mask.shape[-1]
    sel = torch.zeros(*idx.shape[:2], end + 1, dtype=torch.bool, device=idx.device)
    return sel.scatter_(-1, idx % (end + 1), True)[..., :end] & mask  # -1 -> dummy column


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def key(self, x: torch.Tensor, cos, sin, fp8: bool = False) -> torch.Tensor:
        """x: [B, S, D] -> indexer keys [B, S, head_dim] (what the indexer cache holds)."""
        k = self.k_norm(self.wk(x))
        r = self.cfg.qk_rope_head_dim
        k = torch.cat([apply_rope_half(k[..., None, :r], cos, sin)[..., 0, :], k[..., r:]], -1)
        return act_quant_dequant(hadamard(k)) if fp8 else k

    def query(self, x: torch.Tensor, qr: torch.Tensor, cos, sin, fp8: bool = False):
        """x: [B, S, D] hidden; qr: [B, S, q_lora] query latent -> (queries [B, S, Hi, head_dim],
        per-head weights [B, S, Hi] fp32, scaled by (Hi * head_dim)^-1/2)."""
        b, s, _ = x.shape
        r = self.cfg.qk_rope_head_dim
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = torch.cat([apply_rope_half(q[..., :r], cos, sin), q[..., r:]], -1)
        if fp8:
            q = act_quant_dequant(hadamard(q))
        # per-head weights; weights_proj runs in fp32 as in the official code (autocast off)
        with torch.autocast(x.device.type, enabled=False):
            w = x.float() @ self.weights_proj.weight.float().t()          # [B, S, Hi]
        return q, w * (self.n_heads ** -0.5 * self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, k: torch.Tensor, cos, sin,
                mask: torch.Tensor, fp8: bool = False) -> torch.Tensor:
        """Index scores [B, S, T] fp32, -inf where mask is False.

        x: [B, S, D] hidden; qr: [B, S, q_lora] query latent; k: [B, T, head_dim] keys (from
        `key`, cached ones included); mask: [B, S, T] bool.
        """
        q, w = self.query(x, qr, cos, sin, fp8)
        # ReLU sits between the two contractions: the kernel fuses them; keys past each query's
        # last allowed one are skipped, the rest of the mask is applied below
        k_end = mask.shape[-1] - mask.flip(-1).int().argmax(-1)           # [B, S]
        scores = indexer_logits(q, k.to(q.dtype), w, k_end=k_end)         # [B, S, T]
        return scores.masked_fill(~mask, float("-inf"))
