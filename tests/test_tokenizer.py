"""The tokenizer, on a small byte-level BPE trained here from standard-library source files."""

import json
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv32.chat import SPECIAL_TOKENS, ChatFormatError, encode_messages, parse_completion
from dsv32.llama.chatml import encode_chatml
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.tokenizer import Detokenizer, Tokenizer, main, train_tokenizer

CORPUS = [json.decoder.__file__, textwrap.__file__]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, 800, tmp_path_factory.mktemp("tok"))


def test_special_tokens_are_single_ids(tok):
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t) == [i]
        ids = tok.encode(f"x{t}y")
        assert ids.count(i) == 1 and len(ids) == 3
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    # The DSML marker inside markup is one id too.
    assert tok.special_ids["｜DSML｜"] in tok.encode('<｜DSML｜invoke name="f">')


def test_apply_chat_template_is_encode_of_the_prompt(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "look", "tool_calls": [
            {"type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18°C"},
    ]
    tools = [{"type": "function", "function": {"name": "w", "parameters": {}}}]
    ids = tok.apply_chat_template(messages, "thinking", tools=tools)
    prompt = encode_messages(messages, "thinking", tools=tools)
    assert ids == tok.encode(prompt) and ids[0] == tok.bos_id
    assert tok.decode(ids) == prompt


def test_decoded_completion_parses(tok):
    completion = 'r</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>'
    assert parse_completion(tok.decode(tok.encode(completion)))["tool_calls"][0]["function"]["name"] == "f"


@settings(deadline=None, max_examples=100)
@given(st.lists(st.text(max_size=12) | st.sampled_from(SPECIAL_TOKENS), max_size=10).map("".join))
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_load_from_dir_or_file_and_cli(tmp_path, tok):
    main(["train", "--files", *CORPUS, "--vocab-size", "800", "--out", str(tmp_path / "cli")])
    path = tmp_path / "cli" / "tokenizer.json"
    sample = "def f(x):\n    return x  # é <think>"
    for loaded in (Tokenizer.from_file(path), Tokenizer.from_file(path.parent)):
        assert loaded.vocab_size == tok.vocab_size == 800
        assert loaded.encode(sample) == tok.encode(sample)


# ---- Detokenizer: streamed ids -> text ----

def cut_at_first_stop(text: str, stop: list[str]) -> str:
    """By hand: text before the stop string that is completed first, i.e. the shortest prefix of
    text ending in one (of those ending there, the longest goes)."""
    for end in range(len(text) + 1):
        ending = [s for s in stop if s and text[:end].endswith(s)]
        if ending:
            return text[:end - max(map(len, ending))]
    return text


# multi-byte characters (a byte-level token may end inside one), the corpus's own words, newlines
TEXT = st.lists(st.sampled_from(list("ab x\n") + ["é", "世", "🎉", "def", "return", "é!"]), max_size=20).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=TEXT, data=st.data())
def test_detokenizer_feeds_add_up_to_the_text_cut_at_the_first_stop_string(tok, text, data):
    """However a text's ids are split into feeds, the pieces add up to the decoded text cut before
    its first stop string, `stopped` says whether one came, and no piece holds part of a UTF-8
    character (the text has no U+FFFD of its own, so any would be one)."""
    ids = tok.encode(text)
    decoded = tok.decode(ids)
    cuts = data.draw(st.lists(st.integers(0, len(ids)), max_size=8), "cuts")
    pieces = st.text(st.sampled_from(list("ab x\né!世")), min_size=1, max_size=3)
    inside = st.builds(lambda a, n: decoded[a:a + n], st.integers(0, max(0, len(decoded) - 1)), st.integers(1, 4))
    stop = data.draw(st.lists(inside | inside | pieces, max_size=3), "stop")
    detok, out, last = Detokenizer(tok, stop), [], 0
    for c in sorted(set(cuts) - {len(ids)}) + [len(ids)]:
        out.append(detok.feed(ids[last:c], final=c == len(ids)))
        last = c
    assert "".join(out) == cut_at_first_stop(decoded, stop)
    assert detok.stopped == any(s and s in decoded for s in stop)
    assert not any("\ufffd" in piece for piece in out)


def test_detokenizer_by_hand(tok):
    """A character split across feeds comes out whole once complete; the last len(longest stop
    string) - 1 characters wait until more come or the stream ends; the stop string completed first
    wins, even where another began earlier, and nothing comes after it."""
    ids = tok.encode("é")
    assert len(ids) == 2  # two bytes, two byte-level tokens
    d = Detokenizer(tok)
    assert (d.feed(ids[:1]), d.feed(ids[1:])) == ("", "é")
    d = Detokenizer(tok, ["abc"])
    assert [d.feed(tok.encode(t)) for t in ("xa", "b", "d")] + [d.feed([], final=True)] == ["", "x", "a", "bd"]
    d = Detokenizer(tok, ["abcd", "bc"])
    assert [d.feed(tok.encode(t)) for t in ("xab", "cd", "more")] == ["", "xa", ""] and d.stopped
    d = Detokenizer(tok, ["x!"])
    assert d.feed(tok.encode("ax"), final=True) == "ax" and not d.stopped


# ---- PlainTokenizer (converted Llama-family models) and its chat format ----

def bpe(special: list[str]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(f) for f in CORPUS], trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's first ids


def test_plain_tokenizer_speaks_chatml_when_its_vocabulary_has_it():
    hf = bpe(CHATML)
    tok = PlainTokenizer(hf, bos_id=1, eos_id=0)
    assert tok.chat_format == "chatml" and tok.stop_ids == (0, 2)
    msgs = [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "return x"},
            {"role": "user", "content": "again"}]
    ids = tok.apply_chat_template(msgs)
    assert ids == hf.encode(encode_chatml(msgs), add_special_tokens=False).ids
    assert ids.count(1) == 5 and ids.count(2) == 4  # default system, 3 turns, the generation prompt
    assert tok.decode(ids) == encode_chatml(msgs)
    assert tok.apply_chat_template(msgs, default_system=None).count(1) == 4
    with_tools = tok.apply_chat_template(msgs, tools=[{"type": "function", "function": {"name": "f"}}])
    assert tok.decode(with_tools) == encode_chatml(msgs, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(ChatFormatError, match="no thinking mode"):
        tok.apply_chat_template(msgs, thinking_mode="thinking")


def test_plain_tokenizer_without_chat_tokens_says_so():
    tok = PlainTokenizer(bpe(["<s>", "</s>"]), bos_id=0, eos_id=1)
    assert tok.chat_format is None and tok.stop_ids == (1,)
    with pytest.raises(ValueError, match="no chat tokens"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_plain_tokenizer_without_chat_tokens_has_no_reply_parser():
    tok = PlainTokenizer(bpe(["<s>", "</s>"]), bos_id=0, eos_id=1)
    with pytest.raises(ChatFormatError, match="no chat tokens"):
        tok.stream_parser()