"""Sampling parameters and the sampler.

The sampled token's log-prob is taken under the *processed* distribution (tempered, then truncated
by top-k and top-p): that is pi_old for RL, and the truncation's kept set is what Keep Sampling
Mask replays in training (spec §2.6). A request's grammar (grammar.py) masks its row first: the
packed bitmask is unpacked on the logits' device, disallowed logits become -inf, and the kept set
of such a row is what the grammar allows and the truncation keeps, so that replay sees the same
distribution.
"""

from dataclasses import dataclass, field

import torch

from dsv32.engine.grammar import Grammar, unpack_mask


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
    grammar: Grammar | None = None      # constrained decoding: every token follows this grammar

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


def apply_grammar(logits: torch.Tensor, masks: torch.Tensor | None):
    """logits [B, V], masks [B, ceil(V / 32)] packed int32 (grammar.py; all ones for rows without
    a grammar) -> (logits with -inf where a row's grammar disallows, allowed [B, V] bool), or
    (logits, None) when no row has a grammar. A row whose grammar allows nothing (its matcher
    failed) is left unmasked: the scheduler then fails that sequence alone, not the batch."""
    if masks is None:
        return logits, None
    allowed = unpack_mask(masks.to(logits.device, non_blocking=True), logits.shape[-1])     # [B, V]
    allowed |= ~allowed.any(-1, keepdim=True)
    return logits.masked_fill(~allowed, float("-inf")), allowed


def processed_logprobs(logits: torch.Tensor, params: list[SamplingParams], masks: torch.Tensor | None = None):
    """logits [B, V], one row per sequence -> (log-probs of each row's processed distribution [B, V]
    fp32, keep [B, V] bool or None, greedy [B] bools, truncates [B] bools: the rows whose kept set
    is not the whole vocabulary). Greedy rows (temperature 0) get the plain softmax. masks: the
    rows' packed grammar masks (grammar.fill_masks) or None; a grammar row's kept set is what its
    grammar allows and its truncation keeps."""
    logits, allowed = apply_grammar(logits, masks)
    greedy = [p.temperature == 0 for p in params]
    temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy)]     # greedy rows: no truncation
    top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
    top_k = [0 if g else p.top_k for p, g in zip(params, greedy)]
    x, keep = processed_logits(logits, temperature, top_p, top_k)
    truncates = [0 < k < x.shape[-1] or tp < 1.0 for k, tp in zip(top_k, top_p)]
    if allowed is not None:
        truncates = [t or m for t, m in zip(truncates, (~allowed.all(-1)).tolist())]
        keep = allowed if keep is None else keep & allowed
    return x.log_softmax(-1), keep, greedy, truncates


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], masks: torch.Tensor | None = None) -> list[Sample]:
    """logits [B, V], one row per sequence, sampled together: a decode step costs a few kernels and
    host syncs in all, not per sequence. Temperature 0 = greedy (log-prob of the plain softmax);
    a row with its own generator (a seeded request) draws from it alone. masks: the packed
    grammar masks of the rows (grammar.fill_masks), or None."""
    lp, keep, greedy, truncates = processed_logprobs(logits, params, masks)        # [B, V]
    tok = lp.argmax(-1)
    free = [i for i, (g, gen) in enumerate(zip(greedy, generators)) if not g and gen is None]
    if free:
        tok[free] = torch.multinomial(lp[free].exp(), 1).squeeze(1)
    for i, gen in enumerate(generators):
        if not greedy[i] and gen is not None:
            tok[i] = torch.multinomial(lp[i].exp(), 1, generator=gen)[0]
    return samples(lp, tok, keep, params, truncates)


def samples(lp: torch.Tensor, tok: torch.Tensor, keep: torch.Tensor | None, params: list[SamplingParams],
            truncates: list[bool]) -> list[Sample]:
    """The records of tokens tok [B] drawn from rows of processed log-probs lp [B, V] (keep: their
    kept sets, from processed_logprobs): log-prob, top log-probs if asked, kept ids for RL."""
    tokens, logprobs = tok.tolist(), lp.gather(1, tok[:, None]).squeeze(1).tolist()
    top = [None] * len(params)
    n_top = max(p.logprobs or 0 for p in params)
    if n_top:
        v, i = (t.tolist() for t in lp.topk(n_top))
        top = [list(zip(i[r][:p.logprobs], v[r][:p.logprobs])) if p.logprobs else None for r, p in enumerate(params)]
    kept = [None] * len(params)
    rows = [r for r, p in enumerate(params) if p.return_rl_data and truncates[r]]
    if rows and keep is not None:
        sets = keep[rows]
        ids = sets.nonzero()[:, 1].to("cpu", torch.int32)
        for r, ids_r in zip(rows, ids.split(sets.sum(1).tolist())):
            kept[r] = ids_r
    return [Sample(*fields) for fields in zip(tokens, logprobs, kept, top)]
