"""LLM: offline generation, `LLM(source).generate(prompts, SamplingParams(...))`.

The edge between text and the engine's token ids: it encodes the prompts, steps the engine until
every request is done, and decodes each request's tokens with a Detokenizer, which also ends a
request at its first stop string (the engine is aborted there; the output says "stop").
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from tqdm import tqdm

from dsv32.engine.config import EngineConfig
from dsv32.engine.engine import Engine, RequestOutput
from dsv32.engine.sampler import SamplingParams
from dsv32.tokenizer import Detokenizer


class LLM:
    """Prompts are strings, token-id lists, or chat conversations (lists of message dicts, encoded
    in the tokenizer's chat format: V3.2's, or ChatML for a converted SmolLM2)."""

    def __init__(self, model: str | nn.Module, config: EngineConfig | None = None,
                 dtype=torch.bfloat16, device: str | None = None, tokenizer=None):
        if isinstance(model, nn.Module):
            net = model
        else:  # a source for `dsv32.load`: a directory, a GGUF, a preset
            from dsv32.loader import load  # the composition root, a layer above the engine

            net, tok = load(model, dtype=dtype, device=device)
            tokenizer = tokenizer or tok
        self.tokenizer = tokenizer
        self.engine = Engine(net, config)

    def encode(self, prompt, thinking_mode: str = "chat") -> list[int]:
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (the model directory has no tokenizer.json)")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.apply_chat_template(prompt, thinking_mode=thinking_mode)

    def generate(self, prompts, params: SamplingParams | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        params = params or SamplingParams()
        ends = set(getattr(self.tokenizer, "stop_ids", ()))
        if ends - set(params.stop_token_ids):  # the model's own end of reply (ChatML: <|im_end|>) ends it
            params = replace(params, stop_token_ids=[*params.stop_token_ids, *sorted(ends - set(params.stop_token_ids))])
        ends |= {*params.stop_token_ids, self.engine.scheduler.eos_token_id}
        one = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                           and isinstance(prompts[0], (int, dict)))
        batch = [prompts] if one else list(prompts)
        seqs = [self.engine.add_request(self.encode(p), params) for p in batch]
        detoks = {s.request_id: Detokenizer(self.tokenizer, params.stop) for s in seqs} if self.tokenizer else {}
        texts = {rid: [] for rid in detoks}
        stopped = set()  # requests a stop string ended
        bar = tqdm(total=len(seqs), desc="generate", disable=not use_tqdm)
        while self.engine.has_work():
            for out in self.engine.step():
                rid, done = out.request_id, out.finish_reason is not None
                if rid in detoks:
                    ids = out.token_ids
                    if done and out.finish_reason == "stop" and ids and ids[-1] in ends:
                        ids = ids[:-1]  # the end-of-reply token is in token_ids, not in the text
                    texts[rid].append(detoks[rid].feed(ids, final=done))
                    if detoks[rid].stopped and rid not in stopped:
                        stopped.add(rid)
                        if not done:
                            self.engine.abort(rid)
                            done = True
                bar.update(done)
        bar.close()
        outs = []
        for s in seqs:
            out = self.engine.output(s)
            text = "".join(texts[s.request_id]) if s.request_id in texts else None
            outs.append(replace(out, text=text, finish_reason="stop" if s.request_id in stopped else out.finish_reason))
        return outs
