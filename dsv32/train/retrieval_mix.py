"""Retrieval-rich training windows for the indexer's stage 1: real text with long-range repeats.

Stage 1 trains the lightning indexer by KL to the dense attention, so it learns to find far keys
only where the dense attention looks far back. Source code rarely does; these windows make it:

    plain    a window of the packed document stream (PackedData's windows)
    repeat   a window of the stream with a span of it written again later, verbatim
    random   a window of the stream with a span of random tokens written at two places
             (the shape of the long-context suite's copy_random)
    keyvalue lines "KEY = VALUE" early in the window and one of them again at its end
             (multi-key retrieval: the query's key finds its line)

A window is non-plain with probability `share`, and then of each kind in proportion to `kinds`.
Every span and its repeat lie inside the window's seq_len + 1 tokens, the repeat `distance`
tokens after the span, drawn in [seq_len // 4, seq_len - span]: far back. Documents whose hash
falls in the held-out fraction are never used, so an evaluation on them stays unseen. Windows are
a pure function of (seed, step), as PackedData's are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("repeat", "random", "keyvalue")
KEY_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


class RetrievalMixError(ValueError):
    """A mix that cannot be built as asked."""


def held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: the first 8 bytes of its SHA-256, as a
    fraction of 2**64, below `fraction` (stable across machines and runs)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


@dataclass(frozen=True)
class Placement:
    """Where a window's long-range dependency lies: tokens [dst, dst + length) repeat tokens
    [src, src + length), distance = dst - src. None for a plain window."""
    kind: str
    src: int
    dst: int
    length: int

    @property
    def distance(self) -> int:
        return self.dst - self.src


class RetrievalMix:
    """Windows of seq_len + 1 tokens: plain, or with a long-range repeat (see the module doc).
    batch(step, batch_size) -> (inputs, labels), as PackedData.batch."""

    def __init__(self, docs: list[np.ndarray], seq_len: int, share: float, encode, vocab: np.ndarray,
                 seed: int = 0, kinds: dict[str, float] | None = None, span: tuple[int, int] | None = None,
                 n_keys: int = 8):
        if not 0.0 <= share <= 1.0:
            raise RetrievalMixError(f"the retrieval share is a fraction in [0, 1], got {share}")
        if seq_len < 64:
            raise RetrievalMixError(f"seq_len {seq_len} is too short for long-range repeats (at least 64)")
        kinds = dict(kinds or {k: 1.0 for k in KINDS})
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds or min(kinds.values()) < 0 or sum(kinds.values()) <= 0:
            raise RetrievalMixError(f"kinds weigh {', '.join(KINDS)} with non-negative weights, got {kinds}")
        self.span = span or (16, max(16, seq_len // 8))
        if not 1 <= self.span[0] <= self.span[1] <= seq_len // 2:
            raise RetrievalMixError(f"span lengths {self.span} must lie in [1, seq_len // 2 = {seq_len // 2}]")
        self.ids = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        if len(self.ids) < seq_len + 2:
            raise RetrievalMixError(f"{len(self.ids)} tokens of training documents cannot fill one window of "
                                    f"{seq_len + 1}")
        if len(vocab) < self.span[1]:
            raise RetrievalMixError(f"random spans of {self.span[1]} tokens need as many ids, the vocabulary "
                                    f"given has {len(vocab)}")
        self.seq_len, self.share, self.encode, self.vocab, self.seed = seq_len, share, encode, vocab, seed
        self.kind_names = list(kinds)
        self.kind_p = np.asarray([kinds[k] for k in self.kind_names], float) / sum(kinds.values())
        self.n_keys = n_keys
        line = len(encode("\nKEYAB = 1000000"))
        if kinds.get("keyvalue", 0) > 0 and (n_keys + 1) * line > (seq_len + 1) // 2:
            raise RetrievalMixError(f"{n_keys} key-value lines and a query of about {line} tokens each do not fit "
                                    f"in half a window of {seq_len + 1}: use fewer keys or a longer seq_len")

    @classmethod
    def from_documents(cls, texts: list[str], tokenizer, seq_len: int, share: float, seed: int = 0,
                       held_out_fraction: float = 0.1, **kw) -> RetrievalMix:
        """From texts and a tokenizer (encode, bos_id, eos_id, vocab_size): every text outside the
        held-out split, opened with BOS and closed with EOS; random spans draw from the vocabulary
        less BOS and EOS."""
        docs = [np.asarray([tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id], np.int64)
                for t in texts if not held_out(t, held_out_fraction)]
        vocab = np.setdiff1d(np.arange(tokenizer.vocab_size), [tokenizer.bos_id, tokenizer.eos_id])
        return cls(docs, seq_len, share, tokenizer.encode, vocab, seed, **kw)

    def window(self, step: int, row: int) -> tuple[np.ndarray, Placement | None]:
        """One window (seq_len + 1 ids) and where its repeat lies (None: plain)."""
        g = np.random.default_rng([self.seed, step, row])
        n = self.seq_len + 1
        start = int(g.integers(0, len(self.ids) - n))
        w = self.ids[start:start + n].copy()
        if g.random() >= self.share:
            return w, None
        kind = self.kind_names[int(g.choice(len(self.kind_names), p=self.kind_p))]
        if kind == "keyvalue":
            return self._keyvalue(w, g)
        m = int(g.integers(self.span[0], self.span[1] + 1))
        dist = int(g.integers(max(m, self.seq_len // 4), n - m + 1))  # the repeat starts at or after the span's end
        src = int(g.integers(0, n - m - dist + 1))
        if kind == "random":
            w[src:src + m] = g.choice(self.vocab, size=m, replace=False)
        w[src + dist:src + dist + m] = w[src:src + m]
        return w, Placement(kind, src, src + dist, m)

    def _keyvalue(self, w: np.ndarray, g: np.random.Generator) -> tuple[np.ndarray, Placement]:
        """n_keys lines "KEY = VALUE" as one block in the window's first quarter; the asked line
        again at the window's end."""
        keys = set()
        while len(keys) < self.n_keys:
            keys.add("".join(g.choice(list(KEY_LETTERS), size=5)))
        lines = [np.asarray(self.encode(f"\n{k} = {int(g.integers(10**6, 10**7))}"), np.int64) for k in sorted(keys)]
        block = np.concatenate(lines)
        n = len(w)
        asked = int(g.integers(len(lines)))
        q = lines[asked]
        if len(block) + len(q) > n // 2:
            raise RetrievalMixError(f"{self.n_keys} key-value lines take {len(block)} tokens, too many for a "
                                    f"window of {n}: use fewer keys or a longer seq_len")
        at = int(g.integers(0, max(1, n // 4 - len(block)) + 1))
        w[at:at + len(block)] = block
        src = at + sum(len(x) for x in lines[:asked])
        dst = n - len(q)
        w[dst:] = q
        return w, Placement("keyvalue", src, dst, len(q))

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, labels), each [batch_size, seq_len]; labels are the next tokens."""
        w = torch.from_numpy(np.stack([self.window(step, r)[0] for r in range(batch_size)]))  # [B, seq_len + 1]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()
