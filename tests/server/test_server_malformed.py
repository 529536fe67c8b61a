"""A battery of malformed and hostile requests: each is answered 4xx in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}), naming the field where there is one, and the
server is healthy after each (and answers a normal request, leaking no cache block, after all)."""

import httpx
import pytest
from scripted import MODEL

HELLO = [{"role": "user", "content": "hi"}]
OK = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def chat(**kw):
    return {**OK, **kw}


def text(**kw):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kw}


# (name, method, path, body: dict / list / bytes / None, status, param or None)
CASES = [
    ("not json", "POST", CHAT, b"{not json", 400, None),
    ("empty body", "POST", CHAT, b"", 400, None),
    ("array body", "POST", CHAT, [1, 2, 3], 400, None),
    ("string body", "POST", CHAT, "hello", 400, None),
    ("no model", "POST", CHAT, {"messages": HELLO}, 400, "model"),
    ("no messages", "POST", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("messages not a list", "POST", CHAT, chat(messages="hi"), 400, "messages"),
    ("message without role", "POST", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages"),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    ("image part", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages"),
    ("content a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    ("unknown model", "POST", CHAT, chat(model="gpt-4"), 404, "model"),
    ("n zero", "POST", CHAT, chat(n=0), 400, "n"),
    ("n over max", "POST", CHAT, chat(n=9), 400, "n"),
    ("n negative", "POST", CHAT, chat(n=-1), 400, "n"),
    ("n a word", "POST", CHAT, chat(n="two"), 400, "n"),
    ("temperature negative", "POST", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature 3", "POST", CHAT, chat(temperature=3), 400, "temperature"),
    ("temperature NaN", "POST", CHAT, (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], '
     b'"temperature": NaN}'), 400, "temperature"),
    ("temperature Infinity", "POST", CHAT, (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}],'
     b' "temperature": Infinity}'), 400, "temperature"),
    ("temperature a word", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_p over 1", "POST", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top_p NaN", "POST", CHAT, (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], '
     b'"top_p": NaN}'), 400, "top_p"),
    ("top_k below -1", "POST", CHAT, chat(top_k=-2), 400, "top_k"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "POST", CHAT, chat(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens fractional", "POST", CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    ("max_completion_tokens zero", "POST", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("presence_penalty 3", "POST", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty -2.5", "POST", CHAT, chat(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("repetition_penalty zero", "POST", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("min_p 2", "POST", CHAT, chat(min_p=2), 400, "min_p"),
    ("min_tokens negative", "POST", CHAT, chat(min_tokens=-1), 400, "min_tokens"),
    ("min_tokens over max_tokens", "POST", CHAT, chat(min_tokens=10), 400, "min_tokens"),
    ("logit_bias word key", "POST", CHAT, chat(logit_bias={"hello": 1}), 400, "logit_bias"),
    ("logit_bias 101", "POST", CHAT, chat(logit_bias={"5": 101}), 400, "logit_bias"),
    ("logit_bias past the vocabulary", "POST", CHAT, chat(logit_bias={"10000000": 1}), 400, None),
    ("logit_bias NaN", "POST", CHAT, (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], '
     b'"logit_bias": {"5": NaN}}'), 400, "logit_bias"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs 50", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("logprobs a list", "POST", CHAT, chat(logprobs=[1]), 400, "logprobs"),
    ("stop a number", "POST", CHAT, chat(stop=5), 400, "stop"),
    ("stop numbers", "POST", CHAT, chat(stop=[1, 2]), 400, "stop"),
    ("seed a word", "POST", CHAT, chat(seed="abc"), 400, "seed"),
    ("seed past 64 bits", "POST", CHAT, chat(seed=2**70), 400, "seed"),
    ("stop strings by the thousand", "POST", CHAT, chat(stop=["x"] * 5000), 400, "stop"),
    ("stream a word", "POST", CHAT, chat(stream="maybe"), 400, "stream"),
    ("tool without name", "POST", CHAT, chat(tools=[{"type": "function", "function": {"description": "x"}}]), 400,
     "tools"),
    ("tool type retrieval", "POST", CHAT, chat(tools=[{"type": "retrieval"}]), 400, "tools"),
    ("tool name with spaces", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b"}}]), 400,
     "tools"),
    ("tool_choice unknown tool", "POST", CHAT, chat(tools=[TOOL], tool_choice={"type": "function", "function":
                                                                             {"name": "nope"}}), 400, "tool_choice"),
    ("tool_choice a word", "POST", CHAT, chat(tools=[TOOL], tool_choice="sometimes"), 400, "tool_choice"),
    ("tool_choice without tools", "POST", CHAT, chat(tool_choice={"type": "function", "function": {"name": "x"}}),
     400, "tool_choice"),
    ("response_format xml", "POST", CHAT, chat(response_format={"type": "xml"}), 400, "response_format"),
    ("json_schema without schema", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {}}),
     400, "response_format"),
    ("lone surrogate in content", "POST", CHAT, (b'{"model": "tiny-test", "messages": [{"role": "user", '
     b'"content": "a\\ud800b"}]}'), 400, "messages.0.content"),
    ("lone surrogate in a tool", "POST", CHAT, (b'{"model": "tiny-test", "messages": [{"role": "user", '
     b'"content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "description": "\\udc00"}}]}'),
     400, "tools.0.function.description"),
    ("best_of", "POST", CHAT, chat(best_of=2), 400, "best_of"),
    ("beam search", "POST", CHAT, chat(use_beam_search=True), 400, "use_beam_search"),
    ("prompt_logprobs", "POST", CHAT, chat(prompt_logprobs=1), 400, "prompt_logprobs"),
    ("prefix on a user message", "POST", CHAT, chat(messages=[{"role": "user", "content": "hi", "prefix": True}]),
     400, "messages"),
    ("continue without an assistant message", "POST", CHAT, chat(continue_final_message=True), 400, "messages"),
    ("no generation prompt", "POST", CHAT, chat(add_generation_prompt=False), 400, "add_generation_prompt"),
    ("prompt past the context", "POST", CHAT, chat(messages=[{"role": "user", "content": "def f(x): x\n" * 600}]),
     400, "messages"),
    ("tool result without a call", "POST", CHAT, chat(messages=[*HELLO, {"role": "tool", "content": "1"}]), 400,
     None),
    ("empty developer message", "POST", CHAT, chat(messages=[{"role": "developer", "content": ""}]), 400, None),
    ("chat_template_kwargs a list", "POST", CHAT, chat(chat_template_kwargs=[1]), 400, "chat_template_kwargs"),
    ("tool call arguments not JSON", "POST", CHAT, chat(messages=[*HELLO, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"}]), 400, None),
    ("no prompt", "POST", TEXT, {"model": MODEL}, 400, "prompt"),
    ("two prompts", "POST", TEXT, text(prompt=["a", "b"]), 400, "prompt"),
    ("token id past the vocabulary", "POST", TEXT, text(prompt=[10**6]), 400, None),
    ("negative token id", "POST", TEXT, text(prompt=[-3]), 400, None),
    ("empty prompt", "POST", TEXT, text(prompt=""), 400, None),
    ("empty token list", "POST", TEXT, text(prompt=[]), 400, None),
    ("prompt a dict", "POST", TEXT, text(prompt={"a": 1}), 400, "prompt"),
    ("echo", "POST", TEXT, text(echo=True), 400, "echo"),
    ("suffix", "POST", TEXT, text(suffix="}"), 400, "suffix"),
    ("completion logprobs 21", "POST", TEXT, text(logprobs=21), 400, "logprobs"),
    ("completion prompt surrogate", "POST", TEXT, b'{"model": "tiny-test", "prompt": "\\udfff"}', 400, "prompt"),
    ("tokenize neither", "POST", "/tokenize", {"model": MODEL}, 400, "prompt"),
    ("tokenize unknown model", "POST", "/tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("detokenize past the vocabulary", "POST", "/detokenize", {"tokens": [10**7]}, 400, "tokens"),
    ("detokenize not a list", "POST", "/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("unknown model card", "GET", "/v1/models/gpt-4", None, 404, "model"),
    ("unknown path", "GET", "/v1/nothing", None, 404, None),
    ("wrong method", "GET", CHAT, None, 405, None),
    ("server tools off", "POST", "/v1/agent/tools/python", {"conversation": "a"}, 404, None),
]


def test_the_battery_has_over_60_distinct_kinds():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, method, path, body, status, param", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_a_4xx_in_openai_shape(real, name, method, path, body, status, param):
    if body is None:
        r = httpx.request(method, real.url + path)
    elif isinstance(body, bytes):
        r = httpx.request(method, real.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.request(method, real.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], err
    if param:
        assert param in (err["param"] or ""), err
    assert httpx.get(real.url + "/health").json() == {"status": "ok"}


def test_after_the_battery_the_server_serves_and_leaks_nothing(real):
    r = real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert r.choices[0].message.role == "assistant"
    m = real.wait_idle()
    assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"] and not real.engine.seqs
