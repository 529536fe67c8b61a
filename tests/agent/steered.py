"""A tiny random V3.2 model that writes a chosen script, for the agent tests that run the real engine.

A random model never writes a tool call, so the engine is steered through the model itself (rather
than by replacing what the engine samples, as tests/server/scripted.py's ScriptedRunner does, with
log-prob 0): a bias on the logits, a function of the position only. Where the script has a token,
+BIAS on it, so the model writes it with probability 1 - 1e-9; where the script leaves the model
free (None), -BIAS on every token but plain ASCII text without "<", so it writes random text of
its own that the chat parser still reads as reasoning. The engine (positions given) and the
trainer's replay (positions 0..S-1) see the same biased logits, so the log-probs the engine
records are the model's own and their replay is a real check.
"""

import json
import random
import textwrap
from pathlib import Path

import torch

from dsv32.chat import encode_messages
from dsv32.config import preset
from dsv32.loader import save
from dsv32.model import Transformer
from dsv32.rl.rollout import tool_suffix
from dsv32.tokenizer import train_tokenizer

BIAS = 30.0


def tiny_dir(path, tools: list[dict]):
    """A tiny random V3.2 checkpoint (fp32, 2048 positions) with a BPE tokenizer trained on two
    stdlib files and on conversations that call `tools` in the V3.2 format (so that a tool call
    takes a few tokens: on a shared CPU a decode step takes tens of milliseconds)."""
    rng = random.Random(0)
    calls = []
    for _ in range(60):
        tool = rng.choice(tools)["function"]
        args = {k: str(rng.randint(0, 99)) for k in tool["parameters"]["properties"]}
        calls.append({"type": "function", "function": {"name": tool["name"], "arguments": args}})
    convs = [encode_messages([{"role": "user", "content": "Use the tools."},
                              {"role": "assistant", "reasoning_content": "I call them.", "content": "",
                               "tool_calls": calls[i:i + 1 + i % 2]},
                              *[{"role": "tool", "content": str(i)}] * (1 + i % 2),
                              {"role": "assistant", "reasoning_content": "Done.", "content": f"The answer is {i}."}],
                             "thinking", tools=tools) for i in range(0, 60, 2)]
    corpus = Path(path) / "conversations.txt"
    corpus.write_text("\n".join(convs))
    tok = train_tokenizer([json.decoder.__file__, textwrap.__file__, corpus], 1024, path)
    corpus.unlink()
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                                 max_position_embeddings=2048)
    save(Transformer(cfg), path)
    return path


class Steered(Transformer):
    """Transformer + a per-position logit bias (see the module docstring); `steer` sets it."""

    def steer(self, tokenizer, script: dict[int, int | None]) -> None:
        """script: position -> the token to write there, or None to write freely."""
        vocab = self.cfg.vocab_size
        texts = [tokenizer.decode([i]) if i < tokenizer.vocab_size else "" for i in range(vocab)]
        banned = torch.tensor([not (t and t.isascii() and t.isprintable() and "<" not in t) for t in texts])
        bias = torch.zeros(self.cfg.max_position_embeddings, vocab)
        for pos, token in script.items():  # the logits at pos - 1 predict the token at pos
            if token is None:
                bias[pos - 1, banned] = -BIAS
            else:
                bias[pos - 1, token] = BIAS
        self.bias = bias

    def forward(self, input_ids, start_pos=0, cache=None, positions=None, mtp=False, **options):
        out = super().forward(input_ids, start_pos, cache, positions, mtp, **options)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + input_ids.shape[1]).expand_as(input_ids)
        out.logits = out.logits + self.bias.to(out.logits.device)[positions]
        return out


def steered(model, tokenizer) -> Steered:
    """The loaded model's weights in a Steered copy (no bias yet)."""
    s = Steered(model.cfg)
    s.load_state_dict(model.state_dict())
    s.steer(tokenizer, {})
    return s.eval()


def layout(tokenizer, prompt: list[int], turns: list[tuple[int, str, list[str]]], thinking_mode="thinking"):
    """The script of an episode: each turn is (free tokens, then the scripted text, then the tool
    results the environment appends, [] for the last turn). Returns position -> token or None."""
    script, pos = {}, len(prompt)
    for free, text, results in turns:
        for _ in range(free):
            script[pos], pos = None, pos + 1
        for token in tokenizer.encode(text):
            script[pos], pos = token, pos + 1
        if results:
            calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}] * len(results)
            assistant = {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": calls}
            pos += len(tokenizer.encode(tool_suffix([{"role": "user", "content": "q"}], assistant, results,
                                                    thinking_mode)))
    return script


def prompt_ids(tokenizer, messages, tools, thinking_mode="thinking"):
    return tokenizer.encode(encode_messages(messages, thinking_mode, tools=tools))
