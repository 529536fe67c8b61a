"""Sampling parameters and the sampler.

The sampled token's log-prob is taken under the *processed* distribution (tempered, then truncated
by top-k and top-p): that is pi_old for RL, and the truncation's kept set is what Keep Sampling
Mask replays in training (spec §2.6).
"""

from dataclasses import dataclass, field

import torch


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


def processed_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int):
    """logits: [V] -> (tempered logits with -inf outside the kept set, kept ids or None)."""
    x = logits.float() / max(temperature, 1e-6)
    keep = None
    if top_k and top_k < x.shape[-1]:                 # top-k first, then top-p on what is left
        keep = x >= x.topk(top_k).values[-1]
        x = x.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = x.sort(descending=True)
        p = sorted_x.softmax(-1)
        drop_sorted = p.cumsum(-1) - p >= top_p       # keep the smallest prefix reaching top_p
        keep_p = torch.empty_like(drop_sorted).scatter_(0, order, ~drop_sorted)
        keep = keep_p if keep is None else keep & keep_p
        x = x.masked_fill(~keep, float("-inf"))
    return x, (None if keep is None else keep.nonzero().flatten())


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> Sample:
    """logits: [V] for one sequence. temperature 0 = greedy (log-prob of the plain softmax)."""
    if p.temperature == 0:
        lp = logits.float().log_softmax(-1)
        tok = int(lp.argmax())
        kept = None
    else:
        x, kept = processed_logits(logits, p.temperature, p.top_p, p.top_k)
        lp = x.log_softmax(-1)
        tok = int(torch.multinomial(lp.exp(), 1, generator=generator))
    top = None
    if p.logprobs:
        v, i = lp.topk(p.logprobs)
        top = list(zip(i.tolist(), v.tolist()))
    return Sample(tok, float(lp[tok]), kept if p.return_rl_data else None, top)
