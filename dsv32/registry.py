"""Model families: what a checkpoint's `model_type` loads as, and how each family saves and tokenizes.

Two families today:
  - DeepSeek-V3.2 (`dsv32.model`, `dsv32.checkpoint`), born with DSA; model_type `deepseek_v32`;
  - Llama-architecture models with a lightning indexer added (`dsv32.llama`), model_type
    `llama_dsa`: SmolLM2, the default model, imported from a GGUF file.
Everything outside a family's own modules reaches it through here, mostly by way of `dsv32.load`
and `dsv32.save` (dsv32/loader.py). Entries name their code as "module:attribute" and import it
when first asked for, so this module is standard library only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def resolve(ref: str):
    """The object "package.module:attr[.attr]" names, imported now."""
    module, _, attrs = ref.partition(":")
    obj = importlib.import_module(module)
    for a in attrs.split("."):
        obj = getattr(obj, a)
    return obj


@dataclass(frozen=True)
class Family:
    """One model family: its config.json `model_type` and the code that loads, saves and tokenizes it."""

    model_type: str
    title: str
    model: str                       # the network's class
    load: str                        # (directory, dtype, device) -> model, eval mode
    save: str                        # (model, directory): config.json + safetensors
    tokenizer: str                   # (tokenizer.json or its directory, model config) -> tokenizer
    load_sharded: str | None = None  # (directory, Parallel, dtype, device, fp8=) -> this rank's shard
    thinking: bool = True            # its chat format has a thinking mode (known before any load)

    def get(self, part: str):
        """The code behind one of the fields above, e.g. `family.get("load")(path, dtype, device)`."""
        ref = getattr(self, part)
        if ref is None:
            raise ValueError(f"{self.title} models ({self.model_type}) have no {part.replace('_', ' ')}")
        return resolve(ref)


FAMILIES = (
    Family("deepseek_v32", "DeepSeek-V3.2", model="dsv32.model:Transformer", load="dsv32.checkpoint:load_model",
           save="dsv32.checkpoint:save_model", tokenizer="dsv32.tokenizer:Tokenizer.for_model",
           load_sharded="dsv32.parallel.load:load_sharded"),
    Family("llama_dsa", "Llama with DSA", model="dsv32.llama.model:LlamaDSA", load="dsv32.llama.checkpoint:load",
           save="dsv32.llama.checkpoint:save", tokenizer="dsv32.llama.tokenizer:for_model",
           thinking=False),
)
ALIASES = {"deepseek_v3": "deepseek_v32"}  # config.json model_types read as another's

# The model `dsv32 generate / chat / serve` run without --model: () -> (model, tokenizer)
DEFAULT_MODEL = "dsv32.llama.gguf:smollm2_dsa"
DEFAULT_NAME = "SmolLM2-135M-Instruct-DSA"
DEFAULT_FAMILY = "llama_dsa"             # the default model's family
GGUF = "dsv32.llama.gguf:gguf_dsa"       # a .gguf file -> (model, tokenizer), dense until its indexers train
GGUF_FAMILY = "llama_dsa"                # what a .gguf file loads as
CONVERT = "dsv32.llama.gguf:main"        # `dsv32 convert ...`: a GGUF -> a directory with fresh indexers


def family(model_type: str | None) -> Family:
    """The family of a config.json `model_type` (none given: DeepSeek-V3.2, as the official files)."""
    model_type = ALIASES.get(model_type, model_type) or "deepseek_v32"
    for f in FAMILIES:
        if f.model_type == model_type:
            return f
    raise ValueError(f"model_type {model_type!r} is not a model family dsv32 knows "
                     f"({', '.join(f.model_type for f in FAMILIES)})")


def family_of(model) -> Family:
    """The family of a built model (by its class)."""
    for f in FAMILIES:
        if isinstance(model, f.get("model")):
            return f
    raise TypeError(f"{type(model).__name__} is not the model of a family dsv32 knows")
