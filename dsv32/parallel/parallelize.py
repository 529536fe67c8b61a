"""`parallelize(model, par)`: shard an unchanged single-device `Transformer` for tp/ep ranks, as
torchtitan applies parallelism from outside the model. Works on real and on meta parameters (the
sharded loader parallelizes an empty model, then fills each rank's part from the files).

What each rank holds is `plan.shard_index`; the layers that must communicate swap their class
for one in `layers.py` or `ep.py` and keep their parameter names, so state dicts still use the
official names (a rank's state dict holds only its part).
"""

from __future__ import annotations

import torch.nn as nn

from dsv32.model.mla import MLA
from dsv32.model.moe import MoE
from dsv32.model.transformer import Transformer
from dsv32.parallel.ep import shard_experts
from dsv32.parallel.layers import RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from dsv32.parallel.mesh import Parallel, check_divisible
from dsv32.parallel.plan import expert_owner, shard_index


class LocalHeads:
    """The model config as one tensor-parallel rank's MLA sees it: num_attention_heads / tp heads;
    everything else (index_topk included) read live from the shared config."""

    def __init__(self, cfg, heads: int):
        self._cfg, self.num_attention_heads, self.num_key_value_heads = cfg, heads, heads

    def __getattr__(self, name):
        return getattr(self._cfg, name)


def parallelize(model: Transformer, par: Parallel, replicated_tokens: bool = True) -> Transformer:
    """Shard `model` in place for `par` and return it. replicated_tokens: every rank runs the same
    tokens (serving); False: each rank its own (training), which needs tp == 1."""
    cfg = model.cfg
    check_divisible(cfg, par)
    if par.tp > 1 and not replicated_tokens:
        raise ValueError("tensor parallelism runs the same tokens on every rank: replicated_tokens=True")
    if par.ep > 1:
        for mod in model.modules():
            if isinstance(mod, MoE):
                owned = [e for e in range(cfg.n_routed_experts) if expert_owner(e, cfg, par) == par.ep_rank]
                shard_experts(mod, owned, par.ep, par.group, replicated_tokens)
    if par.tp == 1:
        return model
    for name, p in list(model.named_parameters()):
        idx = shard_index(name, tuple(p.shape), cfg, par)
        if idx is not None and any(s != slice(None) for s in idx):
            mod_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod_name), attr, nn.Parameter(p.data[idx].clone(), p.requires_grad))
    g, tp = par.group, par.tp
    emb = model.embed_tokens
    emb.__class__, emb.vocab_start, emb.tp_group = VocabParallelEmbedding, par.tp_rank * emb.weight.shape[0], g
    emb.num_embeddings = emb.weight.shape[0]
    head = model.lm_head
    if cfg.tie_word_embeddings:
        head.weight = emb.weight
    head.__class__, head.tp_group, head.tp = VocabParallelHead, g, tp
    for mod in model.modules():
        if isinstance(mod, MLA):
            mod.cfg = LocalHeads(cfg, cfg.num_attention_heads // tp)
            _row_parallel(mod.o_proj, g)
    for block in model.layers:
        if not isinstance(block.mlp, MoE):                             # the dense FFN
            _row_parallel(block.mlp.down_proj, g)
    for lin in model.modules():  # keep the printed shapes honest
        if isinstance(lin, nn.Linear):
            lin.out_features, lin.in_features = lin.weight.shape
    return model


def _row_parallel(lin: nn.Linear, group) -> None:
    lin.__class__, lin.tp_group = RowParallelLinear, group

