"""Serving a converted Llama-family model that speaks ChatML (SmolLM2's format), with the real
`openai` client: a small random LlamaDSA saved as a `llama_dsa` directory with a ChatML tokenizer,
run by the real engine (and by the scripted one of scripted.py, to produce chosen replies).

Its config's EOS is `<|endoftext|>`, so a reply ended by `<|im_end|>` shows that the server stops
on the format's own end token. The last test serves the real default model, SmolLM2-DSA.
"""

import io
import sys

import httpx
import openai
import pytest
from scripted import ScriptedRunner, Server, engine_args, script, tiny_chatml_dir
from test_server import served, stream_chat
from tokenizers import Tokenizer as HFTokenizer

from dsv32.engine import SamplingParams
from dsv32.llama.chatml import encode_chatml
from dsv32.server import load_engine
from dsv32.server.terminal import stream_reply

MODEL = "tiny-test"
HELLO = [{"role": "user", "content": "def decode(self, s):"}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return tiny_chatml_dir(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def model_dir(chatml_dir):
    """conftest's `real` serves this module's ChatML model."""
    return chatml_dir


@pytest.fixture(scope="module")
def scripted(chatml_dir):
    engine, tok = load_engine(engine_args(chatml_dir, max_num_seqs=1))
    engine.runner.__class__ = ScriptedRunner  # the same engine, the model's choice replaced by a script
    server = Server(engine, tok)
    yield server
    server.stop()


def test_a_converted_dir_loads_with_its_chatml_tokenizer(real, chatml_dir):
    assert type(real.engine.runner.model).__name__ == "LlamaDSA" and real.tok.chat_format == "chatml"
    [card] = httpx.get(real.url + "/v1/models").json()["data"]
    assert (card["chat_format"], card["supports_thinking"], card["supports_tools"]) == ("chatml", False, True)
    assert (card["max_model_len"], card["index_topk"]) == (512, 16)
    r = real.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    hf = HFTokenizer.from_file(str(chatml_dir / "tokenizer.json"))
    assert r.usage.prompt_tokens == len(hf.encode(encode_chatml(HELLO), add_special_tokens=False).ids)
    _, content, calls, finish, _ = stream_chat(real.client, messages=HELLO, max_tokens=12, temperature=0)
    assert (content, finish) == (r.choices[0].message.content, r.choices[0].finish_reason) and not calls


def test_im_end_ends_the_reply(scripted):
    script(scripted, "Hello there!<|im_end|>never shown")
    r = scripted.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=50)
    assert r.choices[0].message.content == "Hello there!" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(scripted.tok.encode("Hello there!<|im_end|>"))
    script(scripted, "Hi, ü<|im_end|>")
    _, content, _, finish, _ = stream_chat(scripted.client, messages=HELLO, max_tokens=50)
    assert (content, finish) == ("Hi, ü", "stop")


def test_thinking_is_a_clear_400(scripted):
    url = scripted.url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
    for body in ({**ok, "chat_template_kwargs": {"thinking": True}}, {**ok, "thinking": {"type": "enabled"}}):
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert "no thinking mode" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no thinking mode"):
        scripted.client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"thinking": True})
    script(scripted, "still fine<|im_end|>")
    r = scripted.client.chat.completions.create(model=MODEL, messages=HELLO)
    assert r.choices[0].message.content == "still fine"


def test_tool_calls_in_smollm2s_form(scripted):
    turn = HELLO + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    script(scripted, 'Checking.<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call><|im_end|>')
    r = scripted.client.chat.completions.create(model=MODEL, messages=turn, tools=WEATHER, max_tokens=80)
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    assert r.choices[0].message.content == "Checking." and r.choices[0].finish_reason == "tool_calls"
    _, content, calls, finish, _ = stream_chat(scripted.client, messages=turn, tools=WEATHER, max_tokens=80)
    assert (content, finish) == ("Checking.", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", '{"city": "Paris"}')]


def test_terminal_reply_in_chatml(chatml_dir):
    engine, tok = load_engine(engine_args(chatml_dir, num_blocks=16))
    engine.runner.__class__ = ScriptedRunner
    engine.runner.script = tok.encode("Sure.<|im_end|>")
    out = io.StringIO()
    msg = stream_reply(engine, tok, tok.apply_chat_template(HELLO),
                       SamplingParams(max_tokens=50, stop_token_ids=list(tok.stop_ids)), "chat", out)
    assert msg["content"] == "Sure." and "Sure." in out.getvalue() and "<|im_end|>" not in out.getvalue()
    assert engine.scheduler.blocks.num_free == 16


def test_chat_entry_point_refuses_thinking_for_chatml(chatml_dir):
    from dsv32.cli import main

    assert main(["chat", "--model", str(chatml_dir), "--device", "cpu", "--thinking"]) == 2


@pytest.mark.slow
def test_serve_without_model_runs_smollm2_dsa():
    """`dsv32 serve` with no --model: the real SmolLM2-DSA answers the openai client."""
    pytest.importorskip("gguf")
    argv = lambda port: [sys.executable, "-m", "dsv32.cli", "serve", "--port", str(port), "--device", "cpu",
                         "--max-num-seqs", "2"]
    with served(argv, timeout=120) as client:
        [card] = client.models.list().data
        assert card.id == "SmolLM2-135M-Instruct-DSA"
        r = client.chat.completions.create(model=card.id, temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
