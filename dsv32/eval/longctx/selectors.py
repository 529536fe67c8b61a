"""Which keys each query attends to: the baselines a reviewer asks DSA to beat, at the same number of
attended keys, applied to a trained model without retraining.

Each rule is a pure function returning key positions idx [B, S, n] (-1 = no key, any order); a
`Selector` binds one rule to a key budget and plugs it into the model's sparse attention through
`Step.key_selector` (see `dsv32.model.indexer.select_keys`), so every variant runs the same
attention code and only the chosen set differs. Dense attention is the model with sparse=False.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv32.model.indexer import topk_select

VARIANTS = ("dense", "dsa", "window", "sinks", "quest")


def query_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position of each query under a causal mask [B, S, T]: its last visible key -> [B, S]."""
    t = mask.shape[-1]
    return t - 1 - mask.flip(-1).int().argmax(-1)


def window_select(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Sliding-window attention (Beltagy et al. 2020, "Longformer", §3.1, causal form): the query at
    position p reads keys p-n+1 .. p. mask: [B, S, T] causal -> idx [B, S, min(n, T)]."""
    n = min(n, mask.shape[-1])
    p = query_positions(mask)                                             # [B, S]
    idx = p[..., None] - torch.arange(n, device=mask.device)              # [B, S, n]
    return idx.masked_fill(idx < 0, -1)


def sinks_window_select(mask: torch.Tensor, n: int, sinks: int = 4) -> torch.Tensor:
    """StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
    §3.2): the first `sinks` tokens, which soak up attention mass, plus a window of the n - sinks
    most recent keys. mask: [B, S, T] causal -> idx [B, S, min(n, T)]; each key appears once."""
    if not 0 < sinks < n:
        raise ValueError(f"sinks + window needs 0 < sinks < n keys, got sinks={sinks}, n={n}")
    n = min(n, mask.shape[-1])
    sinks = min(sinks, n - 1)
    p = query_positions(mask)[..., None]                                  # [B, S, 1]
    head = torch.arange(sinks, device=mask.device).expand(*p.shape[:2], sinks)
    head = head.masked_fill(head > p, -1)                                 # sinks not yet seen
    tail = p - torch.arange(n - sinks, device=mask.device)                # [B, S, n - sinks]
    tail = tail.masked_fill(tail < sinks, -1)                             # negative, or a sink already
    return torch.cat([head, tail], -1)


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's per-page key metadata: the channel-wise min and max of each page of `page` keys.
    k: [B, T, H_kv, D] -> (min, max) [B, ceil(T / page), H_kv, D]; a last partial page is bounded
    by the keys it has."""
    b, t, h, d = k.shape
    n_pages = -(-t // page)
    pad = n_pages * page - t
    kf = k.float()
    lo = torch.cat([kf, kf.new_full((b, pad, h, d), float("inf"))], 1).view(b, n_pages, page, h, d).amin(2)
    hi = torch.cat([kf, kf.new_full((b, pad, h, d), float("-inf"))], 1).view(b, n_pages, page, h, d).amax(2)
    return lo, hi


def quest_select(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, n: int, page: int = 16) -> torch.Tensor:
    """Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
    Inference", §3.2): score each page of keys by an upper bound of q . k over its keys,
    sum_d max(q_d min_d, q_d max_d), and read the n // page best pages whole.

    Two choices the paper leaves to the kernel: the query's own page is always read (its bounds
    would cover keys that do not exist yet when decoding), and since our sparse attention shares
    one key set across heads, a page's score is the sum of its bounds over the query heads (each
    against its K/V head, GQA). q: [B, S, H, D]; k: [B, T, H_kv, D]; mask: [B, S, T] causal ->
    idx [B, S, (n // page) * page]."""
    if n < page:
        raise ValueError(f"Quest reads whole pages: the budget of n={n} keys is less than one page of {page}")
    h, h_kv = q.shape[2], k.shape[2]
    if h % h_kv:
        raise ValueError(f"Quest: {h} query heads do not share {h_kv} key heads evenly")
    lo, hi = page_bounds(k, page)                                         # [B, P, H_kv, D]
    rep = h // h_kv
    lo, hi = lo.repeat_interleave(rep, 2), hi.repeat_interleave(rep, 2)  # [B, P, H, D]
    qf = q.float()
    bound = torch.einsum("bshd,bphd->bsp", qf.clamp(min=0), hi) + \
        torch.einsum("bshd,bphd->bsp", qf.clamp(max=0), lo)               # [B, S, P]
    pos = query_positions(mask)                                           # [B, S]
    own = pos // page
    pages = torch.arange(bound.shape[-1], device=q.device)
    bound = bound.masked_fill(pages > own[..., None], float("-inf"))      # pages ahead of the query
    bound = bound.masked_fill(pages == own[..., None], float("inf"))      # its own page, always
    chosen = topk_select(bound, n // page)                                # [B, S, n_pages], -1 = none
    idx = chosen[..., None] * page + torch.arange(page, device=q.device)  # [B, S, n_pages, page]
    idx = idx.masked_fill((chosen[..., None] < 0) | (idx > pos[..., None, None]), -1)
    return idx.flatten(2)


def dsa_select(index_scores: torch.Tensor, n: int) -> torch.Tensor:
    """DeepSeek Sparse Attention (DeepSeek-AI 2025, "DeepSeek-V3.2", §2.1, Eq. 2): the n keys of
    highest lightning-indexer score. index_scores: [B, S, T], -inf where masked -> idx [B, S, n]."""
    return topk_select(index_scores, n)


@dataclass(frozen=True)
class Selector:
    """One variant at a key budget n, as `Step.key_selector` calls it: (q, k, mask, index_scores)
    -> idx. variant: one of VARIANTS other than dense."""
    variant: str
    n: int
    sinks: int = 4
    page: int = 16

    def __post_init__(self):
        if self.variant not in VARIANTS or self.variant == "dense":
            raise ValueError(f"selector variant must be one of {', '.join(VARIANTS[1:])}, got {self.variant!r}")
        if self.n < 1:
            raise ValueError(f"selector budget n must be a positive number of keys, got {self.n}")

    def __call__(self, q, k, mask, index_scores) -> torch.Tensor:
        if self.variant == "dsa":
            return dsa_select(index_scores(), self.n)
        if self.variant == "window":
            return window_select(mask, self.n)
        if self.variant == "sinks":
            return sinks_window_select(mask, self.n, self.sinks)
        if q is None or k is None:
            raise ValueError("Quest scores pages with the layer's attention keys, which this model's "
                             "attention does not expose (MLA); use a Llama-family model")
        return quest_select(q, k, mask, self.n, self.page)
