"""The endpoints and options beyond the completions: /v1/models/{id}, /tokenize, /detokenize,
/version, the API key, CORS, Retry-After on a 503, the request-size limit, the latency
histograms. Oracles: the tokenizer itself, the `openai` client, the HTTP specs' headers."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from scripted import MODEL, Server, script, scripted_engine, tiny_v32_dir

import dsv32
from dsv32.server.config import ServerConfig

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "def decode(self, s):"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine, tok = scripted_engine(tiny_v32_dir(tmp_path_factory.mktemp("tiny-endpoints")), max_num_seqs=1)
    config = ServerConfig(max_queue=0, api_key=KEY, allowed_origins=("https://app.example",),
                          max_request_bytes=64 << 10)
    s = Server(engine, tok, config=config)
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield s
    s.stop()


def test_models_retrieve_and_version(server):
    assert server.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")
    assert httpx.get(server.url + "/version").json() == {"version": dsv32.__version__}


def test_tokenize_and_detokenize_agree_with_the_tokenizer(server):
    tok = server.tok
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "import json"}, headers=AUTH).json()
    assert r["tokens"] == tok.encode("import json") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.engine.max_model_len
    chat = httpx.post(server.url + "/tokenize", json={"messages": HELLO}, headers=AUTH).json()
    assert chat["tokens"] == tok.apply_chat_template(HELLO, thinking_mode="chat")
    script(server, "ok<｜end▁of▁sentence｜>")
    usage = server.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4).usage
    assert chat["count"] == usage.prompt_tokens  # the prompt the completion endpoint renders
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": "import json"}
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**7]}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(server.url + "/tokenize", json={"prompt": "a", "messages": HELLO}, headers=AUTH)
    assert both.status_code == 400


def test_the_api_key_guards_the_api_but_not_health(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(server.url + "/tokenize", json={"prompt": "a"}, headers=headers).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200 and httpx.get(server.url + "/metrics").status_code == 200


def test_cors_answers_preflights_for_allowed_origins_only(server):
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(server.url + "/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={**AUTH, "Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_bodies_over_the_limit_are_413(server):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it comes
        yield b'{"model": "tiny-test", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_503_carries_retry_after_and_latency_histograms_fill(server):
    script(server, "word " * 300)
    server.engine.runner.delay = 0.01
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 300, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # it runs: max_num_seqs=1, max_queue=0
            r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, headers=AUTH)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
    finally:
        server.engine.runner.delay = 0.0
    server.wait_idle()
    script(server, "ok<｜end▁of▁sentence｜>")
    with ThreadPoolExecutor(1) as pool:
        pool.submit(server.client.chat.completions.create, model=MODEL, messages=HELLO).result()
    time.sleep(0.1)
    m = server.metrics()
    assert m['dsv32_request_latency_seconds_count{endpoint="/v1/chat/completions"}'] >= 2
    assert m["dsv32_time_to_first_token_seconds_count"] >= 2
