"""One way in and out for models: `dsv32.load(source) -> (model, tokenizer)` and `dsv32.save`.

Every entry point (generate, chat, serve, train, rl) loads through `load`. A source is
  - None: the default model (SmolLM2-135M-Instruct with trained DSA indexers, `dsv32.registry`);
  - a directory in the Hugging Face layout (config.json, *.safetensors, tokenizer.json), loaded by
    the family its config.json `model_type` names;
  - a `.gguf` file (llama architecture), with new indexers and so dense attention;
  - a preset name (`dsv32.config.PRESETS`): a DeepSeek-V3.2 model with RANDOM weights.
Errors name the problem: a missing path, a directory without config.json or weights, a model_type
no family reads, a truncated safetensors file, a tokenizer too big for the model.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn as nn

from dsv32.config import PRESETS, preset
from dsv32.model import Transformer
from dsv32.registry import DEFAULT_MODEL, GGUF, family, family_of, resolve
from dsv32.tokenizer import Tokenizer


def load(source: str | Path | None = None, *, dtype: str | torch.dtype = "auto", device: str | None = None,
         tokenizer=None, seed: int | None = 0, parallel=None, fp8_weights: bool = False):
    """(model in eval mode, tokenizer or None) of `source` (see the module docstring).

    dtype: "auto" takes a directory's `torch_dtype`, else bfloat16 on CUDA and float32 on CPU.
    device: default cuda when there is one. tokenizer: a tokenizer.json (or its directory) to use
    instead of the model directory's own; for a preset, the model's vocabulary is sized to it.
    seed: a preset's random init (None: the global RNG as it stands). parallel (a
    `dsv32.parallel.Parallel`): load only this rank's shard of a directory. fp8_weights (an FP8
    checkpoint directory, one device or sharded): keep the e4m3 weights and multiply in FP8
    (`dsv32.model.fp8.fp8_linear`) instead of dequantising them at load."""
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if fp8_weights and (source is None or not Path(source).is_dir()):
        raise ValueError(f"fp8_weights keeps an FP8 checkpoint directory's weights in FP8; "
                         f"{source or 'the default model'} is no such directory")
    if source is None:
        model, tok = resolve(DEFAULT_MODEL)(device, _dtype(dtype, device))
        return model, tok
    path = Path(source)
    if path.is_dir():
        return _load_dir(path, dtype, device, tokenizer, parallel, fp8_weights)
    if path.suffix == ".gguf" and path.is_file():
        return resolve(GGUF)(path, device, _dtype(dtype, device))
    if str(source) in PRESETS:
        return _build_preset(str(source), _dtype(dtype, device), device, tokenizer, seed)
    if path.exists():
        raise ValueError(f"{path} is a file but not a .gguf one: pass the model's directory (config.json, "
                         "*.safetensors, tokenizer.json)")
    raise FileNotFoundError(f"no model at {source}: expected a model directory, a .gguf file, or a preset "
                            f"name ({', '.join(PRESETS)})")


def save(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write `model` as a directory `load` reads back: config.json and safetensors by its family's
    rules, and tokenizer.json from a tokenizer (ours or a `tokenizers` one) or a file to copy."""
    path = Path(path)
    family_of(model).get("save")(model, path)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            src = Path(tokenizer)
            (path / "tokenizer.json").write_bytes((src / "tokenizer.json" if src.is_dir() else src).read_bytes())
        else:
            getattr(tokenizer, "tok", tokenizer).save(str(path / "tokenizer.json"))
    return path


def _load_dir(path: Path, dtype, device: str, tokenizer, parallel, fp8_weights: bool):
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: a model directory in the Hugging Face layout "
                                "holds config.json, *.safetensors and tokenizer.json")
    try:
        hf = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from None
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has config.json but no *.safetensors weights")
    fam = family(hf.get("model_type"))
    if dtype == "auto":
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "auto"
    dtype = _dtype(dtype, device)
    if parallel is not None:
        model = fam.get("load_sharded")(path, parallel, dtype, device, fp8=fp8_weights)
    elif fp8_weights:
        loader = fam.get("load")
        if "keep_fp8" not in inspect.signature(loader).parameters:
            raise ValueError(f"fp8_weights: the {hf.get('model_type')} family loads no FP8 weights")
        model = loader(path, dtype, device, keep_fp8=True)
    else:
        model = fam.get("load")(path, dtype, device)
    tok_path = tokenizer or (path if (path / "tokenizer.json").is_file() else None)
    tok = _tokenizer(fam.get("tokenizer"), tok_path, model.cfg)
    return model, tok


def _build_preset(name: str, dtype: torch.dtype, device: str, tokenizer, seed: int | None):
    cfg = preset(name)
    tok = None
    if tokenizer is not None:
        tok = Tokenizer.from_file(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        cfg = cfg.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype).eval(), tok


def _tokenizer(make, path, cfg):
    """The family's tokenizer at `path` (or one already built), checked to fit the model's embedding."""
    if not isinstance(path, (str, Path)):  # none, or one already built
        return path
    if not Path(path).exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    try:
        tok = make(path, cfg)
    except ValueError:
        raise
    except Exception as e:  # the tokenizers library raises its own error for a file it cannot parse
        raise ValueError(f"{path} is not a readable tokenizer.json: {e}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer at {path} has {tok.vocab_size} tokens, more than the model's "
                         f"vocab_size {cfg.vocab_size}: it belongs to another model")
    return tok


def _dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """'auto' with no checkpoint dtype: bfloat16 on CUDA, float32 on CPU (faster there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    return getattr(torch, dtype)
