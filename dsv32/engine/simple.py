"""Token-by-token generation with the model's contiguous cache: prefill once (MHA mode), then
decode one token at a time in absorbed MQA mode with DSA, as DeepSeek serves V3.2."""

from collections.abc import Iterator

import torch

from dsv32.engine.sampler import SamplingParams, sample
from dsv32.model import ContextLengthError, Transformer


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_ids: tuple[int, ...] = (), sparse: bool = True, repetition_penalty: float = 1.0) -> Iterator[int]:
    """Yield generated token ids one by one (stops at a stop id, which is yielded, or the limit).
    repetition_penalty: the CTRL penalty over prompt and generated tokens (sampler.adjusted_logits)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    limit = model.cfg.max_position_embeddings
    if len(prompt) >= limit:
        raise ContextLengthError(f"prompt of {len(prompt)} tokens leaves no room in the model's "
                                 f"context of {limit} tokens")
    total = min(len(prompt) + max_new_tokens, limit)
    device = model.embed_tokens.weight.device
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            repetition_penalty=repetition_penalty)
    history = list(prompt)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None  # a host generator (seeded_uniforms)
    cache = model.new_cache(1, total)
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, cache=cache, sparse=sparse, mode="mha").logits[:, -1]
    for pos in range(len(prompt), total):
        tok = sample(logits, [params], [gen], None, [history], [len(prompt)])[0].token
        history.append(tok)
        yield tok
        if tok in stop_ids or pos + 1 == total:
            return
        nxt = torch.tensor([[tok]], device=device)
        logits = model(nxt, start_pos=pos, cache=cache, sparse=sparse, mode="mqa").logits[:, -1]
