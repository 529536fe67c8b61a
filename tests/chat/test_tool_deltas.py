"""The streaming parser's serving options: tool-call arguments streamed per parameter (their
fragments concatenate to a prefix of the final arguments, whatever the cutting), a tool-call
block as plain content when no tools are declared, and a block cut off by max_tokens reported
as truncated instead of leaked into the content. Oracle: the strict parser on the whole text."""

from hypothesis import given
from hypothesis import strategies as st
from test_chat_properties import SETTINGS, check_events, mode_and_message

from dsv32.chat import EOS, StreamParser, encode_completion, parse_completion
from dsv32.chat.format import CALLS_START, INVOKE_END

CALL = {"type": "function", "function": {"name": "get_weather",
                                         "arguments": {"city": "Paris", "days": 3, "units": ["c", "f"]}}}


def feed(parser, text, cuts):
    events, prev = [], 0
    for cut in sorted(cuts) + [len(text)]:
        events += parser.feed(text[prev:cut])
        prev = max(prev, cut)
    return events + parser.finish()


@SETTINGS
@given(mode_and_message(), st.data())
def test_argument_fragments_concatenate_to_the_final_arguments(case, data):
    mode, message = case
    text = encode_completion(message, mode)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    events = feed(StreamParser(mode, tool_deltas=True), text, cuts)
    check_events(message, [e for e in events if e[0] in ("reasoning", "content", "tool_call")])
    name, sent = None, ""
    for kind, value in events:
        if kind == "tool_call_start":
            assert name is None
            name, sent = value, ""
        elif kind == "tool_call_arguments":
            assert name is not None
            sent += value
        elif kind == "tool_call":
            if name is not None:  # an invoke that arrived whole streams no start
                assert value["function"]["name"] == name
                assert value["function"]["arguments"].startswith(sent)
            name = None


def test_string_arguments_stream_as_they_are_written():
    text = encode_completion({"content": "Checking.", "tool_calls": [CALL]}, "chat")
    events = feed(StreamParser("chat", tool_deltas=True), text, range(len(text)))
    fragments = [v for k, v in events if k == "tool_call_arguments"]
    final = parse_completion(text, "chat")["tool_calls"][0]["function"]["arguments"]
    assert "".join(fragments) + "}" == final
    assert fragments[:3] == ['{"city": "', "P", "a"]  # the string value, a character at a time
    assert [k for k, _ in events if k.startswith("tool_call")][0] == "tool_call_start"


def test_a_string_value_holds_back_only_what_may_be_its_end_tag():
    block = encode_completion({"content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"s": "a < b <"}}}]}, "chat")
    cut = block.index("a < b <") + len("a < b <")
    parser = StreamParser("chat", tool_deltas=True)
    events = parser.feed(block[:cut])  # the final "<" may start the end tag
    assert "".join(v for k, v in events if k == "tool_call_arguments") == '{"s": "a < b '
    events = parser.feed(block[cut:cut + 1])  # its end tag's "<": the first "<" was the value's
    assert "".join(v for k, v in events if k == "tool_call_arguments") == "<"


def test_without_tools_a_tool_call_block_is_content():
    text = encode_completion({"content": "Checking.", "tool_calls": [CALL]}, "chat")
    parser = StreamParser("chat", lenient=True, tools=False)
    feed(parser, text, range(0, len(text), 7))
    assert parser.message["tool_calls"] == [] and parser.error is None
    assert parser.message["content"] == text[:-len(EOS)]


def test_a_block_cut_off_anywhere_is_truncated_not_leaked():
    text = encode_completion({"content": "Checking.", "tool_calls": [CALL]}, "chat")
    start = text.index(CALLS_START) + 3  # past the blank line, into the marker's "<"
    closed = text.index(INVOKE_END) + len(INVOKE_END)  # from here on the invoke is whole: it is kept
    for end in range(start, len(text) - len(EOS) - 1):
        parser = StreamParser("chat", lenient=True)
        feed(parser, text[:end], range(0, end, 5))
        assert parser.truncated and parser.message["content"] == "Checking.", end
        assert len(parser.message["tool_calls"]) == (end >= closed), end
