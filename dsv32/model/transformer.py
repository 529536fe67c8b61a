"""The DeepSeek-V3.2 transformer: blocks of MLA(+DSA) and dense FFN or MoE, and the MTP modules.

Module names follow the official checkpoint (see dsv32/checkpoint.py for the one exception: the MTP
modules, stored there as extra `model.layers.{num_hidden_layers + k}`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from dsv32.config import ModelConfig
from dsv32.model.mla import MLA, RMSNorm
from dsv32.model.moe import MLP, MoE
from dsv32.model.rope import rope_cos_sin


class ContextLengthError(ValueError):
    """A sequence longer than the model (or its cache) can hold."""


@dataclass
class KVCache:
    """Contiguous cache for every layer: MLA latents, rope keys and indexer keys.

    Any cache works that has `max_len` and `update` (the engine's paged cache does): update writes
    the new entries at their positions and returns each sequence's entries [B, T, ...], where T is
    one past the largest position, entry j at index j (padding beyond a sequence's own length is
    never read: the causal mask stops at its position). A paged cache may also offer
    `write(layer, kv, pe, ik)` and `paged_view(layer)` (raw rows, block table, sequence lengths,
    position -> slot map; None when it does not apply): sparse MQA decode steps then read it in
    place with the paged DSA kernels instead of calling `update` (see MLA).
    """
    kv: torch.Tensor  # [L, B, T_max, kv_lora_rank]
    pe: torch.Tensor  # [L, B, T_max, qk_rope_head_dim]
    ik: torch.Tensor  # [L, B, T_max, index_head_dim]

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def update(self, layer: int, kv, pe, ik, positions: torch.Tensor):
        """kv, pe, ik: [B, S, ...] new entries; positions: [B, S] -> cached [B, T, ...] each."""
        b, t = kv.shape[0], int(positions.max()) + 1
        rows = torch.arange(b, device=positions.device)[:, None]
        out = []
        for store, new in ((self.kv, kv), (self.pe, pe), (self.ik, ik)):
            store[layer][rows, positions] = new.to(store.dtype)
            out.append(store[layer][:b, :t])
        return out


def new_cache(model: nn.Module, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
    """A zeroed contiguous cache shaped by `model.cfg.cache_widths`, in the model's dtype and device."""
    cfg = model.cfg
    if max_len > cfg.max_position_embeddings:
        raise ContextLengthError(f"cache length {max_len} exceeds max_position_embeddings="
                                 f"{cfg.max_position_embeddings}")
    w = model.embed_tokens.weight
    kw = dict(dtype=dtype or w.dtype, device=device or w.device)
    return KVCache(*(torch.zeros(cfg.num_hidden_layers, batch, max_len, width, **kw) for width in cfg.cache_widths))


@dataclass
class Step:
    """Options of one forward and the state layers share (the per-step context of nano-vllm)."""
    positions: torch.Tensor | None = None     # [B, S] position of each token
    mask: torch.Tensor | None = None          # [B, S, T] causal: key j visible iff j <= position
    cache: KVCache | None = None
    sparse: bool = True                        # DSA top-k selection; False = dense attention
    mode: Literal["mha", "mqa"] = "mha"        # MLA execution mode
    indexer_fp8: bool = False                  # simulate the indexer's FP8 q/k (Hadamard + e4m3)
    detach_indexer: bool = False               # stage-2 training: indexer sees detached inputs
    return_aux: bool = False                   # index scores + selected indices per layer
    return_attn_probs: bool = False            # main attention probs summed over heads per layer
    return_router_scores: bool = False         # gate sigmoid scores per MoE layer (balance loss)
    forced_experts: list | None = None         # per MoE layer [B*S, k] ids to replay
    return_topk: bool = False                  # selected key positions per layer (no scores)
    forced_topk: torch.Tensor | None = None    # [B, S, L, k] packed key sets to replay (pack_selection)
    batch_invariant: bool = False              # fixed-width sorted key sets (model/batch_invariant.py)
    key_selector: Callable | None = None       # replaces the indexer's top-k (see indexer.select_keys)
    layer_id: int = 0


@dataclass
class ModelOutput:
    logits: torch.Tensor                                    # [B, S, V]
    hidden: torch.Tensor                                    # [B, S, D] after the final norm
    mtp_logits: list = field(default_factory=list)          # k-th: [B, S-k, V], predicts token i+k+1
    index_scores: list = field(default_factory=list)        # per layer [B, S, T] fp32
    topk_indices: list = field(default_factory=list)        # per layer [B, S, k]
    attn_probs: list = field(default_factory=list)          # per layer [B, S, T]
    expert_ids: list = field(default_factory=list)          # per MoE layer [B*S, k]
    router_scores: list = field(default_factory=list)       # per MoE layer [B*S, E] fp32

    def add_attention(self, a, step: Step) -> None:
        """Keep what the step asked for of one attention layer's output (an AttnOut)."""
        if step.return_aux:
            self.index_scores.append(a.index_scores)
        if step.return_aux or step.return_topk:
            self.topk_indices.append(a.topk_indices)
        if step.return_attn_probs:
            self.attn_probs.append(a.attn_probs)


def positions_and_mask(input_ids: torch.Tensor, start_pos: int, cache, positions: torch.Tensor | None,
                       cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a forward's inputs against the vocabulary, the context and the cache; return the
    positions [B, S] and the causal mask [B, S, T] (key j visible iff j <= the query's position).
    cfg: anything with vocab_size and max_position_embeddings."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    if positions is None:
        positions = torch.arange(start_pos, start_pos + s, device=input_ids.device).expand(b, s)
    elif positions.shape != input_ids.shape:
        raise ValueError(f"positions {tuple(positions.shape)} do not match input_ids {tuple(input_ids.shape)}")
    static = getattr(cache, "context_len", None)  # a cache bound to static decode inputs fixes T
    if positions.is_cuda and torch.cuda.is_current_stream_capturing():
        # inside a CUDA graph nothing may wait for the GPU: no value checks (the engine made the inputs)
        return positions, torch.arange(static, device=input_ids.device) <= positions[..., None]
    end = int(positions.max()) + 1 if positions.numel() else 0
    limit = cache.max_len if cache is not None else cfg.max_position_embeddings
    if end > limit:
        what = "the cache" if cache is not None else "max_position_embeddings"
        raise ContextLengthError(f"sequence reaches position {end}, beyond {what} ({limit})")
    if cache is None and end != s:
        raise ValueError("tokens after position 0 need a cache holding the earlier positions")
    if (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size) if input_ids.numel() else False:
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    return positions, torch.arange(static or end, device=input_ids.device) <= positions[..., None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, step: Step, out: ModelOutput):
        step.layer_id = self.layer_id
        a = self.self_attn(self.input_layernorm(x), cos, sin, step)
        x = x + a.out
        out.add_attention(a, step)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            forced = step.forced_experts[len(out.expert_ids)] if step.forced_experts else None
            h, ids, scores = self.mlp(h, forced)
            out.expert_ids.append(ids)
            if step.return_router_scores:
                out.router_scores.append(scores)
        else:
            h = self.mlp(h)
        return x + h


class SharedHead(nn.Module):
    """The MTP module's final norm; its output head is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """Multi-token prediction: h' = Block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]))."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h, emb, cos, sin, step: "Step", out: "ModelOutput"):
        """h: [B, n, D] previous depth's hidden; emb: [B, n, D] embeddings of the tokens k ahead.
        Returns (this depth's hidden, its normalised output for the shared lm_head)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], -1))
        h = super().forward(h, cos, sin, step, out)
        return h, self.shared_head.norm(h)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """Normal(0, initializer_range) matrices, unit norms, zero biases (random and from-scratch)."""
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        return new_cache(self, batch, max_len, dtype, device)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, mtp: bool = False, **options) -> ModelOutput:
        """input_ids: [B, S] -> ModelOutput with logits [B, S, vocab].

        Tokens sit at start_pos.. (or at explicit per-sequence `positions` [B, S], for batched
        decoding of sequences of different lengths); earlier positions must be in `cache`.
        options are `Step` fields: sparse, mode, indexer_fp8, detach_indexer, return_aux,
        return_attn_probs, return_router_scores, forced_experts, return_topk, forced_topk,
        batch_invariant, key_selector.
        mtp=True also runs the MTP modules (training).
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
        if mtp:
            out.mtp_logits = self._mtp(out.hidden, input_ids, cos, sin, step, out)
        return out

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache,
                    depth: int = 0, mode: Literal["mha", "mqa"] = "mqa") -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module over a cache (speculative decoding's draft). hidden: [B, S, D] at positions
        [B, S] (the main model's `ModelOutput.hidden`, or this module's own output when chained);
        next_ids: [B, S] the token after each position. Writes the module's cache entries (its
        layer id, `num_hidden_layers + depth`, indexes the cache) at those positions, reads every
        earlier one. -> (this depth's hidden [B, S, D], logits [B, S, V] predicting the token
        after next)."""
        positions, mask = positions_and_mask(next_ids, 0, cache, positions, self.cfg)
        step = Step(positions=positions, mask=mask, cache=cache, sparse=True, mode=mode)
        cos, sin = rope_cos_sin(self.cfg, positions)
        h, normed = self.mtp[depth](hidden, self.embed_tokens(next_ids), cos, sin, step, ModelOutput(None, None))
        return h, self.lm_head(normed)

    def _mtp(self, h, input_ids, cos, sin, step: Step, out: ModelOutput) -> list:
        """MTP depth k combines h_i (depth k-1) with emb(t_{i+k}); its logits predict t_{i+k+1}."""
        if step.cache is not None:
            raise ValueError("the MTP modules run on whole sequences (training), not with a cache")
        logits = []
        for k, layer in enumerate(self.mtp, start=1):
            n = h.shape[1] - 1                                             # positions that have t_{i+k}
            step.positions, step.mask = step.positions[:, :n], step.mask[:, :n, :n]
            h, normed = layer(h[:, :n], self.embed_tokens(input_ids[:, k:k + n]), cos[:, :n], sin[:, :n], step, out)
            logits.append(self.lm_head(normed))
        return logits
