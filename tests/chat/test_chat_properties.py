"""Property tests: encode -> parse round trips, streaming == strict under any cutting, fuzzing."""

import json

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dsv32.chat import (
    BOS, DSML, EOS, THINK_END, THINK_START, ChatFormatError, StreamParser, encode_completion,
    encode_messages, parse_completion,
)

SETTINGS = settings(deadline=None, max_examples=150)

FORBIDDEN = (BOS, EOS, THINK_START, THINK_END, DSML)
# Pieces that look like markup, so that random text often comes close to the real thing.
TRICKY = [
    "\n", "\n\n", "<", ">", "</", "/", '"', "{", "}", " ", "｜", "think", "DSML", "<｜", "</think", "｜DSML",
    "<｜end▁of▁", "\n\n<", "function_calls", "invoke", "parameter", 'name="', 'string="true">', "<｜User｜>",
]
MARKUP = [
    BOS, EOS, THINK_START, THINK_END, DSML, f"\n\n<{DSML}function_calls", ">\n", f"<{DSML}invoke",
    ' name="f">\n', f"<{DSML}parameter", ' name="k" string="true">', ' name="k" string="false">',
    f"</{DSML}parameter>", f"/{DSML}parameter", f"</{DSML}invoke>", f"</{DSML}invoke",
    f"</{DSML}function_calls>", "1", "[1]", "x", "<", "\n",
]

text = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(TRICKY)), max_size=8).map("".join)
plain = text.filter(lambda s: not any(t in s for t in FORBIDDEN))  # what content may hold
value_text = text.filter(lambda s: f"/{DSML}parameter" not in s)
name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)
key = st.text(st.characters(categories=("L", "N")) | st.sampled_from("_-. "), min_size=1, max_size=10)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | value_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(value_text, inner, max_size=3),
    max_leaves=8,
)
tool_call = st.builds(
    lambda n, args: {"type": "function", "function": {"name": n, "arguments": json.dumps(args, ensure_ascii=False)}},
    name,
    st.dictionaries(key, json_value, max_size=4),
)
mode = st.sampled_from(["thinking", "chat"])


@st.composite
def assistant(draw, thinking_mode):
    reasoning = draw(plain) if thinking_mode == "thinking" else ""
    calls = draw(st.lists(tool_call, max_size=3))
    return {"role": "assistant", "content": draw(plain), "reasoning_content": reasoning, "tool_calls": calls}


@st.composite
def mode_and_message(draw):
    m = draw(mode)
    return m, draw(assistant(m))


def stream(text, thinking_mode, cuts, lenient=False):
    """Feed text cut at `cuts`; return the parser, the events, or the error if one was raised."""
    parser, events, prev = StreamParser(thinking_mode, lenient=lenient), [], 0
    try:
        for cut in sorted(cuts) + [len(text)]:
            events += parser.feed(text[prev:cut])
            prev = max(prev, cut)
        events += parser.finish()
    except ChatFormatError as e:
        return parser, events, e
    return parser, events, None


def check_events(message, events):
    assert "".join(v for k, v in events if k == "reasoning") == message["reasoning_content"]
    assert "".join(v for k, v in events if k == "content") == message["content"]
    assert [v for k, v in events if k == "tool_call"] == message["tool_calls"]


@SETTINGS
@given(mode_and_message())
def test_parse_inverts_encode(case):
    thinking_mode, message = case
    assert parse_completion(encode_completion(message, thinking_mode), thinking_mode) == message


@SETTINGS
@given(mode_and_message(), st.data())
def test_stream_agrees_with_strict_for_any_cutting(case, data):
    thinking_mode, message = case
    completion = encode_completion(message, thinking_mode)
    cuts = data.draw(st.lists(st.integers(0, len(completion)), max_size=12))
    parser, events, error = stream(completion, thinking_mode, cuts)
    assert error is None and parser.message == message
    check_events(message, events)


@SETTINGS
@given(mode_and_message())
def test_prompt_plus_completion_is_the_conversation(case):
    """What the model generates after a prompt is exactly how the next prompt renders it."""
    thinking_mode, message = case
    assume(thinking_mode == "chat" or message["reasoning_content"] or message["tool_calls"])
    history = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    prompt = encode_messages(history, thinking_mode)
    assert encode_messages(history + [message], thinking_mode) == prompt + encode_completion(message, thinking_mode)


def test_every_single_and_double_cut_of_one_completion():
    message = {
        "role": "assistant", "content": "ok\n", "reasoning_content": "r<",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": "<b>", "n": [1]}'}}],
    }
    completion = encode_completion(message, "thinking")
    n = len(completion)
    for i in range(n + 1):
        for j in range(i, n + 1, 3):
            parser, events, error = stream(completion, "thinking", [i, j])
            assert error is None and parser.message == message, (i, j)


fuzz_text = st.lists(st.one_of(st.sampled_from(MARKUP), st.sampled_from(TRICKY), st.text(max_size=4)), max_size=25)


@st.composite
def mutated(draw):
    """A valid completion with a few pieces deleted, duplicated or inserted."""
    thinking_mode, message = draw(mode_and_message())
    s = encode_completion(message, thinking_mode)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(s)))
        j = draw(st.integers(i, min(len(s), i + 12)))
        how = draw(st.sampled_from(["delete", "duplicate", "insert", "truncate"]))
        piece = draw(st.sampled_from(MARKUP + TRICKY))
        s = {"delete": s[:i] + s[j:], "duplicate": s[:j] + s[i:j] + s[j:], "insert": s[:i] + piece + s[i:],
             "truncate": s[:i]}[how]
    return thinking_mode, s


@SETTINGS
@given(st.one_of(mutated(), st.tuples(mode, fuzz_text.map("".join))), st.data())
def test_fuzz_only_a_result_or_a_chat_format_error(case, data):
    thinking_mode, s = case
    try:
        strict, error = parse_completion(s, thinking_mode), None
    except ChatFormatError as e:
        strict, error = None, e
    assert error is None or (error.offset is not None and 0 <= error.offset <= len(s))
    cuts = data.draw(st.lists(st.integers(0, len(s)), max_size=8))
    parser, events, stream_error = stream(s, thinking_mode, cuts)
    assert (stream_error is None) == (error is None)
    if error is None:
        assert parser.message == strict
        check_events(strict, events)
    lenient, events, raised = stream(s, thinking_mode, cuts, lenient=True)
    assert raised is None and (lenient.error is None) == (error is None)
    check_events(lenient.message, events)
    if error is None:
        assert lenient.message == strict
