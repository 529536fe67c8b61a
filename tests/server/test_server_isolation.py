"""Per-request isolation at the HTTP edge: hostile sampling parameters are refused (400 naming
the field) or sanitised at admission, and never change another client's answer. The oracle: each
prompt's answer when it is asked alone."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from scripted import MODEL

HELLO = [{"role": "user", "content": "def decode(self, s):"}]


@pytest.mark.parametrize("hostile, answer", [
    ({"temperature": 1e-40}, "greedy"),                     # was a nan softmax failing every request in flight
    ({"temperature": 1.0, "top_p": 1e-45}, "greedy"),       # keeps only the top token
    ({"logit_bias": {"999999": 100}}, 400),                 # past the vocabulary: refused at admission
    ({"min_tokens": 10**6, "max_tokens": 10}, 400),
])
def test_a_hostile_request_among_31_normal_ones_changes_none_of_them(real, hostile, answer):
    prompts = [[{"role": "user", "content": f"class Decoder{i}:"}] for i in range(4)]

    def ask(messages, extra=None):
        kw = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0, **(extra or {})}
        r = httpx.post(real.url + "/v1/chat/completions", json=kw, timeout=60)
        if r.status_code != 200:
            return r.status_code
        return r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(32) as pool:  # request 13 is the hostile one
        answers = list(pool.map(ask, [prompts[i % 4] for i in range(32)], [hostile if i == 13 else None
                                                                           for i in range(32)]))
    assert answers[13] == (solo[13 % 4] if answer == "greedy" else answer)
    assert answers[:13] + answers[14:] == [solo[i % 4] for i in range(32) if i != 13]
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
