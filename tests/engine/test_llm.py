"""The offline API on a saved model directory with its own tokenizer.json."""

from pathlib import Path

import pytest
import torch

from dsv32 import chat, save_model
from dsv32.config import preset
from dsv32.engine import LLM, EngineConfig, SamplingParams
from dsv32.model import Transformer
from dsv32.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = train_tokenizer([Path(chat.__file__).parent / "parse.py"], 400, d)
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_model(Transformer(cfg), d)
    return d


def test_llm_generates_from_strings_ids_and_conversations(model_dir):
    llm = LLM(str(model_dir), dtype=torch.float32, device="cpu", config=EngineConfig(num_blocks=64))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    text_out = llm.generate("def parse(text):", params)[0]
    ids = llm.tokenizer.encode("def parse(text):")
    assert text_out.prompt_token_ids == ids
    assert llm.generate(ids, params)[0].token_ids == text_out.token_ids
    assert text_out.text == llm.tokenizer.decode(text_out.token_ids)
    conv = [{"role": "user", "content": "hi"}]
    out = llm.generate([conv, conv], params)
    want = llm.tokenizer.apply_chat_template(conv, thinking_mode="chat")
    assert out[0].prompt_token_ids == want and out[0].token_ids == out[1].token_ids


def test_llm_stop_strings_cut_the_text(model_dir):
    """The text ends before the stop string, and the request at the token that completes it: the
    first k greedy tokens, k the fewest whose text holds the stop string."""
    llm = LLM(str(model_dir), dtype=torch.float32, device="cpu", config=EngineConfig(num_blocks=64))
    free = llm.generate("x = ", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    stop = free.text[3:5]
    if not stop.strip():
        pytest.skip("greedy text has no usable stop string")
    out = llm.generate("x = ", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:free.text.find(stop)]
    k = next(k for k in range(1, 13) if stop in llm.tokenizer.decode(free.token_ids[:k]))
    assert k < 12 and out.token_ids == free.token_ids[:k]
    assert not llm.engine.has_work() and not llm.engine.seqs


def test_llm_rejects_text_without_tokenizer(tmp_path):
    torch.manual_seed(0)
    save_model(Transformer(preset("tiny")), tmp_path)
    llm = LLM(str(tmp_path), dtype=torch.float32, device="cpu", config=EngineConfig(num_blocks=8))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello")
    assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3
