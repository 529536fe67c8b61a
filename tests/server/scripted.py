"""What the server tests share: tiny V3.2 and ChatML checkpoints, the scripted engine, and uvicorn
in a background thread. Imported by test_server.py, test_server_chatml.py and test_web.py."""

import argparse
import dataclasses
import json
import socket
import textwrap
import threading
import time

import httpx
import openai
import torch
import uvicorn
from tiny_tokenizers import chatml_bpe

from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig
from dsv32.engine.runner import ModelRunner
from dsv32.model import Transformer
from dsv32.llama.model import LlamaConfig, LlamaDSA
from dsv32.loader import load, save
from dsv32.server.app import create_app
from dsv32.tokenizer import train_tokenizer

MODEL = "tiny-test"


class ScriptedRunner(ModelRunner):
    """The real runner, except that it samples the next token of `script` (then EOS), with log-prob 0.
    `fail` makes the next step raise, as a crashing model would; `delay` slows every token down."""

    script: list[int] = []
    fail = False
    delay = 0.0

    def sample(self, logits, seqs, masks=None):
        out = []
        for seq, s in zip(seqs, super().sample(logits, seqs, masks)):
            time.sleep(self.delay)
            if self.fail:
                self.fail = False
                raise RuntimeError("scripted failure")
            n = len(seq.output_tokens)
            token = self.script[n] if n < len(self.script) else self.model.cfg.eos_token_id
            out.append(dataclasses.replace(s, token=token, logprob=0.0))
        return out


def tiny_v32_dir(path, **changes):
    """A random tiny V3.2 checkpoint (DSA with index_topk=16; `changes` to its config) with a BPE
    tokenizer trained here."""
    torch.manual_seed(0)
    tok = train_tokenizer([json.decoder.__file__, textwrap.__file__], 512, path)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                                 **changes)
    save(Transformer(cfg), path)
    return path


def tiny_chatml_dir(path, max_position_embeddings=512):
    """A random small LlamaDSA saved as a `llama_dsa` directory with a ChatML tokenizer; its EOS is
    `<|endoftext|>`, so a reply ended by `<|im_end|>` shows the server stops on the format's end token."""
    tok = chatml_bpe()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_position_embeddings,
                      index_n_heads=2, index_head_dim=32, index_topk=16, bos_token_id=1, eos_token_id=0)
    save(LlamaDSA(cfg), path, tok)
    return path


def engine_args(model_dir, **kw):
    return argparse.Namespace(**{"model": model_dir, "dtype": "auto", "device": "cpu", "kv_cache_dtype": "auto",
                                 "max_num_seqs": 32, "max_model_len": None, "num_blocks": None, "speculative_tokens": 0,
                                 **kw})


def scripted_engine(model_dir, **config) -> tuple[Engine, object]:
    """(an engine whose runner is a ScriptedRunner, the directory's tokenizer)."""
    model, tok = load(model_dir, dtype="float32", device="cpu")
    return Engine(model, EngineConfig(**config), runner_class=ScriptedRunner), tok


class Server:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, engine, tokenizer, max_queue=64, agent_tools=None, config=None):
        self.engine, self.tok = engine, tokenizer
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, MODEL, max_queue, agent_tools, config),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line.startswith("dsv32_"))}

    def wait_idle(self, timeout=10.0) -> dict[str, float]:
        """Metrics once nothing runs or waits and every cache block is free (or the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["dsv32_requests_running"] == m["dsv32_requests_waiting"] == 0
            if (idle and m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"]) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


def script(server, text: str) -> None:
    server.engine.runner.script = server.tok.encode(text)
