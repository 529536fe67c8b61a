"""Per-request isolation at the HTTP edge: hostile sampling parameters are refused (400 naming
the field) or sanitised at admission, and never change another client's answer. The oracle: each
prompt's answer when it is asked alone."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from scripted import MODEL, Server, engine_args, tiny_v32_dir

from dsv32.server import load_engine

HELLO = [{"role": "user", "content": "def decode(self, s):"}]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    engine, tok = load_engine(engine_args(tiny_v32_dir(tmp_path_factory.mktemp("tiny-isolation"))))
    server = Server(engine, tok)
    yield server
    server.stop()


def test_a_hostile_request_among_31_normal_ones_changes_none_of_them(real):
    prompts = [[{"role": "user", "content": f"class Decoder{i}:"}] for i in range(4)]

    def ask(messages, temperature=0):
        r = real.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=temperature)
        return r.choices[0].message.content, r.choices[0].finish_reason

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(32) as pool:  # request 13 asks for temperature 1e-40: greedy, not a nan softmax
        answers = list(pool.map(ask, [prompts[i % 4] for i in range(32)], [1e-40 if i == 13 else 0 for i in range(32)]))
    assert answers == [solo[i % 4] for i in range(32)]
    m = real.wait_idle()
    assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"]


@pytest.mark.parametrize("body, param", [
    (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
    (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}', "temperature"),
    (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
    ((b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
      b'"function": {"name": "f", "description": "\\udfff"}}]}'), "tools.0.function.description"),
    (b'{"model": "tiny-test", "prompt": "\\ud800x"}', "prompt"),
])
def test_non_finite_numbers_and_lone_surrogates_are_400s_naming_the_field(real, body, param):
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    r = httpx.post(real.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert param in r.json()["error"]["param"], r.json()
    assert httpx.get(real.url + "/health").json() == {"status": "ok"}
