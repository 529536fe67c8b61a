"""The DeepSeek-V3.2 network in plain PyTorch (no engine or training logic)."""

from dsv32.model.transformer import ContextLengthError, KVCache, ModelOutput, Step, Transformer

__all__ = ["Transformer", "KVCache", "ModelOutput", "Step", "ContextLengthError"]
