"""The OpenAI sampling surface on the real tiny model through the `openai` client: n choices,
logit_bias, penalties, min_p, min_tokens, ignore_eos, assistant prefill. Oracles: the n = 1
answer, a seeded rerun, hand computations of the OpenAI / vLLM definitions (tests/engine)."""

import httpx
from scripted import MODEL

HELLO = [{"role": "user", "content": "def decode(self, s):"}]


def contents(r):
    return [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]


def test_n_choices_greedy_equal_the_single_answer_and_usage_counts_the_prompt_once(real):
    one = real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    four = real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0, n=4)
    assert sorted(c.index for c in four.choices) == [0, 1, 2, 3]
    assert contents(four) == [one.choices[0].message.content] * 4
    assert four.usage.prompt_tokens == one.usage.prompt_tokens
    assert four.usage.completion_tokens == 4 * one.usage.completion_tokens
    assert four.usage.total_tokens == four.usage.prompt_tokens + four.usage.completion_tokens


def test_seeded_n_is_reproducible_and_streams_with_indices(real):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, seed=11, n=4)
    a, b = real.client.chat.completions.create(**kw), real.client.chat.completions.create(**kw)
    assert contents(a) == contents(b)
    assert len(set(contents(a))) > 1  # four seeds, not four copies of one draw
    first = real.client.chat.completions.create(**{**kw, "n": 1})
    assert first.choices[0].message.content == contents(a)[0]  # choice i is seeded seed + i
    streamed, finish = {}, {}
    for chunk in real.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
        if chunk.usage:
            assert chunk.usage.completion_tokens == a.usage.completion_tokens
    assert [streamed[i] for i in range(4)] == contents(a)
    assert [finish[i] for i in range(4)] == [c.finish_reason for c in sorted(a.choices, key=lambda c: c.index)]
    text = real.client.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=1.0, seed=3, n=3)
    again = real.client.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.text for c in text.choices] == [c.text for c in again.choices] and len(text.choices) == 3


def test_n_sequences_share_the_prompts_cache_blocks(real):
    messages = [{"role": "user", "content": "class Tokenizer:\n    def encode(self, text):\n" * 20}]
    before = real.metrics()
    r = real.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, n=4)
    after = real.wait_idle()
    block = real.engine.config.block_size
    full = (r.usage.prompt_tokens - 1) // block * block
    assert full >= block
    assert after["dsv32_prompt_tokens_total"] - before["dsv32_prompt_tokens_total"] == 4 * r.usage.prompt_tokens
    # the first choice computes the prompt; the other three find its full blocks in the prefix cache
    assert after["dsv32_prefix_cache_hit_tokens_total"] - before["dsv32_prefix_cache_hit_tokens_total"] == 3 * full
    assert after["dsv32_cache_blocks_free"] == after["dsv32_cache_blocks_total"]


def test_n_beyond_max_n_is_a_400(real):
    r = httpx.post(real.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "n": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(real.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def completion(real, **kw):
    kw = {"model": MODEL, "prompt": "import json\ndef ", "max_tokens": 8, "temperature": 0, **kw}
    r = httpx.post(real.url + "/v1/completions", json=kw, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_logit_bias_of_100_makes_that_token_the_only_output(real):
    t = real.tok.encode(" x")[-1]
    for endpoint in ("completions", "chat"):
        if endpoint == "completions":
            r = completion(real, temperature=1.0, logit_bias={str(t): 100}, logprobs=1)
            ids = [real.tok.encode(s)[-1] for s in r["choices"][0]["logprobs"]["tokens"]]
        else:
            r = real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0,
                                                    logit_bias={str(t): 100}, logprobs=True)
            ids = [real.tok.encode(e.token)[-1] for e in r.choices[0].logprobs.content]
        assert ids == [t] * 8


def test_min_tokens_and_ignore_eos_hold_back_a_forced_end(real):
    eos = str(real.tok.eos_id)
    forced = completion(real, logit_bias={eos: 100})
    assert forced["usage"]["completion_tokens"] == 1 and forced["choices"][0]["finish_reason"] == "stop"
    held = completion(real, logit_bias={eos: 100}, min_tokens=5)
    assert held["usage"]["completion_tokens"] == 6 and held["choices"][0]["finish_reason"] == "stop"
    ignored = completion(real, logit_bias={eos: 100}, ignore_eos=True, max_tokens=6)
    assert ignored["usage"]["completion_tokens"] == 6 and ignored["choices"][0]["finish_reason"] == "length"
    chat = real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0,
                                               logit_bias={eos: 100}, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"


def test_min_p_of_one_is_greedy_and_penalties_change_the_text(real):
    greedy = completion(real, max_tokens=12)["choices"][0]["text"]
    assert completion(real, max_tokens=12, temperature=1.0, min_p=1.0, seed=5)["choices"][0]["text"] == greedy
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 5.0}):
        # they act (their arithmetic is checked against the definitions in tests/engine/test_sampler_adjust.py)
        assert completion(real, max_tokens=12, **kw)["choices"][0]["text"] != greedy, kw


def test_assistant_prefill_continues_an_open_turn(real):
    prompt = real.tok.apply_chat_template(HELLO, thinking_mode="chat") + real.tok.encode("    return")
    want = completion(real, prompt=prompt, max_tokens=10)["choices"][0]["text"]
    for messages, extra in (([*HELLO, {"role": "assistant", "content": "    return", "prefix": True}], {}),
                            ([*HELLO, {"role": "assistant", "content": "    return"}], {"continue_final_message": True})):
        r = real.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                extra_body=extra)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == len(prompt)


def test_empty_stop_strings_stop_nothing_and_top_logprobs_needs_logprobs(real):
    assert completion(real, stop=[""])["choices"][0]["text"] == completion(real)["choices"][0]["text"]
    r = httpx.post(real.url + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
