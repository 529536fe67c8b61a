"""The HTTP server, driven by the real `openai` client (and httpx for malformed requests) against
uvicorn on a loopback port.

Two servers run: one with the real (random) tiny model, and one whose engine is the real engine
with the sampled token replaced by a script (a ScriptedRunner, in scripted.py), so that tool calls and reasoning are
produced on purpose; everything after the sample (scheduler, detokenizer, parser, SSE)
is the code under test.
"""

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from scripted import MODEL, Server, script, scripted_engine

from dsv32.chat import EOS, encode_completion
from dsv32.engine import SamplingParams
from dsv32.server.terminal import stream_reply

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
HELLO = [{"role": "user", "content": "def decode(self, s):"}]


@pytest.fixture(scope="module")
def scripted(model_dir):
    engine, tok = scripted_engine(model_dir, max_num_seqs=1)
    server = Server(engine, tok, max_queue=1)
    yield server
    server.stop()


def stream_chat(client, **kw):
    """(reasoning, content, tool calls {index: {...}}, finish_reason, usage) of a streamed chat."""
    reasoning = content = ""
    calls, finish, usage = {}, None, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:  # the first delta of a call names it
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return reasoning, content, calls, finish, usage


# ---- the real model ----
def test_models_health_metrics(real):
    assert [m.id for m in real.client.models.list().data] == [MODEL]
    [card] = httpx.get(real.url + "/v1/models").json()["data"]  # vLLM-style extras the web page reads
    assert card["max_model_len"] == real.engine.runner.model.cfg.max_position_embeddings == 1024
    assert card["index_topk"] == real.engine.runner.model.cfg.index_topk == 16
    assert (card["chat_format"], card["supports_thinking"], card["supports_tools"]) == ("v32", True, True)
    assert httpx.get(real.url + "/health").json() == {"status": "ok"}
    m = real.metrics()
    for name in ("requests_total", "requests_running", "requests_waiting", "generation_tokens_total",
                 "preemptions_total", "cache_blocks_free", "cache_blocks_total"):
        assert f"dsv32_{name}" in m
    assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"] > 0


def test_the_web_page_is_served_and_names_no_other_host(real):
    page = httpx.get(real.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in (("chat.js", "javascript"), ("chat.css", "text/css")):
        assert f'"static/{name}"' in page.text
        r = httpx.get(f"{real.url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text  # it works offline: no CDN, no fonts
    assert "http://" not in page.text and "https://" not in page.text
    assert httpx.get(real.url + "/static/nothing.js").status_code == 404


def test_chat_stream_equals_non_stream(real):
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 7, "top_p": 0.9, "extra_body": {"top_k": 50}}):
        r = real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, **kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason in ("stop", "length") and msg.role == "assistant"
        assert getattr(msg, "reasoning_content", None) is None  # chat mode by default
        assert r.usage.completion_tokens <= 24
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        _, content, calls, finish, usage = stream_chat(real.client, messages=HELLO, max_tokens=24,
                                                       stream_options={"include_usage": True}, **kw)
        assert content == msg.content and finish == r.choices[0].finish_reason and not calls
        assert usage.completion_tokens == r.usage.completion_tokens


def test_completions_string_and_tokens(real):
    prompt = "import json\ndef "
    r = real.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert len(choice.logprobs.token_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    ids = real.tok.encode(prompt)
    by_ids = real.client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
    streamed = "".join(c.choices[0].text for c in real.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True) if c.choices)
    assert by_ids.choices[0].text == streamed == choice.text
    assert r.usage.prompt_tokens == len(ids)


def test_chat_logprobs(real):
    r = real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)  # greedy: the top one


def test_32_concurrent_clients_match_solo_greedy(real):
    prompts = [[{"role": "user", "content": f"class Decoder{i}:"}] for i in range(4)]

    def ask(messages, stream=False):
        kw = dict(messages=messages, max_tokens=12, temperature=0)
        if stream:
            _, content, _, finish, usage = stream_chat(real.client, stream_options={"include_usage": True}, **kw)
            return content, finish, usage.completion_tokens
        r = real.client.chat.completions.create(model=MODEL, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(32) as pool:  # half of the clients stream
        answers = list(pool.map(ask, [prompts[i % 4] for i in range(32)], [i % 2 == 1 for i in range(32)]))
    assert answers == [solo[i % 4] for i in range(32)]
    m = real.wait_idle()
    assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"]


def test_malformed_requests_get_openai_errors(real):
    url = real.url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
    cases = [
        (b"{not json", 400, None),
        ({"model": MODEL}, 400, "messages"),
        ({**ok, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, None),
        ({**ok, "n": 9}, 400, "n"),
        ({**ok, "temperature": 5}, 400, "temperature"),
        ({**ok, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
        ({**ok, "messages": [{"role": "user", "content": "def f(x): return x\n" * 400}]}, 400, None),
        ({**ok, "tools": [{"type": "function", "function": {"description": "no name"}}]}, 400, None),
        ({**ok, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
        ({**ok, "model": "gpt-4"}, 404, "model"),
        ([1, 2, 3], 400, None),
    ]
    for body, status, param in cases:
        r = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if param:
            assert param in (err["param"] or ""), err
    long = httpx.post(url, json=cases[7][0]).json()["error"]
    assert long["code"] == "context_length_exceeded"
    bad_ids = httpx.post(real.url + "/v1/completions", json={"model": MODEL, "prompt": [10**6]})
    assert bad_ids.status_code == 400
    assert httpx.get(real.url + "/v1/nothing").json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        real.client.chat.completions.create(model=MODEL, messages=HELLO, n=9)  # beyond --max-n
    # the server is still fine, and nothing leaked
    assert real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4).choices[0].message
    m = real.wait_idle()
    assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"]
    assert not real.engine.seqs


# ---- the scripted engine ----
def test_tool_call_streams_exact_arguments(scripted):
    completion = encode_completion({"content": "Let me check.", "tool_calls": [CALL]}, "chat")
    script(scripted, completion)
    kw = dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, max_tokens=200)
    r = scripted.client.chat.completions.create(model=MODEL, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    _, content, calls, finish, _ = stream_chat(scripted.client, **kw)
    assert finish == "tool_calls" and content == "Let me check."
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]


def test_reasoning_content_in_thinking_mode(scripted):
    script(scripted, "The user greets me.</think>Hello! How can I help?" + EOS)
    for switch in ({"extra_body": {"chat_template_kwargs": {"thinking": True}}},
                   {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}},
                   {"extra_body": {"thinking": {"type": "enabled"}}}):
        r = scripted.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100, **switch)
        msg = r.choices[0].message
        assert (msg.reasoning_content, msg.content) == ("The user greets me.", "Hello! How can I help?")
        reasoning, content, _, finish, _ = stream_chat(scripted.client, messages=HELLO, max_tokens=100, **switch)
        assert (reasoning, content, finish) == (msg.reasoning_content, msg.content, "stop")


def test_reasoning_sent_back_is_kept_until_the_next_user_turn(scripted):
    script(scripted, "It is sunny.</think>Sunny in Paris." + EOS)
    think = {"chat_template_kwargs": {"thinking": True}}
    turn = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "call_1", "function": {
                **CALL["function"], "arguments": json.dumps(CALL["function"]["arguments"])}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]

    def prompt_tokens(messages):
        r = scripted.client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS[:1], max_tokens=50,
                                                    extra_body=think)
        assert r.choices[0].message.content == "Sunny in Paris."
        return r.usage.prompt_tokens

    with_reasoning = [turn[0], {**turn[1], "reasoning_content": "I should call the weather tool."}, turn[2]]
    assert prompt_tokens(with_reasoning) > prompt_tokens(turn)  # rendered within the turn
    after = [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    assert prompt_tokens(with_reasoning + after) == prompt_tokens(turn + after)  # dropped after a user turn


def test_tool_choice_response_format_developer(scripted):
    script(scripted, "{}" + EOS)  # JSON for the response formats (a forced call gets a scripted call below)

    def prompt_tokens(**kw):
        kw.setdefault("messages", HELLO)
        return scripted.client.chat.completions.create(model=MODEL, max_tokens=40, **kw).usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == plain
    both = prompt_tokens(tools=TOOLS, tool_choice="auto")
    script(scripted, encode_completion({"tool_calls": [{"type": "function", "function": {
        "name": "get_time", "arguments": {}}}]}, "chat"))
    forced = prompt_tokens(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert plain < forced < both
    script(scripted, "{}" + EOS)
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert prompt_tokens(response_format=schema) > plain
    assert prompt_tokens(response_format={"type": "json_object"}) > plain
    assert prompt_tokens(messages=[{"role": "developer", "content": "hi"}]) > 0


def test_utf8_and_stop_strings_stream_cleanly(scripted):
    script(scripted, "héllo wörld 世界 🎉 and more STOP never shown" + EOS)
    r = scripted.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100, stop=["STOP"])
    assert r.choices[0].message.content == "héllo wörld 世界 🎉 and more "
    assert r.choices[0].finish_reason == "stop"
    # the reply ends at the token that completes the stop string, and the engine drops the request
    assert r.usage.completion_tokens == len(scripted.tok.encode("héllo wörld 世界 🎉 and more STOP"))
    m = scripted.wait_idle()
    assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"] and not scripted.engine.seqs
    chunks = [c.choices[0].delta.content or "" for c in scripted.client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=100, stop=["STOP"], stream=True) if c.choices]
    assert "".join(chunks) == r.choices[0].message.content and not any("\ufffd" in c for c in chunks)


def test_disconnect_overload_and_engine_failure(scripted):
    script(scripted, "word " * 400)
    scripted.engine.runner.delay = 0.01  # 800 tokens would take 8 s
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 800, "stream": True}
    url = scripted.url + "/v1/chat/completions"
    before = scripted.metrics()["dsv32_generation_tokens_total"]
    pool = ThreadPoolExecutor(1)
    with httpx.stream("POST", url, json=body, timeout=30) as first:
        lines = first.iter_lines()  # (dropping this iterator would close the connection)
        assert next(lines).startswith("data: ")  # it runs: max_num_seqs=1
        second = pool.submit(httpx.post, url, json={**body, "stream": False, "max_tokens": 5}, timeout=30)
        deadline = time.monotonic() + 10
        while scripted.metrics()["dsv32_requests_waiting"] < 1:  # it waits: max_queue=1
            assert time.monotonic() < deadline
            time.sleep(0.02)
        third = httpx.post(url, json={**body, "stream": False})
        assert third.status_code == 503 and third.json()["error"]["code"] == "overloaded"
    # the first client hung up mid-stream: its request is aborted, and the second gets its turn
    assert second.result().json()["choices"][0]["finish_reason"] == "length"
    pool.shutdown()
    m = scripted.wait_idle()
    assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"]
    assert m["dsv32_generation_tokens_total"] - before < 400  # far from the 800 the first asked for
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is noticed too
        httpx.post(url, json={**body, "stream": False}, timeout=1.0)
    m = scripted.wait_idle()
    assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"]
    assert m["dsv32_generation_tokens_total"] - before < 600
    scripted.engine.runner.delay = 0.0
    assert not scripted.engine.seqs
    scripted.engine.runner.fail = True
    r = httpx.post(url, json={**body, "stream": False, "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    script(scripted, "fine" + EOS)
    assert scripted.client.chat.completions.create(model=MODEL, messages=HELLO).choices[0].message.content == "fine"
    assert scripted.wait_idle()["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"]


# ---- pieces ----
def test_terminal_reply_streams_reasoning_and_tool_calls(model_dir):
    engine, tok = scripted_engine(model_dir, num_blocks=32)
    engine.runner.script = tok.encode(encode_completion({"reasoning_content": "Hmm.", "content": "Sure.",
                                                  "tool_calls": [CALL]}, "thinking"))
    out = io.StringIO()
    msg = stream_reply(engine, tok, tok.apply_chat_template(HELLO), SamplingParams(max_tokens=200), "thinking", out)
    assert (msg["reasoning_content"], msg["content"]) == ("Hmm.", "Sure.")
    text = out.getvalue()
    assert "\033[2mHmm." in text and "Sure." in text and "[tool call] get_weather(" in text
    assert engine.scheduler.blocks.num_free == 32


# ---- the command-line entry points, as the CLI will call them ----
@contextlib.contextmanager
def served(argv_for_port, timeout: float):
    """Run `argv_for_port(port)` on a free port until /health answers; yield the openai client."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(argv_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_entry_point(model_dir):
    def argv(port):
        code = f"from dsv32.server import serve; serve(['--model', {str(model_dir)!r}, '--port', '{port}', '--device', 'cpu'])"
        return [sys.executable, "-c", code]

    with served(argv, timeout=60) as client:
        assert [m.id for m in client.models.list().data] == [str(model_dir)]  # --model as given
        r = client.chat.completions.create(model=str(model_dir), messages=HELLO, max_tokens=4)
        assert r.usage.completion_tokens >= 1


def test_chat_entry_point(model_dir):
    code = f"from dsv32.server import chat; chat(['--model', {str(model_dir)!r}, '--device', 'cpu', '--max-tokens', '8', '--temperature', '0'])"
    out = subprocess.run([sys.executable, "-c", code], input="hello\n/reset\nagain\n/exit\n", text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("> ") == 4 and "chat mode" in out.stdout
