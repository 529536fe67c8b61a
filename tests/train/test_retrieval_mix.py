"""The retrieval mix: every repeat is really in its window at its stated distance, the kinds come
at the shares asked for, and the hash-held-out documents never reach a window."""

import math

import numpy as np
import pytest

from dsv32.train.retrieval_mix import KINDS, RetrievalMix, RetrievalMixError, held_out


class ByteTokenizer:
    """Bytes as ids 2..257; 0 is BOS, 1 is EOS."""
    bos_id, eos_id, vocab_size = 0, 1, 258

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]


TOK = ByteTokenizer()


def make(docs, tok, seq_len, **kw):
    """A mix over byte tokens, whose 16-token key-value lines fit 4 to a half of 256."""
    return RetrievalMix.from_documents(docs, tok, seq_len, **{"n_keys": 4, **kw})


def texts(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of words, each tagged with its index."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "value"]
    return [f"doc{i} " + " ".join(rng.choice(words, size=60)) for i in range(n)]


@pytest.mark.parametrize("seq_len", [256, 512, 1024])
def test_every_repeat_is_in_its_window_at_its_distance(seq_len):
    mix = make(texts(200), TOK, seq_len, share=1.0, seed=3)
    seen = set()
    for step in range(300):
        w, where = mix.window(step, row=step % 3)
        assert len(w) == seq_len + 1
        assert where is not None
        seen.add(where.kind)
        a, b, m = where.src, where.dst, where.length
        assert 0 <= a and b + m <= seq_len + 1 and m >= 1
        assert b >= a + m, "the repeat starts after its span ends"
        assert where.distance == b - a >= seq_len // 4, "far back"
        assert list(w[b:b + m]) == list(w[a:a + m])
        if where.kind == "keyvalue":
            line = bytes(int(t) - 2 for t in w[a:a + m]).decode()
            key, value = line.strip().split(" = ")
            assert len(key) == 5 and key.isupper() and len(value) == 7 and value.isdigit()
            assert b + m == seq_len + 1, "the query ends the window"
            assert a + m <= (seq_len + 1) // 2, "the lines are early"
    assert seen == set(KINDS)


def test_random_spans_are_not_the_text_and_avoid_bos_eos():
    mix = make(texts(50), TOK, 256, share=1.0, kinds={"random": 1.0}, seed=1)
    for step in range(50):
        w, where = mix.window(step, 0)
        span = w[where.src:where.src + where.length]
        assert not set(span.tolist()) & {TOK.bos_id, TOK.eos_id}
        assert len(set(span.tolist())) == where.length  # distinct ids, as copy_random's


@pytest.mark.parametrize("share, kinds", [(0.0, None), (0.5, None), (0.3, {"repeat": 3.0, "keyvalue": 1.0}),
                                          (1.0, {"random": 1.0})])
def test_shares_match_the_request(share, kinds):
    mix = make(texts(100), TOK, 256, share=share, kinds=kinds, seed=7)
    n = 4000
    got = [mix.window(s, 0)[1] for s in range(n)]
    weights = kinds or {k: 1.0 for k in KINDS}
    total = sum(weights.values())
    expect = {None: 1 - share, **{k: share * weights.get(k, 0.0) / total for k in KINDS}}
    for kind, p in expect.items():
        count = sum((g is None) if kind is None else (g is not None and g.kind == kind) for g in got)
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 4 * sigma + 1e-9, (kind, count, n * p)


def test_plain_windows_are_the_document_stream():
    docs = texts(40)
    mix = make(docs, TOK, 256, share=0.0, seed=0)
    stream = bytes(int(t) - 2 if t > 1 else 0 for t in mix.ids)
    for step in range(20):
        w, where = mix.window(step, 0)
        assert where is None
        assert bytes(int(t) - 2 if t > 1 else 0 for t in w) in stream


def test_held_out_documents_never_reach_a_window():
    docs = texts(300, seed=5)
    held = [d for d in docs if held_out(d, 0.2)]
    assert 30 <= len(held) <= 90  # about a fifth, by hash
    mix = make(docs, TOK, 256, share=0.5, seed=2, held_out_fraction=0.2)
    stream = bytes(int(t) - 2 if t > 1 else 0 for t in mix.ids).decode()
    for d in held:
        assert d.split(" ", 1)[0] + " " not in stream  # its tag "docN " is nowhere in the training stream
    for d in docs:
        if d not in held:
            assert d in stream
    tags = set()
    for step in range(200):
        w, _ = mix.window(step, 0)
        text = bytes(int(t) - 2 if t > 1 else 32 for t in w).decode(errors="replace")  # BOS, EOS as spaces
        tags |= {t for t in text.split() if t.startswith("doc") and t[3:].isdigit()}
    assert tags and not tags & {d.split(" ", 1)[0] for d in held}


def test_the_split_is_a_pure_function_of_the_text():
    docs = texts(100)
    assert [held_out(d, 0.3) for d in docs] == [held_out(d, 0.3) for d in list(docs)]
    assert not any(held_out(d, 0.0) for d in docs) and all(held_out(d, 1.0) for d in docs)


def test_windows_are_a_pure_function_of_seed_and_step():
    a = make(texts(50), TOK, 256, share=0.5, seed=4)
    b = make(texts(50), TOK, 256, share=0.5, seed=4)
    xa, ya = a.batch(9, 3)
    xb, yb = b.batch(9, 3)
    assert (xa == xb).all() and (ya == yb).all()
    assert xa.shape == (3, 256) and (xa[:, 1:] == ya[:, :-1]).all()


@pytest.mark.parametrize("kw, msg", [({"share": 1.5}, "share"), ({"share": 0.5, "kinds": {"copy": 1.0}}, "kinds"),
                                     ({"share": 0.5, "span": (0, 8)}, "span"), ({"share": 0.5, "n_keys": 20}, "keys")])
def test_bad_requests_are_named(kw, msg):
    with pytest.raises(RetrievalMixError, match=msg):
        make(texts(20), TOK, 256, **kw)
