"""The strict and streaming parsers on hand-written completions, valid and malformed."""

import pytest

from dsv32.chat import ChatFormatError, StreamParser, parse_completion

E = "<｜end▁of▁sentence｜>"
D = "｜DSML｜"


def invoke(name, *params):
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def param(key, value, string="true"):
    return f'<{D}parameter name="{key}" string="{string}">{value}</{D}parameter>'


def block(*invokes):
    return f"\n\n<{D}function_calls>\n" + "\n".join(invokes) + f"\n</{D}function_calls>"


def fn(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def msg(content="", reasoning="", tool_calls=()):
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": list(tool_calls)}


def stream(text, mode="thinking", step=1, lenient=False):
    parser = StreamParser(mode, lenient=lenient)
    events = [ev for i in range(0, len(text), step) for ev in parser.feed(text[i:i + step])]
    return parser, events + parser.finish()


VALID = [
    ("thinking", "Let me think.</think>The answer is 4." + E, msg("The answer is 4.", "Let me think.")),
    ("chat", "The answer is 4." + E, msg("The answer is 4.")),
    ("thinking", "</think>" + E, msg()),
    ("chat", "a\n\n\nb <｜User｜> ok" + E, msg("a\n\n\nb <｜User｜> ok")),
    (
        "thinking",
        "Need data.</think>Checking." + block(invoke("get_weather", param("city", "Paris"))) + E,
        msg("Checking.", "Need data.", [fn("get_weather", '{"city": "Paris"}')]),
    ),
    (
        "chat",
        block(
            invoke("search", param("q", 'café "x"\nline'), param("k", "3", "false")),
            invoke("calc", param("expr", '{"a": [1, 2]}', "false"), param("exact", "true", "false")),
        ) + E,
        msg("", "", [fn("search", '{"q": "café \\"x\\"\\nline", "k": 3}'), fn("calc", '{"expr": {"a": [1, 2]}, "exact": true}')]),
    ),
    # An invoke without parameters, as the encoder writes it (empty line) and without the empty line.
    ("chat", block(invoke("now")) + E, msg(tool_calls=[fn("now", "{}")])),
    ("chat", f'\n\n<{D}function_calls>\n<{D}invoke name="now">\n</{D}invoke>\n</{D}function_calls>' + E,
     msg(tool_calls=[fn("now", "{}")])),
    # Official quirks: "<\n" before a parameter's end tag; an empty block means no calls.
    ("chat", block(invoke("f", f'<{D}parameter name="a" string="true">v<\n/{D}parameter>')) + E,
     msg(tool_calls=[fn("f", '{"a": "v"}')])),
    ("chat", f"hi\n\n<{D}function_calls>\n</{D}function_calls>" + E, msg("hi")),
    # A string value may contain markup that does not end it.
    ("chat", block(invoke("w", param("text", f"</{D}invoke> <{D}parameter x"))) + E,
     msg(tool_calls=[fn("w", f'{{"text": "</{D}invoke> <{D}parameter x"}}')])),
]


@pytest.mark.parametrize("mode, text, expected", VALID)
def test_valid_completions(mode, text, expected):
    assert parse_completion(text, mode) == expected
    parser, events = stream(text, mode)
    assert parser.message == expected and parser.error is None
    assert [v for k, v in events if k == "tool_call"] == expected["tool_calls"]


def test_stream_emits_tool_calls_as_soon_as_they_close():
    first, second = invoke("a", param("x", "1")), invoke("b", param("y", "2"))
    text = "r</think>c" + block(first, second) + E
    parser = StreamParser("thinking")
    cut = text.index(f"</{D}invoke>") + len(f"</{D}invoke>")
    events = parser.feed(text[:cut])
    assert events == [("reasoning", "r"), ("content", "c"), ("tool_call", fn("a", '{"x": "1"}'))]
    assert parser.feed(text[cut:]) == [("tool_call", fn("b", '{"y": "2"}'))]
    assert parser.finish() == []


def test_stream_holds_back_split_special_tokens():
    parser = StreamParser("thinking")
    assert parser.feed("x<y ｜z\n") == [("reasoning", "x<y ｜z\n")]  # nothing held that need not be
    assert parser.feed("abc</th") == [("reasoning", "abc")]
    assert parser.feed("ink>x\n\n") == [("content", "x")]
    assert parser.feed("<｜DS") == []
    assert parser.feed("ML｜function_calls>\n</｜DSML｜function_calls><｜end▁of▁") == []
    assert parser.feed("sentence｜>") == []
    parser.finish()
    assert parser.message == msg("x", "x<y ｜z\nabc")


def case(mode, text, fragment, at):
    """A malformed completion; `at` is the error offset, a string that starts there (its last
    occurrence), or None for the end of the text."""
    return mode, text, fragment, len(text) if at is None else at if isinstance(at, int) else text.rindex(at)


BAD_JOIN = block(invoke("f", param("a", "1"))).replace(f"</{D}parameter>\n", f"</{D}parameter>")
BAD_GAP = block(invoke("f"), invoke("g")).replace(f"</{D}invoke>\n<", f"</{D}invoke>\nxx<", 1)
MALFORMED = [
    case("thinking", "never closed", "never closed by '</think>'", None),
    case("chat", "no end", "does not end with the end-of-sentence token", None),
    case("chat", "done" + E + "more", "unexpected text after the end-of-sentence token", "more"),
    case("thinking", "a<think>b</think>c" + E, "special token '<think>' inside the reasoning", 1),
    case("thinking", "r</think>c</think>" + E, "special token '</think>' inside the content", "</think>"),
    case("chat", "x <｜begin▁of▁sentence｜>" + E, "special token '<｜begin▁of▁sentence｜>' inside the content", 2),
    case("chat", f"ab<{D}function_calls>" + E, f"special token '{D}' inside the content", 3),
    case("thinking", "r" + block(invoke("f")) + "</think>" + E, f"special token '{D}' inside the reasoning", 4),
    case("chat", f'\n\n<{D}function_calls><{D}invoke name="f">', "expected '>\\n<｜DSML｜invoke'", f"><{D}invoke"),
    case("chat", block(invoke("f")).replace("name=", "nme=") + E, "malformed invoke head", ' nme="f"'),
    case("chat", block(invoke("f", f'<{D}parameter name="a">1</{D}parameter>')) + E, "malformed parameter", ' name="a">'),
    case("chat", block(invoke("f", param("a", "1", "yes"))) + E, "malformed parameter", ' name="a"'),
    case("chat", block(invoke("f", param("a", "1"), param("a", "2"))) + E, "duplicate parameter 'a'", ' name="a"'),
    case("chat", block(invoke("f", param("a", "oops", "false"))) + E, "'a' has string=\"false\" but is not JSON", ' name="a"'),
    case("chat", BAD_JOIN + E, "after a parameter", f"></{D}invoke>"),
    case("chat", BAD_GAP + E, "inside the tool-call block, found '>\\nxx", ">\nxx"),
    case("chat", block(invoke("f")) + "tail" + E, "expected the end-of-sentence token after the tool-call block", "tail"),
    case("chat", block(invoke("f")), "expected the end-of-sentence token after the tool-call block", None),
    case("chat", block(invoke("f"))[:-20], "text ends inside the tool-call block", None),
    case("chat", block(invoke("f", param("a", "12"))).split("2<")[0], "text ends inside a parameter", None),
]


@pytest.mark.parametrize("mode, text, fragment, offset", MALFORMED)
def test_malformed_completions_raise_with_position(mode, text, fragment, offset):
    with pytest.raises(ChatFormatError) as strict:
        parse_completion(text, mode)
    assert fragment in str(strict.value) and str(strict.value).endswith(f"at offset {offset}")
    assert strict.value.offset == offset
    with pytest.raises(ChatFormatError):
        stream(text, mode)


@pytest.mark.parametrize("mode, text, fragment, offset", MALFORMED)
def test_lenient_stream_returns_what_it_has(mode, text, fragment, offset):
    parser, events = stream(text, mode, step=3, lenient=True)
    assert parser.error is not None and parser.error.offset is not None
    m = parser.message
    assert text.startswith(m["reasoning_content"]) and E not in m["content"]
    assert all(v in text for k, v in events if k == "content")
    assert m["content"] == "".join(v for k, v in events if k == "content")


def test_lenient_mode_keeps_closed_tool_calls_and_passes_the_rest_as_content():
    good = invoke("f", param("a", "1"))
    bad = f'<{D}invoke name="g">\n<{D}parameter name="b">2</{D}parameter>\n</{D}invoke>'
    text = "ok" + block(good, bad) + E
    parser, _ = stream(text, "chat", lenient=True)
    assert parser.message["tool_calls"] == [fn("f", '{"a": "1"}')]
    assert parser.message["content"] == "ok" + text[text.index(f"</{D}invoke") + len(f"</{D}invoke"):-len(E)]
    assert "malformed parameter" in str(parser.error)


def test_lenient_truncated_reasoning_stays_reasoning():
    parser, _ = stream("thinking about it </th", "thinking", step=4, lenient=True)
    assert parser.message["reasoning_content"] == "thinking about it </th" and parser.message["content"] == ""
    assert "never closed" in str(parser.error)
