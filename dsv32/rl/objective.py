"""The GRPO objective of DeepSeek-V3.2 with its stabilisers (spec §2.2-2.6), as pure functions.

Shapes: B sequences (a mini-batch of whole groups), T target positions per sequence (padded).
`action` [B, T] marks the tokens the policy sampled: prompts, tool results and padding carry no
loss. Log-probs are of the token at each target position; `logp` carries gradients, `logp_old`
(the engine's own sampling log-probs, spec §2.4) and `logp_ref` do not.

    J = 1/G sum_i 1/|o_i| sum_t [ min(r A_i, clip(r, 1-eps, 1+eps) A_i) M_i - beta_i KL_{i,t} ]

with A_i = R_i - mean(R) over the group (no std division), KL the importance-weighted K3
estimate (eq. 7), and M_i the off-policy sequence mask (eqs. 8-9), which never touches the KL.
"""

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """rewards: [N]; groups: [N] group id of each sequence -> A: [N] = R_i - mean of its group.

    No division by the group's std (spec §2.2): a group whose rewards are all equal gets A = 0."""
    if rewards.shape != groups.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must be the same [N]")
    _, idx = groups.unique(return_inverse=True)
    r = rewards.double()
    sums = torch.zeros(int(idx.max()) + 1, dtype=r.dtype, device=r.device).index_add_(0, idx, r)
    counts = torch.bincount(idx).to(r.dtype)
    return (r - (sums / counts)[idx]).to(rewards.dtype)


@dataclass
class KeptSets:
    """The sampler's kept sets of N positions, stored sparse (spec §2.6: never a [N, V] mask):
    token ids[j] is kept at position rows[j]; a position with no entry kept the whole vocabulary."""
    n: int
    rows: torch.Tensor        # [M] int64, non-decreasing
    ids: torch.Tensor         # [M] int64
    truncated: torch.Tensor   # [N] bool: the position kept only its listed ids


def kept_sets(kept: list, device=None) -> KeptSets:
    """kept: per position the engine's kept token ids (None = whole vocabulary) -> KeptSets."""
    ids = [torch.as_tensor(x, dtype=torch.long).flatten() for x in kept if x is not None]
    truncated = torch.tensor([x is not None for x in kept], dtype=torch.bool)
    rows = torch.repeat_interleave(truncated.nonzero()[:, 0], torch.tensor([len(x) for x in ids], dtype=torch.long))
    flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    return KeptSets(len(kept), rows.to(device), flat.to(device), truncated.to(device))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   keep: KeptSets | None = None) -> torch.Tensor:
    """logits: [N, V]; targets: [N] -> log-prob of each target under the sampler's processed
    distribution: tempered, and with Keep Sampling Mask (`keep`, the rollout's kept sets) the
    normaliser runs over the kept ids only, as if every other logit were -inf (spec §2.6); a
    target outside its kept set gets -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for RL (log-probs of a sampled policy), got {temperature}")
    x = logits.float() / temperature
    picked = x.gather(-1, targets[..., None].long())[..., 0]                # [N]
    if keep is None:
        return picked - x.logsumexp(-1)
    if x.dim() != 2 or keep.n != x.shape[0]:
        raise ValueError(f"kept sets of {keep.n} positions do not match logits {tuple(x.shape)}")
    vals = x[keep.rows, keep.ids]                                           # [M]
    top = torch.full_like(picked, float("-inf")).scatter_reduce(0, keep.rows, vals.detach(), "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.zeros_like(picked).index_add(0, keep.rows, (vals - top[keep.rows]).exp())
    norm = torch.where(keep.truncated, top + sums.log(), x.logsumexp(-1))   # [N]
    hits = (keep.ids == targets[keep.rows].long()).long()
    inside = torch.zeros(keep.n, dtype=torch.long, device=x.device).index_add(0, keep.rows, hits) > 0
    return torch.where(keep.truncated & ~inside, float("-inf"), picked - norm)


def token_logprobs_as_sampled(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                              keep: KeptSets | None = None) -> torch.Tensor:
    """token_logprobs with the sampler's own arithmetic (engine/sampler.py: tempered logits, -inf
    outside the kept set, log-softmax over the row), for the batch-invariant mode, where the engine's
    log-probs are to be matched bit for bit. It builds the dense [N, V] kept mask that
    token_logprobs avoids. logits: [N, V]; targets: [N] -> [N]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for RL (log-probs of a sampled policy), got {temperature}")
    x = logits.float() / torch.tensor([temperature], device=logits.device)[:, None]
    if keep is not None:
        if x.dim() != 2 or keep.n != x.shape[0]:
            raise ValueError(f"kept sets of {keep.n} positions do not match logits {tuple(x.shape)}")
        mask = ~keep.truncated[:, None].expand_as(x).clone()                    # untruncated rows: all kept
        mask[keep.rows, keep.ids] = True
        x = x.masked_fill(~mask, float("-inf"))
    return x.log_softmax(-1).gather(-1, targets[..., None].long())[..., 0]


def sequence_mean(x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """x, action: [B, T] -> [B]: mean of x over each sequence's action tokens (1/|o_i| sum_t)."""
    a = action.to(x.dtype)
    return (x * a).sum(-1) / a.sum(-1).clamp(min=1)


def k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Plain K3: rho - log rho - 1 with rho = pi_ref / pi_theta. Unbiased only for samples of
    pi_theta itself; its gradient coefficient (1 - rho) is unbounded where pi_theta << pi_ref."""
    log_rho = logp_ref - logp
    return log_rho.exp() - log_rho - 1


def kl_unbiased(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Eq. 7: (pi_theta / pi_old) * K3. The leading ratio is not detached: the gradient flows
    through both factors, w grad(log pi_theta) log(pi_theta / pi_ref), whose expectation under
    pi_old is grad KL(pi_theta || pi_ref)."""
    return (logp - logp_old).exp() * k3(logp, logp_ref)


@torch.no_grad()
def off_policy_mask(adv: torch.Tensor, logp_old: torch.Tensor, logp: torch.Tensor, action: torch.Tensor,
                    delta: float) -> torch.Tensor:
    """Eqs. 8-9. adv: [B]; logp_old, logp, action: [B, T] -> M: [B] (1 keep, 0 masked).

    A sequence is masked iff its advantage is negative AND its mean log(pi_old / pi_theta) over
    its own sampled tokens exceeds delta; positive- or zero-advantage sequences never are. The
    mask is per sequence, computed from the current policy at each mini-batch step."""
    div = sequence_mean(logp_old - logp, action)
    return (~((adv < 0) & (div > delta))).to(logp.dtype)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, action: torch.Tensor,
              logp_ref: torch.Tensor | None = None, beta: torch.Tensor | float = 0.0, clip_eps: float = 0.2,
              mask_delta: float | None = 0.1, unbiased_kl: bool = True) -> tuple[torch.Tensor, dict]:
    """-J (to minimise) and its statistics for one mini-batch of whole groups.

    logp, logp_old, action: [B, T]; adv: [B]; logp_ref: [B, T] or None (no KL term);
    beta: per-sequence [B] (each sequence's domain) or one float, 0 allowed;
    mask_delta: None switches the off-policy sequence masking off; unbiased_kl=False uses plain
    K3 (no importance weight) instead of eq. 7.
    """
    if not (logp.shape == logp_old.shape == action.shape) or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)} and action "
                         f"{tuple(action.shape)} must be the same [B, T]")
    if adv.shape != logp.shape[:1]:
        raise ValueError(f"adv has shape {tuple(adv.shape)}, expected ({logp.shape[0]},)")
    action = action.bool()
    logp_old = logp_old.detach()
    ratio = (logp - logp_old).exp()                                         # [B, T]
    a = adv[:, None].to(logp.dtype)
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    surrogate = torch.minimum(unclipped, clipped)                           # [B, T]
    m = (off_policy_mask(adv, logp_old, logp.detach(), action, mask_delta) if mask_delta is not None
         else torch.ones_like(adv, dtype=logp.dtype))
    per_token = surrogate * m[:, None]
    kl = torch.zeros_like(logp)
    if logp_ref is not None:
        kl = kl_unbiased(logp, logp_old, logp_ref.detach()) if unbiased_kl else k3(logp, logp_ref.detach())
        beta = torch.as_tensor(beta, dtype=logp.dtype, device=logp.device).expand(logp.shape[0])
        per_token = per_token - beta[:, None] * kl
    objective = sequence_mean(per_token.masked_fill(~action, 0), action).mean()
    with torch.no_grad():
        n = action.sum().clamp(min=1)
        stats = {
            "kl": float(sequence_mean(kl.masked_fill(~action, 0), action).mean()),
            "clip_frac": float(((clipped < unclipped) & action).sum() / n),   # the clipped branch won
            "masked_frac": float(1 - m.mean()),
            "ratio": float(ratio.masked_fill(~action, 0).sum() / n),
            "mismatch": float((logp - logp_old).abs().masked_fill(~action, 0).sum() / n),
        }
    return -objective, stats
