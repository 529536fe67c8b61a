"""Speculative decoding's verification: exact rejection sampling of drafted tokens.

A draft model (here the MTP module) proposes k tokens d_1..d_k, d_j drawn from its processed
distribution q_j; one forward of the main model gives the processed distributions p_1..p_{k+1} at
the k + 1 positions. Draft j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the
first rejection the next token is drawn from norm(max(p_j - q_j, 0)) and the rest are dropped;
when all k are accepted a bonus token is drawn from p_{k+1}. Every token so emitted is distributed
exactly as plain sampling from p (Leviathan, Kalman & Matias 2023, "Fast Inference from
Transformers via Speculative Decoding", Algorithm 1 and Theorem 1; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2), whatever q
is: a poor draft costs speed, never correctness. Greedy rows pass one-hot p and q (the argmaxes):
a draft is then accepted iff it is the argmax, and the recovery token is the argmax.
"""

from __future__ import annotations

import torch

from dsv32.engine.sampler import inverse_cdf, seeded_uniforms


def accepted_lengths(p_draft: torch.Tensor, q_draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p_draft, q_draft: [B, k] the target's and the draft's probability of each drafted token;
    u: [B, k] uniform draws in [0, 1). Draft j is accepted iff u_j < p_j / q_j (probability
    min(1, p_j / q_j)), written u_j q_j < p_j so a zero q needs no division. -> [B] the number of
    leading drafts accepted (Leviathan et al. 2023, Algorithm 1, n)."""
    ok = (u * q_draft < p_draft).int()                                    # [B, k]
    return ok.cumprod(-1).sum(-1)


def recovery_probs(p: torch.Tensor, q: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """p: [B, k + 1, V] the target's processed distributions at the k + 1 verified positions;
    q: [B, k, V] the draft's; n: [B] accepted drafts. -> [B, V] the distribution of the token after
    them: norm(max(p_n - q_n, 0)) after a rejection at draft n + 1 (n < k), p_k (the bonus) when all
    k were accepted (Leviathan et al. 2023, Algorithm 1, p'(x))."""
    b, _, v = p.shape
    rows = torch.arange(b, device=p.device)
    q_pad = torch.cat([q, q.new_zeros(b, 1, v)], 1)                      # past the last draft: q = 0
    p_n, q_n = p[rows, n], q_pad[rows, n]                                # [B, V]
    r = (p_n - q_n).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    # a rejection implies p_n(d) < q_n(d), hence total > 0; rounding alone could leave 0, and then
    # p_n and q_n agree to the last bit and p_n is the answer
    return torch.where(total > 0, r / total.clamp(min=1e-30), p_n)


def verify_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                  generators: list[torch.Generator | None]) -> tuple[list[int], list[int]]:
    """Rejection sampling of k drafts per row. p: [B, k + 1, V], q: [B, k, V] processed
    distributions (rows of probabilities); drafts: [B, k] token ids, d_j drawn from q_j. A row with
    a generator (a seeded request) draws from it alone. -> (accepted counts n [B], the token after
    the accepted drafts [B])."""
    b, k = drafts.shape
    u = torch.rand(b, k, device=p.device)
    rows, seeded = seeded_uniforms(generators, k, p.device)
    if rows:
        u[rows] = seeded.to(u.dtype)
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]                   # [B, k]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    n = accepted_lengths(p_d, q_d, u)                                     # [B]
    r = recovery_probs(p, q, n)                                           # [B, V]
    return n.tolist(), draw(r, generators).tolist()


def draw(q: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of distributions q [B, V]; a row with a generator draws from it alone."""
    tok = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    free = [i for i, g in enumerate(generators) if g is None]
    if free:
        tok[free] = torch.multinomial(q[free], 1).squeeze(1)
    rows, u = seeded_uniforms(generators, 1, q.device)
    if rows:
        tok[rows] = inverse_cdf(q[rows], u[:, 0])
    return tok
