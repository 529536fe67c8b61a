"""Token-by-token generation with the model's contiguous cache: prefill once (MHA mode), then
decode one token at a time in absorbed MQA mode with DSA, as DeepSeek serves V3.2."""

from collections.abc import Iterator

import torch

from dsv32.model import ContextLengthError, Transformer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] -> next ids [B]. temperature 0 = greedy; top_k 0 and top_p 1 = no truncation."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_ids: tuple[int, ...] = (), sparse: bool = True) -> Iterator[int]:
    """Yield generated token ids one by one (stops at a stop id, which is yielded, or the limit)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    limit = model.cfg.max_position_embeddings
    if len(prompt) >= limit:
        raise ContextLengthError(f"prompt of {len(prompt)} tokens leaves no room in the model's "
                                 f"context of {limit} tokens")
    total = min(len(prompt) + max_new_tokens, limit)
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(1, total)
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, cache=cache, sparse=sparse, mode="mha").logits[:, -1]
    for pos in range(len(prompt), total):
        nxt = sample_next(logits, temperature, top_p, top_k, gen)
        tok = int(nxt)
        yield tok
        if tok in stop_ids or pos + 1 == total:
            return
        logits = model(nxt[:, None], start_pos=pos, cache=cache, sparse=sparse, mode="mqa").logits[:, -1]
