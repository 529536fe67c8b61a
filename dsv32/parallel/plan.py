"""What slice of each full tensor a rank holds: the one rule that both `parallelize` (slicing a
model in memory) and `load_sharded` (slicing the safetensors shards) follow.

With tp ranks (as DeepSeek's demo, inference/model.py):
  embed_tokens, lm_head             rows split by vocabulary
  self_attn.q_b_proj, kv_b_proj     rows split by head (column-parallel)
  self_attn.o_proj                  columns split by head (row-parallel, all-reduce after)
  dense mlp gate_proj, up_proj      rows split by intermediate (column-parallel)
  dense mlp down_proj               columns split by intermediate (row-parallel, all-reduce after)
  q_a_proj, kv_a_proj_with_mqa, the norms, the indexer: replicated (the latent is computed once
  per rank; every rank caches the whole latent)
With ep ranks: routed expert e lives on rank e // (n_routed_experts / ep); gate and shared
expert are replicated.
"""

from __future__ import annotations

import re

from dsv32.parallel.mesh import Parallel

_EXPERT = re.compile(r"(?:layers|mtp)\.\d+\.mlp\.experts\.(\d+)\.")
_DENSE = re.compile(r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def _part(n: int, ways: int, rank: int) -> slice:
    size = n // ways
    return slice(rank * size, (rank + 1) * size)


def expert_owner(e: int, cfg, par: Parallel) -> int:
    return e // (cfg.n_routed_experts // par.ep)


def shard_index(name: str, shape: tuple[int, ...], cfg, par: Parallel) -> tuple[slice, ...] | None:
    """Our parameter name and its full shape -> the index of this rank's part, or None if the
    rank holds none of it (another rank's expert)."""
    full = tuple(slice(None) for _ in shape)
    m = _EXPERT.search(name)
    if m:
        return full if par.ep == 1 or expert_owner(int(m[1]), cfg, par) == par.ep_rank else None
    if par.tp == 1:
        return full
    tp, r = par.tp, par.tp_rank
    h = cfg.num_attention_heads
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return (_part(shape[0], tp, r), slice(None))
    if name.endswith(("self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight")):
        per_head = shape[0] // h                                  # qk_head_dim or nope + v
        heads = _part(h, tp, r)
        return (slice(heads.start * per_head, heads.stop * per_head), slice(None))
    if name.endswith("self_attn.o_proj.weight"):
        heads = _part(h, tp, r)
        return (slice(None), slice(heads.start * cfg.v_head_dim, heads.stop * cfg.v_head_dim))
    m = _DENSE.match(name)
    if m:
        if m[1] == "down_proj":
            return (slice(None), _part(shape[1], tp, r))
        return (_part(shape[0], tp, r), slice(None))
    return full
