"""Tool calls at the HTTP edge, with the scripted engine writing the model's text on purpose:
no tools (or tool_choice "none") means no tool_calls; a block cut off by max_tokens or a stop
string is reported as truncated (finish_reason "length") with nothing of it in the content; only
declared tools come back as calls; arguments stream a parameter at a time and concatenate
exactly to the final arguments."""

import json

import pytest
from scripted import MODEL, Server, script, scripted_engine, tiny_v32_dir

from dsv32.chat import encode_completion

CALL = {"type": "function", "function": {"name": "get_weather",
                                         "arguments": {"city": "Paris", "days": 3, "units": ["c"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    engine, tok = scripted_engine(tiny_v32_dir(tmp_path_factory.mktemp("tiny-tools")), max_num_seqs=2)
    server = Server(engine, tok)
    yield server
    server.stop()


def both(server, **kw):
    """(message, finish_reason) non-streamed, and (content, {index: [name, [argument deltas]]}, finish) streamed."""
    r = server.client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=300, **kw)
    content, calls, finish = "", {}, None
    for chunk in server.client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=300, stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                calls.setdefault(tc.index, [tc.function.name, []])[1].append(tc.function.arguments or "")
            finish = c.finish_reason or finish
    return (r.choices[0].message, r.choices[0].finish_reason), (content, calls, finish)


def test_without_tools_a_tool_call_block_is_content(scripted):
    completion = encode_completion({"content": "Let me check.", "tool_calls": [CALL]}, "chat")
    script(scripted, completion)
    for kw in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        (msg, finish), (content, calls, s_finish) = both(scripted, **kw)
        assert msg.tool_calls is None and not calls and finish == s_finish == "stop"
        assert msg.content == content == completion.removesuffix("<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("cut", ["max_tokens", "stop"])
def test_a_cut_off_tool_call_block_is_truncated_not_leaked(scripted, cut):
    completion = encode_completion({"content": "Let me check.", "tool_calls": [CALL]}, "chat")
    script(scripted, completion)
    if cut == "max_tokens":
        kw = {"max_tokens": len(scripted.tok.encode(completion[:completion.index("Paris") + 2]))}
    else:
        kw = {"stop": ["Paris"]}
    r = scripted.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, **{"max_tokens": 300, **kw})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length" and msg.content == "Let me check." and msg.tool_calls is None
    content, finish = "", None
    for chunk in scripted.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True,
                                                         **{"max_tokens": 300, **kw}):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (content, finish) == ("Let me check.", "length")


def test_only_declared_tools_come_back_as_calls(scripted):
    other = {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    completion = encode_completion({"content": "", "tool_calls": [CALL, other]}, "chat")
    script(scripted, completion)
    (msg, finish), (content, calls, s_finish) = both(scripted, tools=TOOLS[:1])
    assert [c.function.name for c in msg.tool_calls] == ["get_weather"] and finish == s_finish == "tool_calls"
    assert [name for name, _ in calls.values()] == ["get_weather"]
    assert 'invoke name="get_time"' in msg.content and msg.content == content  # left in the content, as written
    # a named tool_choice is held by its grammar (test_structured.py): a reply that calls it comes back as that call
    script(scripted, encode_completion({"content": "", "tool_calls": [other]}, "chat"))
    zone = {"type": "object", "properties": {"zone": {"type": "string"}}}
    tools = [TOOLS[0], {"type": "function", "function": {"name": "get_time", "parameters": zone}}]
    (msg, _), _ = both(scripted, tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in msg.tool_calls] == ["get_time"] and not msg.content


def test_arguments_stream_a_parameter_at_a_time_and_add_up_exactly(scripted):
    completion = encode_completion({"content": "Let me check.", "tool_calls": [CALL]}, "chat")
    script(scripted, completion)
    (msg, _), (_, calls, finish) = both(scripted, tools=TOOLS)
    [(name, deltas)] = calls.values()
    assert name == "get_weather" and finish == "tool_calls"
    assert "".join(deltas) == msg.tool_calls[0].function.arguments
    assert json.loads(msg.tool_calls[0].function.arguments) == CALL["function"]["arguments"]
    assert len([d for d in deltas if d]) >= 3  # one per parameter (and the closing brace), not one in all
