"""The long-context tasks: token sequences of an exact length, each with the positions a scorer reads.

    copy_random   n distinct random tokens, then the same n again (induction over the whole context)
    copy_text     a real passage, then the same passage again
    needle        a "special magic number" sentence hidden at a depth of a real haystack, asked for
                  at the end (Kamradt 2023, "Needle in a haystack"; RULER's single needle)
    multikey      several "the value of key K is V" sentences in real filler, one of them asked for
                  (Hsieh et al. 2024, "RULER", multi-key NIAH)
    ppl           plain real text, its per-token NLL split by position bucket

Every sequence is built from token ids the tokenizer gave for separate pieces of text, so an
answer is the same ids where it is hidden and where it is scored, whatever the tokenizer (ours or
SmolLM2's). Real text is the Python standard library's documentation (`dsv32.agent.sysdocs`),
which every machine with Python carries. A task set is a pure function of (tokenizer, length,
seed): the same arguments give the same ids.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from dsv32.agent.sysdocs import python_docs, stdlib_modules

TASKS = ("copy_random", "copy_text", "needle", "multikey", "ppl")
DEPTHS = (0.1, 0.5, 0.9)  # where the needle sits, as a fraction of the haystack (0 = the start)
DOC_MODULES = ("collections", "json", "argparse", "pathlib", "typing", "logging", "email", "http",
               "unittest", "asyncio", "concurrent", "xml", "urllib", "importlib", "multiprocessing",
               "dataclasses", "functools", "itertools", "os", "re", "string", "textwrap", "csv",
               "sqlite3", "tarfile", "zipfile", "shutil", "subprocess", "threading", "socket")
MIN_LENGTH = 128

log = logging.getLogger(__name__)


class LongCtxError(ValueError):
    """A task that cannot be built as asked (a length too short, a text source too small)."""


@dataclass(frozen=True)
class Sample:
    """One sequence and what to score. targets: the positions whose token is predicted (from the
    position before); ref: positions scored for comparison (the first copy); detail: the
    sample's own parameters (depth, key count, source)."""
    task: str
    ids: list[int]
    targets: list[int]
    ref: list[int] = field(default_factory=list)
    detail: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The sample's row label: the task, and the needle's depth."""
        return f"{self.task}@{self.detail['depth']:g}" if "depth" in self.detail else self.task


def paragraphs(tokenizer, min_tokens: int) -> list[list[int]]:
    """Real text as tokenized paragraphs, at least min_tokens in all where the documentation has
    that many (some 400K tokens): the docstrings of DOC_MODULES, then of the rest of the standard
    library, in a fixed order."""
    out, total = [], 0
    modules = DOC_MODULES + tuple(m for m in stdlib_modules() if m not in DOC_MODULES)
    for doc in python_docs(modules):
        for para in doc.text.split("\n\n"):
            para = para.strip()
            if len(para) < 40:
                continue
            ids = tokenizer.encode("\n\n" + para)
            out.append(ids)
            total += len(ids)
        if total >= min_tokens:
            break
    return out


class TextPool:
    """Paragraphs to draw haystacks and passages from, in an order fixed by the seed. Asked for
    more than the documentation holds, it starts over (and says so)."""

    def __init__(self, tokenizer, want: int, need: int, seed: int):
        self.paras = paragraphs(tokenizer, want)
        total = sum(map(len, self.paras))
        if total < need:
            raise LongCtxError(f"the standard library's documentation gave only {total} tokens, fewer than "
                               f"the {need} one sample needs")
        if total < want:
            log.warning("the tasks want %d tokens of real text, the documentation has %d: samples will share "
                        "text", want, total)
        random.Random(seed).shuffle(self.paras)
        self.next = 0

    def take(self, n: int) -> list[list[int]]:
        """Whole paragraphs with at least n tokens in all (the last one may run over)."""
        got, total = [], 0
        while total < n:
            para = self.paras[self.next % len(self.paras)]
            self.next += 1
            got.append(para)
            total += len(para)
        return got


def _flat(parts: list[list[int]]) -> list[int]:
    return [t for p in parts for t in p]


def special_ids(tokenizer) -> set[int]:
    """The ids of control tokens (BOS, EOS, chat markers), which random sequences leave out."""
    added = getattr(getattr(tokenizer, "tok", None), "get_added_tokens_decoder", dict)()
    return {getattr(tokenizer, a, None) for a in ("bos_id", "eos_id")} | {i for i, t in added.items() if t.special}


def copy_random(tokenizer, length: int, rng: random.Random) -> Sample:
    """length // 2 distinct ids drawn from the ordinary vocabulary, twice. Scored: the second copy
    after its first token (nothing announces the repeat); ref: the same offsets in the first copy."""
    n = length // 2
    pool = [i for i in range(tokenizer.vocab_size) if i not in special_ids(tokenizer)]
    if len(pool) < n:
        raise LongCtxError(f"copy_random needs {n} distinct tokens, the vocabulary has {len(pool)}")
    r = rng.sample(pool, n)
    return Sample("copy_random", r + r, list(range(n + 1, 2 * n)), list(range(1, n)), {"copy_len": n})


def copy_text(tokenizer, length: int, pool: TextPool) -> Sample:
    """A real passage of length // 2 tokens, twice; scored as copy_random."""
    n = length // 2
    p = _flat(pool.take(n))[:n]
    return Sample("copy_text", p + p, list(range(n + 1, 2 * n)), list(range(1, n)), {"copy_len": n})


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _key(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(6))


def _embed(tokenizer, length: int, pool: TextPool, inserts: list[tuple[float, list[int]]], tail: list[int],
           answer: list[int], task: str, detail: dict) -> Sample:
    """A haystack of real paragraphs with `inserts` (depth, ids) placed between paragraphs nearest
    their depth, then the question `tail` and the `answer`, exactly `length` tokens in all."""
    room = length - len(tail) - len(answer) - sum(len(ids) for _, ids in inserts)
    if room < length // 2:
        raise LongCtxError(f"{task} at length {length}: the needles and question leave {room} tokens of "
                           f"haystack; use a length of at least {2 * (length - room)}")
    paras = pool.take(room)
    hay = _flat(paras)[:room]
    cuts = [0]
    for p in paras:
        cuts.append(min(cuts[-1] + len(p), room))
    seq, done = [], 0
    for depth, ids in sorted(inserts, key=lambda x: x[0]):
        at = min(cuts, key=lambda c: abs(c - depth * room))
        at = max(at, done)
        seq += hay[done:at] + ids
        done = at
    seq += hay[done:] + tail
    start = len(seq)
    seq += answer
    return Sample(task, seq, list(range(start, start + len(answer))), [], detail)


def needle(tokenizer, length: int, depth: float, pool: TextPool, rng: random.Random) -> Sample:
    """A magic-number sentence at `depth` of a real haystack; the question ends with the start of
    the same sentence, and the scored answer is the number's tokens."""
    key, number = rng.choice(["Lisbon", "Osaka", "Quito", "Tromso", "Nairobi", "Hobart"]), _number(rng)
    stem = tokenizer.encode(f" The special magic number for {key} is")
    answer = tokenizer.encode(f" {number}")
    sentence = tokenizer.encode("\n\n") + stem + answer + tokenizer.encode(".")
    tail = tokenizer.encode(f"\n\nQuestion: what is the special magic number for {key}? Answer:") + stem
    return _embed(tokenizer, length, pool, [(depth, sentence)], tail, answer, "needle",
                  {"depth": depth, "answer": number})


def multikey(tokenizer, length: int, keys: int, pool: TextPool, rng: random.Random) -> Sample:
    """`keys` sentences "The value of key K is V." spread evenly through real filler; one is asked."""
    pairs = []
    while len(pairs) < keys:
        k = _key(rng)
        if k not in {p[0] for p in pairs}:
            pairs.append((k, _number(rng)))
    asked = rng.randrange(keys)
    stems = [tokenizer.encode(f" The value of key {k} is") for k, _ in pairs]
    answers = [tokenizer.encode(f" {v}") for _, v in pairs]
    inserts = [((i + 0.5) / keys, tokenizer.encode("\n\n") + stems[i] + answers[i] + tokenizer.encode("."))
               for i in range(keys)]
    tail = tokenizer.encode(f"\n\nQuestion: what is the value of key {pairs[asked][0]}? Answer:") + stems[asked]
    return _embed(tokenizer, length, pool, inserts, tail, answers[asked], "multikey",
                  {"keys": keys, "asked": asked, "answer": pairs[asked][1]})


def ppl(tokenizer, length: int, pool: TextPool) -> Sample:
    """length tokens of real text, every token after the first scored."""
    return Sample("ppl", _flat(pool.take(length))[:length], list(range(1, length)))


def build_tasks(tokenizer, length: int, seed: int = 0, samples: int = 1, tasks=TASKS,
                depths=DEPTHS, keys: int = 4) -> list[Sample]:
    """Every sample of `tasks` at `length` tokens: `samples` of each (of each depth for the
    needle), a pure function of its arguments."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise LongCtxError(f"unknown long-context task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    if length < MIN_LENGTH:
        raise LongCtxError(f"length {length} is too short for a long-context task (at least {MIN_LENGTH})")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise LongCtxError(f"needle depths are fractions of the haystack in [0, 1], got {list(depths)}")
    if length % 2 and any(t.startswith("copy") for t in tasks):
        raise LongCtxError(f"the copy tasks repeat half the sequence: the length must be even, got {length}")
    rng = random.Random(seed)
    text_tasks = [t for t in tasks if t != "copy_random"]
    per_sample = len(text_tasks) + (len(depths) - 1 if "needle" in tasks else 0)
    pool = TextPool(tokenizer, per_sample * length * samples, 2 * length, seed) if text_tasks else None
    out = []
    for _ in range(samples):
        for t in tasks:
            if t == "copy_random":
                out.append(copy_random(tokenizer, length, rng))
            elif t == "copy_text":
                out.append(copy_text(tokenizer, length, pool))
            elif t == "needle":
                out += [needle(tokenizer, length, d, pool, rng) for d in depths]
            elif t == "multikey":
                out.append(multikey(tokenizer, length, keys, pool, rng))
            else:
                out.append(ppl(tokenizer, length, pool))
    for s in out:
        if len(s.ids) != length:
            raise AssertionError(f"{s.name} built {len(s.ids)} tokens, not {length}")
    return out
