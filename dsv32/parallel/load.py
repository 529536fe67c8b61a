"""Each rank loads its own part of the official safetensors shards: the model is built on the meta
device, parallelized there, allocated, and filled with `safe_open(...).get_slice(...)` reads of
just the rows/columns (and experts) this rank holds. No rank ever holds the full model.

FP8 weights come with one scale per 128x128 block; a slice reads the blocks it overlaps (fp8_part).
With `fp8=True` the e4m3 bytes stay as the checkpoint has them (FP8Linear, RowParallelLinear) where
the model only calls the module, and multiply through the FP8 GEMM (dsv32.parallel.layers.local_linear);
where a slice starts inside a block, the module keeps the blocks it overlaps and `fp8_offset`, and
dequantises per call. kv_b_proj is always dequantised: absorbed MLA reads its weight directly.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from dsv32.checkpoint import INDEX, CheckpointError, hf_name, is_fp8_weight
from dsv32.config import ModelConfig
from dsv32.model import Transformer
from dsv32.model.fp8 import FP8, log_fp8_paths, weight_dequant
from dsv32.parallel.layers import FP8Linear
from dsv32.parallel.mesh import Parallel
from dsv32.parallel.parallelize import parallelize
from dsv32.parallel.plan import shard_index


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: file.name for k in f.keys()})  # noqa: SIM118 (safe_open is no dict)
    if not out:
        raise CheckpointError(f"no safetensors files in {path}")
    return out


def _bounds(s: slice, n: int) -> tuple[int, int]:
    return s.start or 0, n if s.stop is None else s.stop


def dequant_slice(w: torch.Tensor, scale: torch.Tensor, offset: tuple[int, int], block, dtype) -> torch.Tensor:
    """w: [m, n] e4m3 cut from a full weight at `offset` (row, col); scale: the scale blocks it
    overlaps -> w in dtype."""
    (bm, bn), (r, c) = block, offset
    return weight_dequant(w, scale, block, dtype, (r % bm, c % bn))


def fp8_part(weight, scale, idx: tuple[slice, ...], full: tuple[int, int], block):
    """This rank's part of an FP8 weight, as the sharded loader reads it. weight: [M, N] e4m3 and
    scale [ceil(M/bm), ceil(N/bn)], tensors or safetensors slices; idx: the part's (rows, cols),
    full: (M, N) -> (e4m3 part [m, n], the scale blocks it overlaps, (row, col) where the part
    starts inside its first block: (0, 0) when it starts on a block boundary)."""
    (r0, r1), (c0, c1) = (_bounds(s, n) for s, n in zip(idx, full))
    bm, bn = block
    sidx = (slice(r0 // bm, -(-r1 // bm)), slice(c0 // bn, -(-c1 // bn)))
    return weight[idx], scale[sidx], (r0 % bm, c0 % bn)


def keep_fp8(model: Transformer, cfg: ModelConfig) -> None:
    """Give every Linear whose official weight is FP8 (kv_b_proj aside) an e4m3 weight and a
    scale buffer, on the model's (meta) device; plain Linears become FP8Linear."""
    bm, bn = cfg.fp8_block or (128, 128)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name.endswith("kv_b_proj"):
            continue
        if not is_fp8_weight(hf_name(name + ".weight", cfg)):
            continue
        m, n = mod.weight.shape
        mod.weight = nn.Parameter(torch.empty(m, n, dtype=FP8, device=mod.weight.device), requires_grad=False)
        mod.register_buffer("weight_scale_inv", torch.empty(-(-m // bm), -(-n // bn), device=mod.weight.device))
        mod.fp8_block = (bm, bn)
        if type(mod) is nn.Linear:
            mod.__class__ = FP8Linear


def load_sharded(path: str | Path, par: Parallel, dtype: torch.dtype = torch.bfloat16, device="cpu",
                 fp8: bool = False, cfg: ModelConfig | None = None) -> Transformer:
    """This rank's part of the model in directory `path` (config.json + official shards)."""
    path = Path(path)
    cfg = cfg or ModelConfig.load(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, par)
    model.to(dtype)
    for name, b in list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):  # the selection bias stays fp32, as shipped
            mod, _, attr = name.rpartition(".")
            model.get_submodule(mod).register_buffer(attr, b.float())
    if fp8:
        if cfg.fp8_block is None:
            raise CheckpointError(f"fp8=True, but {path} is not an FP8 checkpoint (no quantization_config)")
        keep_fp8(model, cfg)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    weight_map = _weight_map(path)
    block = cfg.fp8_block or (128, 128)
    targets = dict(model.named_parameters())
    targets.update((n, b) for n, b in model.named_buffers() if not n.endswith("weight_scale_inv"))
    with ExitStack() as stack, torch.no_grad():
        files: dict[str, object] = {}

        def opened(key):
            if key not in weight_map:
                raise CheckpointError(f"tensor {key} is missing from the checkpoint in {path}")
            fname = weight_map[key]
            if fname not in files:
                files[fname] = stack.enter_context(safe_open(path / fname, framework="pt", device="cpu"))
            return files[fname]

        for name in sorted(targets, key=lambda n: weight_map.get(hf_name(n, cfg), "")):  # file by file
            key = hf_name(name, cfg)
            sl = opened(key).get_slice(key)
            full = tuple(sl.get_shape())
            idx = shard_index(name, full, cfg, par)
            target = targets[name]
            if sl.get_dtype() != "F8_E4M3":
                t = sl[idx]
            else:
                t, scale, offset = fp8_part(sl, opened(key + "_scale_inv").get_slice(key + "_scale_inv"),
                                            idx, full, block)
                if target.dtype == FP8:  # the checkpoint's bytes and blocks, as they are
                    module = model.get_submodule(name.rpartition(".")[0])
                    if offset != (0, 0):
                        module.fp8_offset = offset
                        module.register_buffer("weight_scale_inv", scale.to(module.weight_scale_inv.device))
                    else:
                        module.weight_scale_inv.copy_(scale)
                else:
                    t = weight_dequant(t, scale, block, torch.float32, offset)
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(f"tensor {key} gives this rank a part of shape {tuple(t.shape)}, "
                                      f"the model expects {tuple(target.shape)}")
            target.copy_(t)
    if fp8:
        log_fp8_paths(model, device)
    return model.eval()
