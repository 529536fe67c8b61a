"""Sampling parameters and the sampler.

The sampled token's log-prob is taken under the *processed* distribution (logit bias and
penalties, the request's grammar, tempered, then truncated by top-k, top-p and min-p): that is
pi_old for RL, and the truncation's kept set is what Keep Sampling Mask replays in training
(spec §2.6).

The logit adjustments follow the definitions clients expect: OpenAI's logit_bias (added to the
logits), presence and frequency penalties (over the generated tokens: l - f * count - p * [count > 0]),
and the CTRL / Hugging Face / vLLM repetition penalty (over prompt and generated tokens: a positive
logit divided by r, a negative one multiplied by r); min_tokens masks the end tokens until that many
tokens are generated; min_p keeps the tokens whose probability is at least min_p times the top one's.

A request's grammar (grammar.py) masks its row after the adjustments: the packed bitmask is
unpacked on the logits' device, disallowed logits become -inf, and the kept set of such a row is
what the grammar allows and the truncation keeps, so that replay sees the same distribution.
"""

import math
from dataclasses import dataclass, field

import torch

from dsv32.engine.grammar import Grammar, unpack_mask

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
    grammar: Grammar | None = None      # constrained decoding: every token follows this grammar
    presence_penalty: float = 0.0       # in [-2, 2]
    frequency_penalty: float = 0.0      # in [-2, 2]
    repetition_penalty: float = 1.0     # > 0; 1 = off
    min_p: float = 0.0                  # in [0, 1]; 0 = off
    min_tokens: int = 0                 # end tokens (EOS unless ignore_eos, stop_token_ids) masked until then
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]

    def __post_init__(self):
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for t, b in self.logit_bias.items():
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {t!r}")
            if not (math.isfinite(b) and -100 <= b <= 100):
                raise ValueError(f"logit_bias[{t}] must be in [-100, 100], got {b}")

    @property
    def adjusts_logits(self) -> bool:
        """Whether the raw logits change before tempering (bias, penalties, min_tokens)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty or self.min_tokens
                    or self.repetition_penalty != 1.0)


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


def adjusted_logits(logits: torch.Tensor, params: list[SamplingParams], tokens: list[list[int]],
                    prompt_lens: list[int], end_ids: list[list[int]]) -> torch.Tensor:
    """logits [B, V] -> float logits [B, V] with each row's bias, penalties and min_tokens mask
    (the module docstring's definitions). tokens[r]: row r's prompt and generated ids so far, the
    first prompt_lens[r] of them the prompt; end_ids[r]: the ids min_tokens holds back. Each
    adjustment is one indexed operation over all rows (a copy of flat (row, id) lists to the
    device), not one per row."""
    x = logits.float()
    rows = [r for r, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return x
    x, dev, v = x.clone(), x.device, x.shape[-1]

    def at(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor(col, dtype=torch.long, device=dev) for col in zip(*pairs))

    bias = [(r, t, b) for r in rows for t, b in params[r].logit_bias.items() if t < v]
    if bias:
        x.index_put_(at([(r, t) for r, t, _ in bias]), torch.tensor([b for *_, b in bias], device=dev),
                     accumulate=True)
    seen = [(r, t) for r in rows if params[r].repetition_penalty != 1.0 for t in set(tokens[r])]
    if seen:
        idx = at(seen)
        penalty = torch.tensor([params[r].repetition_penalty for r, _ in seen], device=dev)
        x[idx] = torch.where(x[idx] > 0, x[idx] / penalty, x[idx] * penalty)
    generated = [(r, t) for r in rows if params[r].presence_penalty or params[r].frequency_penalty
                 for t in tokens[r][prompt_lens[r]:]]
    if generated:
        count = torch.zeros_like(x).index_put_(at(generated), torch.ones(len(generated), device=dev),
                                               accumulate=True)                       # [B, V]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
        x -= frequency * count + presence * (count > 0).float()
    held = [(r, t) for r in rows if len(tokens[r]) - prompt_lens[r] < params[r].min_tokens for t in end_ids[r]]
    if held:
        x[at(held)] = float("-inf")
    return x


def processed_logits(logits: torch.Tensor, temperature: list[float], top_p: list[float], top_k: list[int],
                     min_p: list[float] | None = None):
    """logits [B, V], per-row settings -> (tempered logits [B, V] with -inf outside each row's kept
    set, keep [B, V] bool, or None when no row truncates). Top-k first (ties at the k-th value
    kept), then top-p over what is left: one sort serves both; then min-p (p >= min_p * p_max
    under the tempered distribution)."""
    x = logits.float() / torch.tensor(temperature, device=logits.device)[:, None]
    v = x.shape[-1]
    k = [kk if 0 < kk < v else v for kk in top_k]
    min_p = min_p or [0.0] * len(k)
    if min(k) == v and min(top_p) >= 1.0 and max(min_p) <= 0.0:
        return x, None
    sorted_x, order = x.sort(-1, descending=True)
    keep = sorted_x >= sorted_x.gather(1, torch.tensor(k, device=x.device)[:, None] - 1)
    p = sorted_x.masked_fill(~keep, float("-inf")).softmax(-1)
    tp = torch.tensor(top_p, device=x.device)[:, None]
    keep &= (p.cumsum(-1) - p < tp) | (tp >= 1.0)     # the smallest prefix reaching top_p
    if max(min_p) > 0.0:  # p_max = exp(0) relative: log p - log p_max = x - x_max
        mp = torch.tensor(min_p, device=x.device)[:, None]
        keep &= (sorted_x - sorted_x[:, :1] >= torch.log(mp)) | (mp <= 0.0)
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


def processed_logprobs(logits: torch.Tensor, params: list[SamplingParams], masks: torch.Tensor | None = None,
                       tokens: list[list[int]] | None = None, prompt_lens: list[int] | None = None,
                       end_ids: list[list[int]] | None = None):
    """logits [B, V], one row per sequence -> (log-probs of each row's processed distribution [B, V]
    fp32, keep [B, V] bool or None, greedy [B] bools, truncates [B] bools: the rows whose kept set
    is not the whole vocabulary). Greedy rows (temperature 0, or below MIN_TEMPERATURE) get the
    adjusted softmax. masks: the rows' packed grammar masks (grammar.fill_masks) or None; a grammar
    row's kept set is what its grammar allows and its truncation keeps. tokens / prompt_lens /
    end_ids: each row's history and end ids, for penalties and min_tokens (adjusted_logits); None:
    no history."""
    b = len(params)
    logits = adjusted_logits(logits, params, tokens or [[]] * b, prompt_lens or [0] * b, end_ids or [[]] * b)
    logits, allowed = apply_grammar(logits, masks)
    greedy = [p.temperature < MIN_TEMPERATURE for p in params]
    temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy)]     # greedy rows: no truncation
    top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
    top_k = [0 if g else p.top_k for p, g in zip(params, greedy)]
    min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
    x, keep = processed_logits(logits, temperature, top_p, top_k, min_p)
    truncates = [0 < k < x.shape[-1] or tp < 1.0 or mp > 0.0 for k, tp, mp in zip(top_k, top_p, min_p)]
    if allowed is not None:
        truncates = [t or m for t, m in zip(truncates, (~allowed.all(-1)).tolist())]
        keep = allowed if keep is None else keep & allowed
    return x.log_softmax(-1), keep, greedy, truncates


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           masks: torch.Tensor | None = None, tokens: list[list[int]] | None = None,
           prompt_lens: list[int] | None = None, end_ids: list[list[int]] | None = None) -> list[Sample]:
    """logits [B, V], one row per sequence, sampled together: a decode step costs a few kernels and
    host syncs in all, not per sequence. Greedy rows take the argmax; a row with its own generator
    (a seeded request) draws from it alone. masks, tokens, prompt_lens, end_ids: as in
    processed_logprobs."""
    lp, keep, greedy, truncates = processed_logprobs(logits, params, masks, tokens, prompt_lens, end_ids)  # [B, V]
    tok = lp.argmax(-1)
    free = [i for i, (g, gen) in enumerate(zip(greedy, generators)) if not g and gen is None]
    if free:
        tok[free] = torch.multinomial(lp[free].exp(), 1).squeeze(1)
    rows, u = seeded_uniforms([None if g else gen for g, gen in zip(greedy, generators)], 1, lp.device)
    if rows:
        tok[rows] = inverse_cdf(lp[rows].exp(), u[:, 0])
    return samples(lp, tok, keep, params, truncates)


def seeded_uniforms(generators: list[torch.Generator | None], n: int,
                    device: torch.device) -> tuple[list[int], torch.Tensor | None]:
    """(the rows with a generator, [R, n] float64 uniforms in [0, 1) on device): each such row
    (a seeded request) draws n numbers from its own host generator, so what it samples depends on
    its seed and how many draws it made, never on the other rows; all rows reach the device in one
    copy, however many there are (a loop of per-row device draws costs a few kernel launches a
    row, which at batch 100+ outweighs a decode step)."""
    rows = [i for i, g in enumerate(generators) if g is not None]
    if not rows:
        return rows, None
    u = torch.stack([torch.rand(n, generator=generators[i], dtype=torch.float64) for i in rows])  # [R, n]
    return rows, u.to(device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [R, V] (rows summing to about 1, zeros allowed) for uniforms u [R]
    in [0, 1): the first id whose cumulative probability exceeds u times the row's total, so id i
    comes with probability probs[i] / total and an id of probability 0 never does. -> [R] ids."""
    cdf = probs.double().cumsum(-1)                                       # [R, V]
    total = cdf[:, -1]
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total, always
    return torch.searchsorted(cdf, x[:, None], right=True)[:, 0]


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
