"""Sampling parameters and the sampler.

The sampled token's log-prob is taken under the *processed* distribution (tempered, then truncated
by top-k and top-p): that is pi_old for RL, and the truncation's kept set is what Keep Sampling
Mask replays in training (spec §2.6).
"""

import math
from dataclasses import dataclass, field

import torch

# A temperature below this samples greedily: dividing float32 logits by 1e-40 overflows them to
# inf, and the softmax of inf is nan (vLLM draws the same line).
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None         # also return this many top log-probs per token
    return_rl_data: bool = False        # kept sets and expert ids per token (Keep Sampling Mask / Routing)

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")


@dataclass
class Sample:
    token: int
    logprob: float                      # under the processed distribution
    kept: torch.Tensor | None           # ids kept by the truncation (None = whole vocabulary)
    top: list[tuple[int, float]] | None  # top log-probs of the processed distribution
    error: str | None = None            # sampling failed for this row alone (token and log-prob meaningless)


def failed_sample(error: str) -> Sample:
    """The sample of a row whose sampling raised: its sequence fails, the others go on."""
    return Sample(-1, 0.0, None, None, error)


def processed_logits(logits: torch.Tensor, temperature: list[float], top_p: list[float], top_k: list[int]):
    """logits [B, V], per-row settings -> (tempered logits [B, V] with -inf outside each row's kept
    set, keep [B, V] bool, or None when no row truncates). Top-k first (ties at the k-th value
    kept), then top-p over what is left: one sort serves both."""
    x = logits.float() / torch.tensor(temperature, device=logits.device)[:, None]
    v = x.shape[-1]
    k = [kk if 0 < kk < v else v for kk in top_k]
    if min(k) == v and min(top_p) >= 1.0:
        return x, None
    sorted_x, order = x.sort(-1, descending=True)
    keep = sorted_x >= sorted_x.gather(1, torch.tensor(k, device=x.device)[:, None] - 1)
    p = sorted_x.masked_fill(~keep, float("-inf")).softmax(-1)
    tp = torch.tensor(top_p, device=x.device)[:, None]
    keep &= (p.cumsum(-1) - p < tp) | (tp >= 1.0)     # the smallest prefix reaching top_p
    keep = torch.empty_like(keep).scatter_(1, order, keep)
    return x.masked_fill(~keep, float("-inf")), keep


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[Sample]:
    """logits [B, V], one row per sequence, sampled together: a decode step costs a few kernels and
    host syncs in all, not per sequence. Temperature 0 (or below MIN_TEMPERATURE) = greedy
    (log-prob of the plain softmax); a row with its own generator (a seeded request) draws from it
    alone."""
    greedy = [p.temperature < MIN_TEMPERATURE for p in params]
    temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy)]     # greedy rows: no truncation
    top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
    top_k = [0 if g else p.top_k for p, g in zip(params, greedy)]
    x, keep = processed_logits(logits, temperature, top_p, top_k)
    lp = x.log_softmax(-1)                                                          # [B, V]
    tok = lp.argmax(-1)
    free = [i for i, (g, gen) in enumerate(zip(greedy, generators)) if not g and gen is None]
    if free:
        tok[free] = torch.multinomial(lp[free].exp(), 1).squeeze(1)
    for i, gen in enumerate(generators):
        if not greedy[i] and gen is not None:
            tok[i] = torch.multinomial(lp[i].exp(), 1, generator=gen)[0]
    tokens, logprobs = tok.tolist(), lp.gather(1, tok[:, None]).squeeze(1).tolist()
    top = [None] * len(params)
    n_top = max(p.logprobs or 0 for p in params)
    if n_top:
        v, i = (t.tolist() for t in lp.topk(n_top))
        top = [list(zip(i[r][:p.logprobs], v[r][:p.logprobs])) if p.logprobs else None for r, p in enumerate(params)]
    kept = [None] * len(params)
    rows = [r for r, p in enumerate(params) if p.return_rl_data and (0 < top_k[r] < x.shape[-1] or top_p[r] < 1.0)]
    if rows and keep is not None:
        sets = keep[rows]
        ids = sets.nonzero()[:, 1].to("cpu", torch.int32)
        for r, ids_r in zip(rows, ids.split(sets.sum(1).tolist())):
            kept[r] = ids_r
    return [Sample(*fields) for fields in zip(tokens, logprobs, kept, top)]
