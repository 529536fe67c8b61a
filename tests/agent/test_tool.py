"""The Tool contract: arguments checked against the schema, every failure a result string."""

from dsv32.agent.tool import Tool, ToolError


class Add(Tool):
    name = "add"
    description = "Add two integers."
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"]}

    def run(self, a: int, b: int) -> str:
        if a < 0:
            raise ToolError("a must be non-negative")
        if a == 13:
            raise RuntimeError("unlucky")
        return str(a + b)


def test_a_call_takes_json_or_a_dict_and_returns_the_result():
    assert Add()('{"a": 2, "b": 3}') == "5" and Add()({"a": 2, "b": 40}) == "42"


def test_every_failure_comes_back_as_an_error_result():
    add = Add()
    assert add('{"a": 2,').startswith("error: the arguments of add are not valid JSON")
    assert add("[1, 2]") == "error: the arguments of add must be a JSON object"
    assert add({"a": 1}) == "error: add needs the argument(s) b"
    assert add({"a": 1, "b": 2, "c": 3}) == "error: add has no argument(s) c; it takes a, b"
    assert add({"a": "1", "b": 2}) == "error: argument a of add must be of type integer, got str"
    assert add({"a": True, "b": 2}) == "error: argument a of add must be of type integer, got bool"
    assert add({"a": -1, "b": 2}) == "error: a must be non-negative"
    assert add({"a": 13, "b": 2}) == "error: add failed: RuntimeError: unlucky"


def test_the_schema_is_the_openai_tools_format_the_encoder_renders():
    import json

    from dsv32.chat import encode_messages

    schema = Add().schema()
    prompt = encode_messages([{"role": "user", "content": "1+1?"}], "thinking", tools=[schema])
    assert json.dumps(schema["function"], ensure_ascii=False) in prompt  # the encoder lists each function as JSON
