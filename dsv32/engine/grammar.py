"""Grammar-constrained decoding: a request's grammar, its matcher state, and the packed token mask.

A request may carry a `Grammar` (SamplingParams.grammar): a grammar text in llguidance's Lark
dialect (JSON schemas inline as `%json{...}`, special tokens by id as `<[id]>`; `dsv32.chat.grammar`
writes them) compiled against a `GrammarVocab`, the model vocabulary's token bytes. The vocabulary is
built once at the edge from the tokenizer's tokenizer.json, so the engine still sees token ids
only. Each sequence gets its own `Matcher`; before each sampling step the runner fills one packed
bitmask row per constrained sequence ([B, ceil(V / 32)] int32, bit j of word i allows token
32 i + j), the sampler sets every disallowed logit to -inf on the logits' device (sampler.py), and
the scheduler advances the matcher with the token it appends and ends the sequence once the grammar
can take no further token.

Why llguidance (bench/grammar_libs.py, docs/server.md): no dependencies beyond its own wheel, a
grammar language that mixes text, special tokens by id and JSON schemas (the DSML tool-call block
needs all three), and a per-token mask cost of microseconds on a 49k vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # an optional extra ("grammar"): only requests that carry a grammar need it
    import llguidance
except ImportError:  # pragma: no cover - exercised only without the extra
    llguidance = None

MISSING = "constrained decoding needs llguidance: pip install 'dsv32[grammar]'"


class GrammarError(ValueError):
    """A grammar that does not compile, or a token its matcher refuses."""


def _need_llguidance():
    if llguidance is None:
        raise GrammarError(MISSING)


def mask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


class GrammarVocab:
    """The model vocabulary as llguidance sees it: token bytes from a tokenizer.json, the ids that
    end a reply (the grammar's end of text), and the model's vocabulary size (rows past the
    tokenizer's own ids are never allowed). Building it costs ~0.5 s for a 50k vocabulary: make
    one per served model."""

    def __init__(self, tokenizer_json: str, stop_ids: list[int], vocab_size: int):
        _need_llguidance()
        if not stop_ids:
            raise GrammarError("a grammar vocabulary needs at least one end-of-reply token id")
        self.vocab_size, self.stop_ids = vocab_size, list(stop_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=self.stop_ids)


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: what SamplingParams carries (shared by every sequence of a request)."""
    text: str
    vocab: GrammarVocab

    @classmethod
    def compile(cls, text: str, vocab: GrammarVocab) -> Grammar:
        """Check the grammar now, so that a bad one is the caller's error, not a failed step."""
        _need_llguidance()
        m = llguidance.LLMatcher(vocab.tokenizer, text, log_level=0)
        if m.is_error():
            raise GrammarError(f"the grammar does not compile: {m.get_error()}")
        return cls(text, vocab)

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.m = llguidance.LLMatcher(grammar.vocab.tokenizer, grammar.text, log_level=0)

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into row ([ceil(V / 32)] int32, contiguous, on the CPU)."""
        self.m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def advance(self, token: int) -> None:
        """Consume the sampled token; GrammarError if the grammar does not allow it."""
        if not self.m.consume_token(token):
            raise GrammarError(f"token {token} is not allowed by the request's grammar: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and takes no further token (its end token included)."""
        return self.m.is_stopped()


def mask_executor():
    """A thread pool that fills many rows' masks at once (llguidance's; up to 32 threads)."""
    _need_llguidance()
    return llguidance.LLExecutor()


def fill_masks(matchers: list[Matcher | None], vocab_size: int, executor=None) -> torch.Tensor | None:
    """The packed masks of one sampling step: [B, ceil(V / 32)] int32 on the CPU (pinned where
    CUDA is, for an asynchronous copy), all ones for rows without a grammar; None if no row has one.
    With a mask_executor, several rows are filled in parallel."""
    rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    masks = torch.full((len(matchers), mask_width(vocab_size)), -1, dtype=torch.int32,
                       pin_memory=torch.cuda.is_available())                                # [B, W]
    if executor is not None and len(rows) > 1:
        executor.unsafe_compute_mask_ptr([(m.m, i) for m, i in rows], masks.data_ptr(), masks.shape[1] * 4,
                                         masks.shape[0])
    else:
        for m, i in rows:
            m.fill(masks[i])
    return masks


def unpack_mask(masks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """masks [B, W] int32 packed -> allowed [B, V] bool, on masks' device: token v is allowed iff
    bit v % 32 of word v // 32 is set."""
    bits = torch.arange(32, dtype=torch.int32, device=masks.device)                          # [32]
    allowed = (masks[:, :, None] >> bits) & 1                                                # [B, W, 32]
    return allowed.view(masks.shape[0], -1)[:, :vocab_size] == 1                             # [B, V]
