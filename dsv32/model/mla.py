"""Multi-head latent attention (MLA) with DeepSeek Sparse Attention.

Each token is compressed to one latent c = RMSNorm(W_dkv x) [kv_lora_rank] plus one shared rope
key k_pe [qk_rope_head_dim]; that pair is all the cache holds. Two execution modes, equal in exact
arithmetic:
  - "mha": expand per-head K/V from the latents with kv_b_proj (training, prefill);
  - "mqa": absorb kv_b_proj into the query and the output, so every head attends to the shared
    576-d latents directly (decode; what DSA runs on).
With `sparse`, each query attends only to the latents its lightning indexer selected. Decode steps
over a paged cache that offers `paged_view` (the engine's) read it in place with the paged DSA
kernels; every other forward attends to the [B, T, ...] entries `cache.update` returns.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv32.config import ModelConfig
from dsv32.kernels.indexer import indexer_logits_paged
from dsv32.kernels.sparse_mla import sparse_mla
from dsv32.kernels.sparse_mla_decode import sparse_mla_decode
from dsv32.model.batch_invariant import fixed_key_set
from dsv32.model.indexer import Indexer, select_keys, selected_mask, topk_select
from dsv32.model.rope import apply_rope_interleaved

PROB_CHUNK = 1 << 27  # fp32 elements of [B, H, queries, T] scores held at once for attn_probs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


@torch.no_grad()
def summed_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The indexer's target: attention probs summed over heads, without gradient, one query chunk
    of [B, H, c, T] scores at a time. q: [B, H, S, D]; k: [B, H, T, D]; mask: [B, 1, S, T]
    -> [B, S, T] fp32."""
    b, h, s, _ = q.shape
    c = max(1, PROB_CHUNK // (b * h * k.shape[2]))
    return torch.cat([
        ((q[:, :, i:i + c].float() @ k.float().transpose(-1, -2)) * scale)
        .masked_fill(~mask[:, :, i:i + c], float("-inf")).softmax(-1).sum(1)
        for i in range(0, s, c)], dim=1)


@dataclass
class AttnOut:
    out: torch.Tensor                       # [B, S, D]
    index_scores: torch.Tensor | None       # [B, S, T] fp32, -inf where not causal
    topk_indices: torch.Tensor | None       # [B, S, k] int64, -1 = no key
    attn_probs: torch.Tensor | None         # [B, S, T] main attention probs summed over heads (detached)


def paged_view(step):
    """This layer's paged cache view when the step is a sparse absorbed-MQA decode that returns no
    auxiliary outputs, forces or replaces no selection, and the cache offers one (see KVCache); else None."""
    if not (step.sparse and step.mode == "mqa") or step.return_aux or step.return_attn_probs \
            or step.forced_topk is not None or step.key_selector is not None:
        return None
    view = getattr(step.cache, "paged_view", None)
    return view(step.layer_id) if view is not None else None


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.num_attention_heads
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.indexer = Indexer(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step) -> AttnOut:
        """x: [B, S, D]; cos, sin: [B, S, rope/2]; step: the model's per-forward `Step`."""
        cfg, (b, s, _) = self.cfg, x.shape
        h, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        qr = self.q_a_layernorm(self.q_a_proj(x))                         # [B, S, q_lora]
        q = self.q_b_proj(qr).view(b, s, h, cfg.qk_head_dim)
        q_nope, q_pe = q.split([nope, rope], -1)
        q_pe = apply_rope_interleaved(q_pe, cos, sin)                     # [B, S, H, rope]
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], -1)
        kv = self.kv_a_layernorm(kv)                                      # [B, S, C]
        k_pe = apply_rope_interleaved(k_pe[:, :, None], cos, sin)[:, :, 0]  # [B, S, rope]

        ix_in, qr_in = (x.detach(), qr.detach()) if step.detach_indexer else (x, qr)
        ik = self.indexer.key(ix_in, cos, sin, step.indexer_fp8)          # [B, S, Di]
        view = paged_view(step)
        if view is not None:  # decode: write the new entries, read the cache in place
            step.cache.write(step.layer_id, kv, k_pe, ik)
            o, idx = self._paged_decode(ix_in, qr_in, q_nope, q_pe, cos, sin, step, view)
            return AttnOut(self.o_proj(o.reshape(b, s, h * cfg.v_head_dim)), None, idx, None)
        if step.cache is not None:  # write this chunk at its positions, read each sequence so far
            kv, k_pe, ik = step.cache.update(step.layer_id, kv, k_pe, ik, step.positions)
        end = kv.shape[1]                                                 # T
        mask = step.mask                                                  # [B, S, T]
        scores, idx = select_keys(self.indexer, step, ix_in, qr_in, ik, cos, sin)  # [B, S, T], [B, S, k]
        if step.batch_invariant and idx is not None:  # every query: index_topk slots in one order
            idx = fixed_key_set(idx, cfg.index_topk)
        if step.sparse and step.mode == "mha":  # keys outside the selected set are masked
            mask = selected_mask(idx, mask)

        attend = self._mha if step.mode == "mha" else self._mqa
        o, probs = attend(q_nope, q_pe, kv, k_pe, mask, idx if step.sparse else None, step.return_attn_probs)
        out = self.o_proj(o.reshape(b, s, h * cfg.v_head_dim))
        if step.return_attn_probs:  # summed over heads: [B, S, T], or [B, S, k] for sparse mqa
            if step.mode == "mqa" and step.sparse:  # put the selected keys' mass back at their positions
                full = torch.zeros(b, s, end + 1, dtype=probs.dtype, device=probs.device)
                probs = full.scatter_add_(-1, idx % (end + 1), probs)[..., :end]
        return AttnOut(out, scores, idx, probs if step.return_attn_probs else None)

    def _mha(self, q_nope, q_pe, kv, k_pe, mask, idx, want_probs):
        """Per-head K/V expanded from the latents. mask: [B, S, T]."""
        cfg = self.cfg
        b, t = kv.shape[:2]
        h, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        k_nope, v = self.kv_b_proj(kv).view(b, t, h, nope + cfg.v_head_dim).split([nope, cfg.v_head_dim], -1)
        q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)                # [B, H, S, Dqk]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, h, -1)], -1).transpose(1, 2)
        m = mask[:, None]                                                 # [B, 1, S, T]
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=m, scale=cfg.softmax_scale)
        probs = summed_probs(q, k, m, cfg.softmax_scale) if want_probs else None
        return o.transpose(1, 2), probs

    def _absorbed(self, q_nope):
        """kv_b_proj split and absorbed into the query: q_nope [B, S, H, nope] -> (q_lat
        [B, S, H, C] fp32, w_uv [H, Dv, C] fp32 to bring the attended latents back to values)."""
        cfg = self.cfg
        h, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(h, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        w_uk, w_uv = w[:, :nope].float(), w[:, nope:].float()
        return torch.einsum("bshd,hdc->bshc", q_nope.float(), w_uk), w_uv

    def _paged_decode(self, x, qr, q_nope, q_pe, cos, sin, step, view):
        """Sparse absorbed-MQA decode over one layer of the paged cache (`view`): indexer logits
        straight from the cached keys, the step's mask, top-k, then sparse MLA over the selected
        slots. The arithmetic of the gathered path, without the [B, T] copies. -> ([B, S, H, Dv],
        the selected positions [B, S, k])."""
        cfg, mask = self.cfg, step.mask                                   # mask: [B, S, T]
        iq, iw = self.indexer.query(x, qr, cos, sin, step.indexer_fp8)    # [B, S, Hi, Di], [B, S, Hi]
        logits = indexer_logits_paged(iq, iw, view.ik, view.block_table, view.seq_lens,
                                      block_size=view.block_size)         # [B, S, max_blocks * bs]
        scores = logits[..., :mask.shape[-1]].masked_fill(~mask, float("-inf"))
        idx = topk_select(scores, cfg.index_topk)                         # [B, S, k] positions
        slots = view.gather.gather(1, idx.clamp(min=0).flatten(1)).view_as(idx)
        slots = torch.where(idx >= 0, slots, -1).int()                    # [B, S, k] global slots
        q_lat, w_uv = self._absorbed(q_nope)
        qc = torch.cat([q_lat, q_pe.float()], -1).to(torch.bfloat16)      # [B, S, H, C + R], as the rows
        o_lat, _ = sparse_mla_decode(qc, view.kv, slots, cfg.softmax_scale, cfg.kv_lora_rank)
        return torch.einsum("bshc,hdc->bshd", o_lat.float(), w_uv).to(q_nope.dtype), idx

    def _mqa(self, q_nope, q_pe, kv, k_pe, mask, idx, want_probs):
        """kv_b_proj absorbed: scores and outputs live in the latent space. With idx, only the
        selected latents are gathered ([B, S, k, C]) instead of scoring all T."""
        cfg = self.cfg
        h, c = cfg.num_attention_heads, cfg.kv_lora_rank
        q_lat, w_uv = self._absorbed(q_nope)                              # [B, S, H, C]
        if idx is None:
            att = torch.einsum("bshc,btc->bsht", q_lat, kv.float()) + \
                torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float())
            m = mask[:, :, None]                                          # [B, S, 1, T]
            probs = (att * cfg.softmax_scale).masked_fill(~m, float("-inf")).softmax(-1)
            o_lat = torch.einsum("bsht,btc->bshc", probs, kv.float())
            probs = probs.detach().sum(2)                                 # [B, S, T]
        elif not want_probs:  # the sparse MLA kernel (its torch reference off CUDA)
            b, s, k = idx.shape
            t, r = kv.shape[1], q_pe.shape[-1]
            qc = torch.cat([q_lat, q_pe.float()], -1).to(kv.dtype).view(b * s, h, c + r)
            kvc = torch.cat([kv, k_pe], -1).view(b * t, c + r)           # every sequence's rows, stacked
            rows = torch.where(idx >= 0, idx + t * torch.arange(b, device=idx.device)[:, None, None], -1)
            o_lat = sparse_mla(qc, kvc, rows.view(b * s, k).int(), cfg.softmax_scale, c).view(b, s, h, c).float()
            probs = None
        else:  # the probabilities the indexer's loss needs come with the plain-torch path
            b, s, k = idx.shape
            valid = idx >= 0                                              # [B, S, k]
            flat = idx.clamp(min=0).reshape(b, s * k, 1)
            kv_sel = kv.float().gather(1, flat.expand(-1, -1, c)).view(b, s, k, c)
            pe_sel = k_pe.float().gather(1, flat.expand(-1, -1, k_pe.shape[-1])).view(b, s, k, -1)
            att = torch.einsum("bshc,bskc->bshk", q_lat, kv_sel) + \
                torch.einsum("bshr,bskr->bshk", q_pe.float(), pe_sel)
            p = (att * cfg.softmax_scale).masked_fill(~valid[:, :, None], float("-inf")).softmax(-1)
            probs = p.detach().sum(2)                                     # [B, S, k]
            o_lat = torch.einsum("bshk,bskc->bshc", p, kv_sel)
        o = torch.einsum("bshc,hdc->bshd", o_lat, w_uv).to(q_nope.dtype)  # [B, S, H, Dv]
        return o, probs
