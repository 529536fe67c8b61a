"""Llama-family checkpoints with DSA: one model.safetensors under Hugging Face llama names, and a
config.json whose model_type is `llama_dsa` (`dsv32.load` dispatches on it)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv32.checkpoint import clear_weights, hf_name, load_weights
from dsv32.llama.model import LlamaConfig, LlamaDSA


def save(model: LlamaDSA, path: str | Path) -> None:
    """Write config.json (model_type llama_dsa) and model.safetensors. A tied head is stored once,
    as the embedding. Weights already in `path` are removed first."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    clear_weights(path)
    tied = model.cfg.tie_word_embeddings
    tensors = {hf_name(n, model.cfg): t.detach().cpu().contiguous() for n, t in model.state_dict().items()
               if not (tied and n == "lm_head.weight")}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.cfg.save(path)


def load(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> LlamaDSA:
    """The `LlamaDSA` that `save` wrote in directory `path`."""
    path = Path(path)
    return load_weights(LlamaDSA, LlamaConfig.load(path), path, dtype, device)
