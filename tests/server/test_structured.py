"""Structured outputs and forced tool calls (constrained decoding), with the real `openai` client
against tiny random models sampled at temperature 1.0: whatever a random model would write, every
reply follows the request's JSON schema, and every forced call names an offered tool with
arguments that validate against that tool's schema (checked with `jsonschema`, an independent
validator). On the V3.2 format (DSML tool-call blocks) and on ChatML (SmolLM2's <tool_call> form).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from scripted import MODEL, Server, engine_args, tiny_chatml_dir, tiny_v32_dir

from dsv32.server import load_engine

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
from experiments import structured_outputs  # noqa: E402 (after the skips: it imports jsonschema)

N = 16  # sampled replies per check, sent together (the engine batches them)

# Schemas whose every valid instance is short: what a random model writes inside them ends in a
# few dozen tokens.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}},
                         "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 4}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
                          "unit": {"type": "string", "enum": ["C", "F"]},
                          "hours": {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 23}}}}
TIME = {"type": "object", "additionalProperties": False, "properties": {}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["v32", "chatml"])
def server(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    # a longer context than the tiny presets': with their few-hundred-token vocabularies the tools
    # section alone takes about 1000 tokens
    model_dir = tiny_v32_dir(path, max_position_embeddings=2048) if request.param == "v32" else \
        tiny_chatml_dir(path, max_position_embeddings=2048)
    engine, tok = load_engine(engine_args(model_dir))
    s = Server(engine, tok)
    yield s
    s.stop()


def sampled(server, n=N, max_tokens=300, **kw):
    """n replies at temperature 1.0, each its own seed, sent concurrently."""
    def one(seed):
        return server.client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed,
                                                     max_tokens=max_tokens, **kw).choices[0]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def test_json_schema_replies_parse_and_validate(server):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    replies = sampled(server, response_format=rf)
    values = [json.loads(c.message.content) for c in replies]
    for c, v in zip(replies, values):
        assert c.finish_reason == "stop" and not c.message.tool_calls
        jsonschema.validate(v, PERSON)
    assert len({json.dumps(v) for v in values}) > N // 2          # sampled, not one forced answer
    stream = server.client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=3,
                                                   max_tokens=300, response_format=rf, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert json.loads(text) == values[3]                          # streamed: the same reply


def check_calls(choice, names):
    calls = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and calls, choice
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


def test_tool_choice_required_always_calls_an_offered_tool_with_valid_arguments(server):
    replies = sampled(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    names = {call.function.name for c in replies for call in check_calls(c, set(SCHEMAS))}
    assert names == set(SCHEMAS)                                   # both tools come up
    assert all(len(c.message.tool_calls) == 1 for c in replies)
    # with parallel calls (the default) one or more (tests/chat/test_chat_grammar.py: two calls parse);
    # a random model may go on from call to call past max_tokens
    replies = sampled(server, n=8, tools=TOOLS, tool_choice="required", max_tokens=1000)
    for c in replies:
        if c.finish_reason != "length":
            check_calls(c, set(SCHEMAS))
    assert sum(c.finish_reason == "tool_calls" for c in replies) >= 4


def test_a_named_tool_choice_always_calls_that_tool_once(server):
    replies = sampled(server, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    args = [json.loads(check_calls(c, {"get_weather"})[0].function.arguments) for c in replies]
    assert all(len(c.message.tool_calls) == 1 for c in replies)
    assert any("unit" in a for a in args) and any("unit" not in a for a in args)   # optional: sometimes


def test_constraints_that_cannot_hold_are_400s_naming_the_field(server):
    url = server.url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": ASK, "max_tokens": 4}
    cases = [
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({**ok, "response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"},
         "response_format"),
        ({**ok, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "nope"}}}}}], "tool_choice": "required"}, "tool_choice"),
    ]
    for body, param in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_the_structured_outputs_experiment_runs_end_to_end_and_accounts_for_every_reply(tmp_path):
    """experiments/structured_outputs.py (the default model's 100-reply check) on a tiny V3.2 model:
    it serves, asks every check, and every reply is either valid or a named failure."""
    structured_outputs.main(["--model", str(tiny_v32_dir(tmp_path / "m", max_position_embeddings=2048)), "--device", "cpu", "--n", "2",
                             "--max-tokens", "48", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "structured.json").read_text())
    assert set(report["checks"]) == {"json_schema", "json_object", "tool_required", "tool_named"}
    for check in report["checks"].values():
        assert check["valid"] + len(check["failures"]) == check["n"] == 2
        assert all(isinstance(why, str) and why for _, why in check["failures"])
