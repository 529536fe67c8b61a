"""Hugging Face checkpoints: config.json + safetensors shards + model.safetensors.index.json.

Tensor names are those of `deepseek-ai/DeepSeek-V3.2` (which `transformers` also writes). Ours
differ in one place: the MTP modules live in `Transformer.mtp[k]` and are stored as
`model.layers.{num_hidden_layers + k}`, where the official files also keep copies of the embedding
and output head (`embed_tokens`, `shared_head.head`); we share the main model's, so those copies
are checked on load and written on save.

FP8 checkpoints store e4m3 weights with a `weight_scale_inv` per 128x128 block; they are
dequantised to the requested dtype on load, or, with `keep_fp8`, kept as they are in FP8Linear
layers that multiply in FP8 (dsv32.kernels.fp8_gemm). No pickle anywhere: safetensors only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dsv32.config import ModelConfig
from dsv32.model import Transformer
from dsv32.model.fp8 import FP8, log_fp8_paths, to_fp8_linears, weight_dequant, weight_quant

INDEX = "model.safetensors.index.json"
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: missing, unexpected or misshapen tensors."""


def hf_name(name: str, cfg: ModelConfig) -> str:
    """Our parameter name -> the official checkpoint name."""
    if name == "lm_head.weight":
        return name
    m = re.match(r"mtp\.(\d+)\.(.*)", name)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}"
    return "model." + name


def our_name(name: str, cfg: ModelConfig) -> str | None:
    """Official checkpoint name -> ours (None for the MTP copies of embedding and head)."""
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        return name  # unknown: reported as unexpected by the loader
    name = name[len("model."):]
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    if m and int(m[1]) >= cfg.num_hidden_layers:
        if m[2] in _MTP_COPIES:
            return None
        return f"mtp.{int(m[1]) - cfg.num_hidden_layers}.{m[2]}"
    return name


def is_fp8_weight(name: str) -> bool:
    """Which weights the official checkpoint stores in FP8: every projection of attention (the
    indexer's wq_b and wk included) and of the FFNs; not embeddings, head, norms, router,
    indexer weights_proj or the MTP eh_proj."""
    if not name.endswith(".weight"):
        return False
    return bool(re.search(r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|"
                          r"indexer\.wq_b|indexer\.wk)\.weight$", name)
                or re.search(r"mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight$", name))


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors files in {path}")
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{INDEX} lists shard(s) that are not in {path}: {', '.join(missing)}")
    return [path / f for f in files]


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               cfg: ModelConfig | None = None, keep_fp8: bool = False) -> Transformer:
    """Build the model of `path/config.json` on `device` and fill it from the safetensors shards,
    one tensor at a time (the full model is never held twice). keep_fp8 (FP8 checkpoints only):
    the FP8 projections (but kv_b_proj) stay e4m3 + scales in FP8Linear layers, not dequantised,
    and multiply through `dsv32.model.fp8.fp8_linear` (act_quant + FP8 GEMM); the engine stacks the
    routed experts for two grouped FP8 GEMMs a layer (MoE.stack_experts). `dsv32.load(...,
    fp8_weights=True)` and `--fp8-weights` on the command line reach it.
    Any model family: `dsv32.load`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    return load_weights(Transformer, cfg or ModelConfig.load(path), path, dtype, device, keep_fp8)


def load_weights(cls, cfg, path: Path, dtype, device, keep_fp8: bool = False):
    """Empty `cls(cfg)` on device, then every tensor of the shards copied in (FP8 dequantised
    unless kept), with errors naming the unexpected, misshapen or missing ones, and a file that is
    not safetensors (a truncated download, say). Any model class whose names `hf_name` maps."""
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty unties; the head is not in the file
        model.lm_head.weight = model.embed_tokens.weight
    model.to(dtype)
    for name, b in list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):  # selection bias stays fp32, as shipped
            _set_buffer(model, name, b.float())
    if keep_fp8:
        if cfg.fp8_block != (128, 128):
            raise ValueError(f"keep_fp8 needs an FP8 checkpoint with 128x128 blocks; {path} has "
                             f"quantization_config {cfg.quantization_config}")
        # kv_b_proj stays dequantised: absorbed (MQA) attention reads its weight as a matrix
        to_fp8_linears(model, lambda n: is_fp8_weight(hf_name(n + ".weight", cfg))
                       and not n.endswith("kv_b_proj"), quantize=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers())

    loaded, unexpected = set(), []
    files = _shard_files(path)
    for file in tqdm(files, desc=f"loading {path.name}", unit="shard", disable=len(files) < 2):
        with _open(file) as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if key.endswith("weight_scale_inv"):
                    if key[: -len("_scale_inv")] not in keys:
                        unexpected.append(key)
                        continue
                    if our_name(key, cfg) not in params:  # read with its weight, unless an FP8Linear keeps it
                        continue
                name = our_name(key, cfg)
                if name is None:
                    continue
                if name not in params:
                    unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                if params[name].dtype == FP8 and t.dtype != FP8:
                    raise CheckpointError(f"{key} in {file.name} is {t.dtype}; keep_fp8 needs it in FP8")
                if t.dtype == FP8 and params[name].dtype != FP8:
                    scale_key = key + "_scale_inv"
                    if scale_key not in keys:
                        raise CheckpointError(f"{key} is FP8 but {scale_key} is not in {file.name}")
                    t = weight_dequant(t, f.get_tensor(scale_key), getattr(cfg, "fp8_block", None) or (128, 128),
                                       torch.float32)
                p = params[name]
                if t.shape != p.shape:
                    raise CheckpointError(f"tensor {key} in {file.name} has shape {tuple(t.shape)}, "
                                          f"the config expects {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t)
                loaded.add(name)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} tensor(s) in the checkpoint match nothing in the model "
                              f"built from its config.json, e.g. {', '.join(unexpected[:5])}")
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = [hf_name(n, cfg) for n in params if n not in loaded and n not in tied]
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {', '.join(missing[:5])}")
    if keep_fp8:
        log_fp8_paths(model, device)
    return model.eval()


def _open(file: Path):
    """safe_open, with a file that is not safetensors named as such."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (no public base class)
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(f"{file} is not a readable safetensors file ({size:,} bytes; a truncated "
                              f"or interrupted download?): {e}") from None


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor):
    mod_name, _, buf = name.rpartition(".")
    model.get_submodule(mod_name).register_buffer(buf, value)


def _hf_items(name: str, t: torch.Tensor, cfg: ModelConfig, fp8: bool):
    """One tensor of ours -> its (official name, tensor) pairs: with fp8, e4m3 + scale_inv."""
    key = hf_name(name, cfg)
    if fp8 and is_fp8_weight(key):
        q, s = weight_quant(t, tuple(cfg.fp8_block or (128, 128)))
        yield key, q
        yield key + "_scale_inv", s
    else:
        yield key, t


def _mtp_copies(cfg: ModelConfig, embed: torch.Tensor, head: torch.Tensor):
    """The official layout keeps copies of the embedding and head in each MTP layer."""
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        yield prefix + "embed_tokens.weight", embed.clone()
        yield prefix + "shared_head.head.weight", head.clone()


def state_dict_hf(model: Transformer, fp8: bool = False):
    """Yield (official name, tensor) pairs; with fp8, quantised weights and their scales."""
    cfg = model.cfg
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for name, t in sd.items():
        yield from _hf_items(name, t.detach(), cfg, fp8)
    yield from _mtp_copies(cfg, sd["embed_tokens.weight"].detach(), model.lm_head.weight.detach())


def _fp8_config(cfg: ModelConfig, fp8: bool) -> ModelConfig:
    if fp8 and cfg.quantization_config is None:
        return cfg.replace(quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                                "quant_method": "fp8", "scale_fmt": "ue8m0",
                                                "weight_block_size": [128, 128]})
    return cfg if fp8 else cfg.replace(quantization_config=None)


def write_shards(items, path: str | Path, max_shard_bytes: int = 4 << 30) -> int:
    """Stream (name, tensor) pairs into `model-0000i-of-0000n.safetensors` files, each written as
    soon as it is full (at most one shard is held), and the index json. Returns the total bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names, weight_map, total = [], {}, 0
    cur, size = {}, 0

    def flush():
        fname = f"model-{len(names) + 1:05d}.partial"
        save_file(cur, str(path / fname), metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({k: fname for k in cur})

    for key, t in items:
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            flush()
            cur, size = {}, 0
        cur[key] = t.contiguous().cpu()
        size += nbytes
        total += nbytes
    flush()
    final = {old: f"model-{i:05d}-of-{len(names):05d}.safetensors" for i, old in enumerate(names, start=1)}
    for old, new in final.items():
        (path / old).rename(path / new)
    weight_map = {k: final[v] for k, v in weight_map.items()}
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def clear_weights(path: str | Path) -> None:
    """Remove a model directory's weight files (*.safetensors, the index json) before a model is
    written there: a model with fewer shards, or of another family, must not leave stale ones that
    a loader would read with the new."""
    path = Path(path)
    for f in [*path.glob("*.safetensors"), path / INDEX]:
        f.unlink(missing_ok=True)


def save_model(model: Transformer, path: str | Path, fp8: bool = False, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json, shards `model-0000i-of-0000n.safetensors` and the index json (weights
    already in `path` are removed first)."""
    clear_weights(path)
    write_shards(state_dict_hf(model, fp8), path, max_shard_bytes)
    _fp8_config(model.cfg, fp8).save(Path(path))


def save_random(cfg: ModelConfig, path: str | Path, fp8: bool = True, seed: int = 0, device="cpu",
                max_shard_bytes: int = 4 << 30) -> int:
    """A randomly initialised checkpoint of `cfg` (as `Transformer.init_weights`) in the official
    layout, written tensor by tensor: the model is never held, so the full 671B config needs only
    one shard of memory. Each tensor draws from its own generator (seeded by seed and its name),
    so the MTP copies of embedding and head equal the originals. Returns the bytes written."""
    import zlib

    with torch.device("meta"):
        shapes = {n: (t.shape, t.dim()) for n, t in Transformer(cfg).state_dict(keep_vars=True).items()}
    dtype = getattr(torch, cfg.torch_dtype)

    def tensor(name):  # fp32: quantised to e4m3, or cast to the checkpoint's dtype, when stored
        shape, dim = shapes[name]
        if dim < 2:
            return torch.full(shape, 0.0 if name.endswith("bias") else 1.0)
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.empty(shape, device=device).normal_(0.0, cfg.initializer_range, generator=g)

    def stored(key, t):
        keep = t.dtype == FP8 or key.endswith(("_scale_inv", "e_score_correction_bias"))
        return key, t if keep else t.to(dtype)

    def items():
        for name in shapes:
            if not (cfg.tie_word_embeddings and name == "lm_head.weight"):
                yield from (stored(k, t) for k, t in _hf_items(name, tensor(name), cfg, fp8))
        head = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        yield from (stored(k, t) for k, t in _mtp_copies(cfg, tensor("embed_tokens.weight"), tensor(head)))

    cfg = _fp8_config(cfg, fp8)
    total = write_shards(items(), path, max_shard_bytes)
    cfg.save(Path(path))
    return total


# ---- an indexer alone: what DSA adds to a model pretrained dense, small enough to ship ----

def save_indexer(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write every layer's indexer tensors (official names) to one safetensors file: the
    projections (wq_b, wk) in FP8 e4m3 with a `weight_scale_inv` per 128x128 block, the small ones
    (weights_proj, k_norm) in fp32. SmolLM2's 30 indexers take 11 MB so, against 22 in bf16."""
    tensors = {}
    for name, t in model.state_dict().items():
        if ".indexer." not in name:
            continue
        key = hf_name(name, model.cfg)
        if is_fp8_weight(key):
            q, s = weight_quant(t.detach(), (128, 128))
            tensors[key], tensors[key + "_scale_inv"] = q, s
        else:
            tensors[key] = t.detach().float()
    if not tensors:
        raise ValueError("the model has no indexer to save")
    cfg = model.cfg
    meta = {"format": "pt", "index_n_heads": str(cfg.index_n_heads), "index_head_dim": str(cfg.index_head_dim),
            "index_topk": str(cfg.index_topk), **(metadata or {})}
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)


@torch.no_grad()
def load_indexer(model: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Fill every indexer of `model` from a `save_indexer` file (FP8 dequantised); the rest of the
    model is untouched. Returns the file's metadata. Errors name the missing, unexpected or
    misshapen tensor."""
    path = Path(path)
    params = {hf_name(n, model.cfg): p for n, p in model.named_parameters() if ".indexer." in n}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        unexpected = sorted(k for k in keys if k not in params and not
                            (k.endswith("_scale_inv") and k[: -len("_scale_inv")] in params))
        if unexpected:
            raise CheckpointError(f"{len(unexpected)} tensor(s) in {path.name} match no indexer of the model, "
                                  f"e.g. {', '.join(unexpected[:5])}")
        missing = [k for k in params if k not in keys]
        if missing:
            raise CheckpointError(f"{len(missing)} indexer tensor(s) missing from {path.name}, "
                                  f"e.g. {', '.join(missing[:5])}")
        for key, p in params.items():
            t = f.get_tensor(key)
            if t.dtype == FP8:
                if key + "_scale_inv" not in keys:
                    raise CheckpointError(f"{key} is FP8 but {key}_scale_inv is not in {path.name}")
                if t.dim() != 2:
                    raise CheckpointError(f"{key} is FP8 with shape {tuple(t.shape)}; only 2-D weights are")
                try:
                    t = weight_dequant(t, f.get_tensor(key + "_scale_inv"), (128, 128), torch.float32)
                except ValueError as e:
                    raise CheckpointError(f"{key}: {e}") from None
            if t.shape != p.shape:
                raise CheckpointError(f"tensor {key} in {path.name} has shape {tuple(t.shape)}, the model "
                                      f"expects {tuple(p.shape)} (index_n_heads={model.cfg.index_n_heads}, "
                                      f"index_head_dim={model.cfg.index_head_dim})")
            p.copy_(t)
        return f.metadata() or {}
