"""Training on many ranks: FSDP2 over each block, with the routed experts split across ranks (EP)
and left out of FSDP, since each lives on exactly one rank. Every rank routes its own tokens; the
all-to-all carries them to their experts and back, and its backward carries the gradients.

FSDP units are each block's attention and FFN, not the block: a block also receives the forward's
`Step` and `ModelOutput`, and FSDP2 rebuilds dataclass arguments that hold tensors needing
gradients (torch >= 2.13), which would lose what later layers append to them. The attention unit
also returns the index scores, so FSDP's backward hooks fire for the indexer in stage 1, where
those scores are all the loss sees.

Gradient scale: FSDP averages the gradients of the sharded parameters over ranks; an expert's
gradient arrives summed over every rank's tokens, so a hook divides it by the number of ranks,
and one rank's run equals one process taking the ranks' batches as micro-batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dsv32.parallel.ep import ExpertParallelMoE
from dsv32.parallel.mesh import Parallel
from dsv32.parallel.parallelize import parallelize


def expert_params(model) -> set:
    return {p for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()}


def shard_for_training(model, par: Parallel | None = None):
    """FSDP2 (+ EP when par.ep > 1) in place; returns the model."""
    from torch.distributed.fsdp import fully_shard

    ignored = None
    if par is not None and par.ep > 1:
        parallelize(model, par, replicated_tokens=False)
        ignored = expert_params(model)
        for p in ignored:
            if p.requires_grad:  # frozen in stage 1 (dsa-warmup)
                p.register_hook(lambda g, n=par.world: g / n)
    for block in [*model.layers, *model.mtp]:
        fully_shard(block.self_attn)
        fully_shard(block.mlp, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over parameters every rank holds a distinct part of (FSDP shards, experts):
    the squared norms of the local parts add up over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros(())
    dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(coef.to(g.dtype))
    return norm


def gather_experts(model, opt, model_sd: dict, opt_sd: dict) -> tuple[dict, dict]:
    """Add every rank's experts, and their optimizer states, to full state dicts from
    get_state_dict (which hold only what FSDP manages). Every rank takes part; rank 0's result is
    the one to save."""
    names = {p: n for n, p in model.named_parameters()}
    mine = {n: t.detach().cpu() for n, t in model.state_dict().items() if ".experts." in n}
    state = {names[p]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for p in expert_params(model) if p in opt.state}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, state))
    if dist.get_rank() > 0:
        return model_sd, opt_sd
    model_sd = dict(model_sd)
    for m, s in everyone:
        model_sd.update(m)
        opt_sd["state"].update(s)
    if opt_sd["param_groups"]:  # expert matrices sit in the decayed group (0)
        group = opt_sd["param_groups"][0]
        group["params"] = list(dict.fromkeys(group["params"] + [n for _, s in everyone for n in s]))
    return model_sd, opt_sd


def own_experts(model_sd: dict, opt_sd: dict, model) -> tuple[dict, dict]:
    """Full state dicts cut down to the experts this rank holds (for set_state_dict)."""
    keep = set(model.state_dict())
    model_sd = {k: v for k, v in model_sd.items() if ".experts." not in k or k in keep}
    opt_sd = dict(opt_sd, state={k: v for k, v in opt_sd["state"].items() if ".experts." not in k or k in keep})
    opt_sd["param_groups"] = [dict(g, params=[p for p in g["params"] if ".experts." not in p or p in keep])
                              for g in opt_sd["param_groups"]]
    return model_sd, opt_sd
