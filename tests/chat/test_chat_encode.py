"""The encoder against prompts written out by hand from the official V3.2 format."""

import json

import pytest

from dsv32.chat import ChatFormatError, encode_messages

B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERT = {
    "type": "function",
    "function": {"name": "to_fahrenheit", "parameters": {"type": "object", "properties": {"celsius": {"type": "number"}}}},
}

# The tools section, typed out from the official template (blank lines as in DeepSeek's fixtures).
TOOLS_TEXT = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<｜DSML｜function_calls>" block like the following as part of your reply to the user:
<｜DSML｜function_calls>
<｜DSML｜invoke name="$FUNCTION_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$FUNCTION_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<｜DSML｜function_calls>
...
</｜DSML｜function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
{"name": "get_weather", "description": "Current weather for a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
{"name": "to_fahrenheit", "parameters": {"type": "object", "properties": {"celsius": {"type": "number"}}}}
</functions>
"""


def call(name, **args):
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# One user turn with two tool rounds: a parallel call, then a call with a non-string argument.
TURN = [
    {"role": "system", "content": "You are a weather bot.", "tools": [WEATHER, CONVERT]},
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I need both cities.",
        "tool_calls": [call("get_weather", city="Paris"), call("get_weather", city="Tokyo")],
    },
    {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temp": 18}'},
    {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temp": 25}'},
    {"role": "assistant", "content": None, "reasoning_content": "Tokyo in F too.", "tool_calls": [call("to_fahrenheit", celsius=25)]},
    {"role": "tool", "content": "77"},
    {"role": "assistant", "content": "Paris 18°C, Tokyo 25°C (77°F).", "reasoning_content": "Done."},
]

CALLS_1 = (
    "\n\n<｜DSML｜function_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Tokyo</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜function_calls>"
)
CALLS_2 = (
    "\n\n<｜DSML｜function_calls>\n"
    '<｜DSML｜invoke name="to_fahrenheit">\n'
    '<｜DSML｜parameter name="celsius" string="false">25</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜function_calls>"
)
RESULTS_1 = '\n\n<function_results>\n<result>{"temp": 18}</result>\n<result>{"temp": 25}</result>\n</function_results>'
RESULTS_2 = "\n\n<function_results>\n<result>77</result>\n</function_results>"
SYSTEM = "You are a weather bot.\n\n" + TOOLS_TEXT


def test_tool_loop_in_one_user_turn_keeps_reasoning():
    expected = (
        B + SYSTEM
        + U + "Weather in Paris and Tokyo?" + A + "<think>"
        + "I need both cities.</think>" + CALLS_1 + E
        + RESULTS_1 + "\n\n<think>"
        + "Tokyo in F too.</think>" + CALLS_2 + E
        + RESULTS_2 + "\n\n<think>"
        + "Done.</think>Paris 18°C, Tokyo 25°C (77°F)." + E
    )
    assert encode_messages(TURN, "thinking") == expected


def test_new_user_message_drops_old_reasoning_keeps_tools():
    messages = TURN + [{"role": "user", "content": "And Berlin?"}]
    expected = (
        B + SYSTEM
        + U + "Weather in Paris and Tokyo?" + A + "</think>"
        + CALLS_1 + E
        + RESULTS_1 + "\n\n</think>"
        + CALLS_2 + E
        + RESULTS_2 + "\n\n</think>"
        + "Paris 18°C, Tokyo 25°C (77°F)." + E
        + U + "And Berlin?" + A + "<think>"
    )
    assert encode_messages(messages, "thinking") == expected


def test_user_message_right_after_tool_results():
    messages = TURN[:5] + [{"role": "user", "content": "Stop."}]
    expected = (
        B + SYSTEM
        + U + "Weather in Paris and Tokyo?" + A + "</think>"
        + CALLS_1 + E + RESULTS_1 + "\n\n</think>"
        + U + "Stop." + A + "<think>"
    )
    assert encode_messages(messages, "thinking") == expected


def test_drop_thinking_false_renders_every_turn_as_generated():
    messages = TURN + [{"role": "user", "content": "And Berlin?"}]
    kept = encode_messages(messages, "thinking", drop_thinking=False)
    assert kept == encode_messages(TURN, "thinking") + U + "And Berlin?" + A + "<think>"


def test_chat_mode():
    messages = TURN + [{"role": "user", "content": "And Berlin?"}]
    expected = (
        B + SYSTEM
        + U + "Weather in Paris and Tokyo?" + A + "</think>"
        + CALLS_1 + E + RESULTS_1 + "\n\n</think>"
        + CALLS_2 + E + RESULTS_2 + "\n\n</think>"
        + "Paris 18°C, Tokyo 25°C (77°F)." + E
        + U + "And Berlin?" + A + "</think>"
    )
    assert encode_messages(messages, "chat") == expected


def test_simple_chat_turns():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
        {"role": "user", "content": "2+2?"},
    ]
    assert encode_messages(messages, "chat") == f"{B}{U}Hi{A}</think>Hello!{E}{U}2+2?{A}</think>"
    assert encode_messages(messages) == f"{B}{U}Hi{A}</think>Hello!{E}{U}2+2?{A}<think>"
    assert encode_messages(messages, add_bos=False) == f"{U}Hi{A}</think>Hello!{E}{U}2+2?{A}<think>"


def test_developer_role_carries_tools_and_the_question():
    messages = [{"role": "developer", "content": "Population of Lyon?", "tools": [WEATHER, CONVERT]}]
    expected = B + U + "\n\n" + TOOLS_TEXT + "\n\n# The user's message is: Population of Lyon?" + A + "<think>"
    assert encode_messages(messages) == expected
    # A developer message counts as the last user message for the thinking rule.
    messages += [
        {"role": "assistant", "reasoning_content": "look it up", "tool_calls": [call("get_weather", city="Lyon")]},
        {"role": "tool", "content": "sunny"},
    ]
    assert encode_messages(messages).endswith(
        A + "<think>look it up</think>\n\n<｜DSML｜function_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Lyon</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜function_calls>" + E + "\n\n<function_results>\n<result>sunny</result>\n"
        "</function_results>\n\n<think>"
    )


def test_reasoning_before_a_later_developer_message_is_dropped():
    """The drop point is the last user OR developer message (the official encoder's rule): an
    answer's reasoning followed by a developer turn must not leak into the next prompt."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "SECRET-THOUGHT", "content": "Hello!"},
        {"role": "developer", "content": "Now search."},
    ]
    text = encode_messages(messages)
    assert "SECRET-THOUGHT" not in text
    assert text == (f"{B}{U}Hi{A}</think>Hello!{E}{U}\n\n# The user's message is: Now search.{A}<think>")
    # after the developer turn, the reasoning of a reply stays (reasoning survives tool round trips)
    messages += [{"role": "assistant", "reasoning_content": "KEEP", "tool_calls": [call("get_weather", city="Lyon")]},
                 {"role": "tool", "content": "sunny"}]
    assert "KEEP" in encode_messages(messages) and "SECRET-THOUGHT" not in encode_messages(messages)


def test_response_format():
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}
    messages = [{"role": "system", "content": "Be terse.", "response_format": schema}, {"role": "user", "content": "2+2?"}]
    expected = (
        B + "Be terse.\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        '{"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}'
        + U + "2+2?" + A + "<think>"
    )
    assert encode_messages(messages) == expected
    # Tools come first, then the response format.
    both = [{"role": "system", "content": "", "tools": [WEATHER, CONVERT], "response_format": {"type": "json_object"}}]
    assert encode_messages(both, add_bos=False) == (
        "\n\n" + TOOLS_TEXT + "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        '{"type": "json_object"}'
    )


def test_request_level_tools_and_response_format_go_on_the_system_message():
    user = [{"role": "user", "content": "q"}]
    fmt = {"type": "json_object"}
    explicit = [{"role": "system", "content": "", "tools": [WEATHER], "response_format": fmt}] + user
    assert encode_messages(user, tools=[WEATHER], response_format=fmt) == encode_messages(explicit)
    with_system = [{"role": "system", "content": "S"}] + user
    assert encode_messages(with_system, tools=[WEATHER]) == encode_messages(
        [{"role": "system", "content": "S", "tools": [WEATHER]}] + user
    )


def test_unicode_and_json_arguments_are_rendered_unescaped():
    msg = {
        "role": "assistant",
        "reasoning_content": "r",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"q": "café \"x\"", "n": [1, {"é": None}]}}}],
    }
    out = encode_messages([{"role": "user", "content": "u"}, msg], add_bos=False)
    assert out.endswith(
        '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="q" string="true">café "x"</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">[1, {"é": null}]</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜function_calls>" + E
    )


@pytest.mark.parametrize(
    "messages, mode, match",
    [
        ([{"role": "user", "content": "q"}], "fast", "thinking_mode"),
        ([{"role": "robot", "content": "q"}], "thinking", "unknown role"),
        ([{"role": "user", "content": None}], "thinking", "content must be a string"),
        ([{"role": "developer", "content": ""}], "thinking", "non-empty"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "thinking", "without a matching tool call"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "thinking", "needs reasoning_content"),
        (TURN[:4], "thinking", "only 1 of 2 tool results"),
        (TURN[:4] + [{"role": "user", "content": "q"}], "chat", "only 1 of 2 tool results precede"),
        (TURN[:7] + [{"role": "tool", "content": "extra"}], "thinking", "without a matching tool call"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "r", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
            "thinking",
            "must be a JSON object",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "r", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
            "thinking",
            "not JSON",
        ),
    ],
)
def test_invalid_conversations_raise(messages, mode, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_messages(messages, mode)


def test_tools_given_twice_is_an_error():
    with pytest.raises(ChatFormatError, match="both"):
        encode_messages([{"role": "system", "content": "", "tools": [WEATHER]}], tools=[CONVERT])
