"""A Llama-family model given V3.2's chat format: its vocabulary grows by V3.2's special tokens.

A pretrained model such as SmolLM2 already reads and copies text; what it lacks to act as a V3.2
agent (thinking, DSML tool calls, tool results) is the format's seven special tokens as single ids.
`with_v32_chat` appends them to the vocabulary (ids from the old size up) and to the embedding
and head, each new row the mean of the old rows (the usual starting point for added tokens: their
embeddings sit in the middle of the learnt ones, and with a tied head their logits start near the
average token's). Every old row is kept, so on text without the new tokens the model computes
what it did before. SFT in the format (for example `experiments/agent_context.py --base smollm2`)
then teaches the new ids. The result saves and loads as any `llama_dsa` directory; `dsv32.load`
gives it V3.2's `Tokenizer` because its tokenizer.json holds the V3.2 tokens
(`dsv32.llama.tokenizer.for_model`).
"""

from __future__ import annotations

import dataclasses

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from dsv32.chat import BOS, EOS, SPECIAL_TOKENS
from dsv32.llama.model import LlamaDSA
from dsv32.tokenizer import Tokenizer


def with_v32_chat(model: LlamaDSA, tok: HFTokenizer, **overrides) -> tuple[LlamaDSA, Tokenizer]:
    """(a new model, V3.2's Tokenizer) for `model` and its `tokenizers` tokenizer, with V3.2's
    special tokens appended; the model's BOS/EOS become V3.2's. overrides: other config fields of
    the new model (e.g. index_topk). `tok` is not changed. Raises
    ValueError if the vocabulary already holds one of the tokens, or if the tokenizer and the model
    disagree on the vocabulary size."""
    n_old = tok.get_vocab_size()
    if n_old != model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {n_old} tokens but the model's vocabulary is {model.cfg.vocab_size}")
    present = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None]
    if present:
        raise ValueError(f"the vocabulary already has V3.2's {', '.join(present)}: nothing to add")
    grown = HFTokenizer.from_str(tok.to_str())
    grown.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [grown.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(n_old, n_old + len(SPECIAL_TOKENS))):
        raise ValueError(f"V3.2's tokens got ids {ids}, not the next {len(SPECIAL_TOKENS)} after {n_old}")
    cfg = dataclasses.replace(model.cfg, vocab_size=n_old + len(SPECIAL_TOKENS),
                              bos_token_id=grown.token_to_id(BOS), eos_token_id=grown.token_to_id(EOS), **overrides)
    ref = model.embed_tokens.weight
    with torch.device("meta"):
        new = LlamaDSA(cfg)
    new.to_empty(device=ref.device)
    new.to(ref.dtype)
    if cfg.tie_word_embeddings:  # to_empty unties
        new.lm_head.weight = new.embed_tokens.weight
    state = {k: v for k, v in model.state_dict().items() if k not in ("embed_tokens.weight", "lm_head.weight")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"embed_tokens.weight", "lm_head.weight"}, (missing, unexpected)
    pairs = [(model.embed_tokens.weight, new.embed_tokens.weight)]
    if not cfg.tie_word_embeddings:  # a tied head is the embedding: its rows are written with it
        pairs.append((model.lm_head.weight, new.lm_head.weight))
    with torch.no_grad():
        for old, grown_w in pairs:
            grown_w[:n_old] = old
            grown_w[n_old:] = old.float().mean(0).to(old.dtype)
    return new.train(model.training), Tokenizer(grown)
