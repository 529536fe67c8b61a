"""Agreement of the trainer's replayed log-probs with the sampler's, bit for bit.

A sampled token whose kept set (top-p / top-k) held only itself has log-prob exactly 0 on both
sides whatever the arithmetic, so the share of bit-equal tokens over all sampled tokens says
little: the headline is the share among tokens with more than one kept candidate.
"""

import torch

from dsv32.rl.objective import KeptSets


def kept_sizes(keep: KeptSets) -> torch.Tensor:
    """keep: the kept sets of N positions -> [N] int64: the number of kept candidates of each
    position; a position that kept the whole vocabulary counts as -1 (more than one)."""
    sizes = torch.bincount(keep.rows, minlength=keep.n).to(torch.long)
    return torch.where(keep.truncated.to(sizes.device), sizes, torch.full_like(sizes, -1))


def bitwise_agreement(logp: torch.Tensor, logp_old: torch.Tensor, sizes: torch.Tensor | None = None) -> dict:
    """logp, logp_old: [N] log-probs of the sampled tokens (trainer, sampler); sizes: [N] kept
    candidates per token (kept_sizes; -1 = whole vocabulary), or None: then a token counts as
    multi-candidate where the sampler's log-prob is not 0 -> the shares of bit-equal tokens over
    all tokens and among multi-candidate ones (None if there are none), and the mean |difference|
    among the latter."""
    if logp.shape != logp_old.shape or logp.dim() != 1:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_old {tuple(logp_old.shape)} must be the same [N]")
    if sizes is not None and sizes.shape != logp.shape:
        raise ValueError(f"kept sizes {tuple(sizes.shape)} do not match the {logp.shape[0]} tokens")
    a = logp.detach().float()
    b = logp_old.detach().float().to(a.device)
    equal = a == b                                                          # [N]
    multi = (sizes.to(a.device) != 1) if sizes is not None else b != 0     # [N]
    n_multi = int(multi.sum())
    return {"sampled_tokens": a.numel(),
            "bit_equal_share": float(equal.float().mean()) if a.numel() else None,
            "multi_candidate_tokens": n_multi,
            "bit_equal_share_multi": float(equal[multi].float().mean()) if n_multi else None,
            "mean_abs_diff_multi": float((a - b)[multi].abs().mean()) if n_multi else None}
