"""The device mesh: which ranks split attention heads (tp) and which split the routed experts (ep).

One node, one flat mesh over its ranks, as in DeepSeek's demo: tp and ep are each 1 or the whole
world. Serving uses tp = ep = world (every rank sees the same tokens); training uses FSDP2 over the
world with ep = world (every rank sees its own tokens).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Parallel:
    """This rank's place in the mesh. `tp` ranks share the attention heads, the dense FFNs and the
    vocabulary; `ep` ranks share the routed experts (n_routed_experts / ep each)."""
    mesh: DeviceMesh | None
    tp: int = 1
    ep: int = 1

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank() if self.mesh is not None else 0

    @property
    def world(self) -> int:
        return self.mesh.size() if self.mesh is not None else 1

    @property
    def group(self):
        return self.mesh.get_group() if self.mesh is not None else None

    @property
    def tp_rank(self) -> int:
        return self.rank if self.tp > 1 else 0

    @property
    def ep_rank(self) -> int:
        return self.rank if self.ep > 1 else 0


def init_distributed(device: str | None = None) -> torch.device:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU); return this rank's
    device (cuda:LOCAL_RANK on GPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return torch.device(device)


def make_parallel(tp: int = 1, ep: int = 1, device_type: str | None = None) -> Parallel:
    """The mesh over every rank of the (initialised) process group, for tp- and ep-way sharding."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    for name, v in (("tp", tp), ("ep", ep)):
        if v not in (1, world):
            raise ValueError(f"{name}={v}: must be 1 or the number of ranks ({world}); one node shards "
                             f"attention and experts over all its ranks, as DeepSeek's demo does")
    if world == 1:
        return Parallel(None, 1, 1)
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return Parallel(init_device_mesh(device_type, (world,), mesh_dim_names=("world",)), tp, ep)


def check_divisible(cfg, par: Parallel) -> None:
    """The sizes a tp/ep split needs to divide evenly, with errors naming the field."""
    for name, n, ways in (("num_attention_heads", cfg.num_attention_heads, par.tp),
                          ("vocab_size", cfg.vocab_size, par.tp),
                          ("intermediate_size", cfg.intermediate_size, par.tp),
                          ("n_routed_experts", cfg.n_routed_experts, par.ep)):
        if n % ways:
            raise ValueError(f"config field '{name}' = {n} is not divisible by {ways} ranks")
