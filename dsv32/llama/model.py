"""A Llama-family model (GQA, half-split RoPE, SwiGLU, RMSNorm) with a lightning indexer in each
layer: DSA for a model pretrained dense, e.g. SmolLM2 imported by `dsv32.llama.gguf`.

The indexer is V3.2's (dsv32/model/indexer.py) with one change forced by the architecture: there
is no query latent, so its queries come from the layer's normed hidden state, like its weights and
its key. Its RoPE dims are the heads' (head_dim). A converted model's indexers start random and
learn in the two DSA stages (spec §1.3-1.4), which `dsv32.train.Trainer` runs unchanged: the
forward takes the same options and returns the same `ModelOutput` as `Transformer`'s.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv32.config import ConfigError
from dsv32.model.indexer import Indexer, select_keys, selected_mask
from dsv32.model.mla import AttnOut, RMSNorm, summed_probs
from dsv32.model.moe import MLP
from dsv32.model.rope import apply_rope_half, rope_cos_sin
from dsv32.model.transformer import KVCache, ModelOutput, Step, new_cache, positions_and_mask

MODEL_TYPE = "llama_dsa"


@dataclass
class LlamaConfig:
    """Hugging Face llama field names; the defaults are SmolLM2-135M's, plus an indexer."""
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    initializer_range: float = 0.02
    # DSA lightning indexer
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_topk: int = 512

    # What Indexer and rope_cos_sin read under V3.2's names: the indexer's queries come from the
    # hidden state, its RoPE dims are the heads', and RoPE is unscaled.
    rope_scaling: ClassVar[None] = None

    @property
    def q_lora_rank(self) -> int:
        return self.hidden_size

    @property
    def qk_rope_head_dim(self) -> int:
        return self.head_dim

    @property
    def cache_widths(self) -> tuple[int, int, int]:
        """Per-token cache entries in the V3.2 cache's three slots: keys, values, indexer key."""
        kv = self.num_key_value_heads * self.head_dim
        return kv, kv, self.index_head_dim

    def __post_init__(self):
        def bad(name, why):
            raise ConfigError(f"config field '{name}': {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "index_n_heads", "index_head_dim", "index_topk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"GQA shares each K/V head among a whole number of query heads: "
                f"{self.num_attention_heads} is not divisible by {self.num_key_value_heads}")
        if self.head_dim % 2:
            bad("head_dim", f"RoPE rotates pairs: must be even, got {self.head_dim}")
        if self.index_head_dim < self.head_dim or self.index_head_dim & (self.index_head_dim - 1):
            bad("index_head_dim", f"must be a power of two (Hadamard) >= head_dim={self.head_dim} "
                f"(the indexer's RoPE dims), got {self.index_head_dim}")

    def flops_per_token(self, seq_len: int) -> float:
        """6 x parameters + attention scores and values (forward + backward), for the trainer's MFU."""
        d, h, kv, hd = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * self.intermediate_size
        return 6 * (self.num_hidden_layers * layer + d * self.vocab_size) + \
            12 * self.num_hidden_layers * h * hd * min(seq_len, self.index_topk)

    def to_hf(self) -> dict:
        return {"architectures": ["LlamaDSAForCausalLM"], "model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"config field 'model_type': expected {MODEL_TYPE!r}, got {d.get('model_type')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def load(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        return cls.from_hf(json.loads((path / "config.json" if path.is_dir() else path).read_text()))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        (path / "config.json" if path.is_dir() else path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


class Attention(nn.Module):
    """Grouped-query attention: query head i reads K/V head i // (heads per K/V head)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, h * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, cfg.hidden_size, bias=False)
        self.indexer = Indexer(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> AttnOut:
        """x: [B, S, D] normed hidden; cos, sin: [B, S, head_dim/2]; step: the forward's `Step`."""
        cfg, (b, s, _) = self.cfg, x.shape
        h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = apply_rope_half(self.q_proj(x).view(b, s, h, hd), cos, sin)   # [B, S, H, hd]
        k = apply_rope_half(self.k_proj(x).view(b, s, kv, hd), cos, sin)  # [B, S, KV, hd]
        v = self.v_proj(x)                                                # [B, S, KV*hd]

        ix_in = x.detach() if step.detach_indexer else x
        ik = self.indexer.key(ix_in, cos, sin, step.indexer_fp8)          # [B, S, Di]
        k = k.flatten(2)
        if step.cache is not None:  # the V3.2 cache's three slots hold keys, values, indexer keys
            k, v, ik = step.cache.update(step.layer_id, k, v, ik, step.positions)
        t = k.shape[1]
        mask = step.mask                                                  # [B, S, T]
        scores, idx = select_keys(self.indexer, step, ix_in, ix_in, ik, cos, sin,  # [B, S, T], [B, S, k]
                                  attn_q=q, attn_k=k.view(b, t, kv, hd))
        if step.sparse:  # no latent to absorb: both modes mask the keys outside the selected set
            mask = selected_mask(idx, mask)

        rep = h // kv
        q = q.transpose(1, 2)                                             # [B, H, S, hd]
        k = k.view(b, t, kv, hd).repeat_interleave(rep, 2).transpose(1, 2)  # [B, H, T, hd]
        v = v.view(b, t, kv, hd).repeat_interleave(rep, 2).transpose(1, 2)
        m = mask[:, None]                                                 # [B, 1, S, T]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)          # scale hd^-0.5
        probs = summed_probs(q, k, m, hd ** -0.5) if step.return_attn_probs else None
        return AttnOut(self.o_proj(o.transpose(1, 2).reshape(b, s, h * hd)), scores, idx, probs)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, step: Step, out: ModelOutput):
        step.layer_id = self.layer_id
        a = self.self_attn(self.input_layernorm(x), cos, sin, step)
        out.add_attention(a, step)
        x = x + a.out
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDSA(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList()  # no MTP modules: the trainer's MTP loss is skipped
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, indexers_only: bool = False):
        """Normal(0, initializer_range) matrices, unit norms, zero biases. indexers_only: a
        converted model's fresh indexers (near-uniform scores at the start of stage 1)."""
        for name, p in self.named_parameters():
            if indexers_only and ".indexer." not in name:
                continue
            if p.dim() >= 2:
                p.normal_(0.0, self.cfg.initializer_range, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        """A contiguous cache; its kv / pe / ik slots hold keys / values / indexer keys."""
        return new_cache(self, batch, max_len, dtype, device)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, mtp: bool = False, **options) -> ModelOutput:
        """input_ids: [B, S] -> ModelOutput with logits [B, S, vocab]; as `Transformer.forward`.

        options are `Step` fields: sparse (DSA top-k, default on; False = dense), mode (accepted,
        both modes compute the same), indexer_fp8, detach_indexer, return_aux, return_attn_probs,
        return_topk, forced_topk, key_selector.
        There is no MoE and no MTP: expert_ids, router_scores and mtp_logits stay empty.
        """
        positions, mask = positions_and_mask(input_ids, start_pos, cache, positions, self.cfg)
        step = Step(positions=positions, mask=mask, cache=cache, **options)
        cos, sin = rope_cos_sin(self.cfg, positions)
        out = ModelOutput(logits=None, hidden=None)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, step, out)
        out.hidden = self.norm(x)
        out.logits = self.lm_head(out.hidden)
        return out
