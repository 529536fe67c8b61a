"""The engine under torchrun: rank 0 runs the whole `Engine` (scheduler, sampler, HTTP) and, before
each model forward, broadcasts that step's batch: token ids, positions and the paged-cache slots to
write and read. The other ranks hold the same cache layout, receive the batch and run the same
forward with their shard of the model, so the collectives inside it line up. Only rank 0 samples.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from dsv32.engine import Engine, EngineConfig


class Leader:
    """Stands in for the model on rank 0: broadcast the forward, then run it."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __getattr__(self, name):  # cfg, embed_tokens, eval ... are the model's
        return getattr(self.model, name)

    def __call__(self, input_ids, cache, positions, **options):
        _send({"options": options, "shapes": [tuple(t.shape) for t in (input_ids, positions, cache.slots, cache.gather)]})
        for t in (input_ids, positions, cache.slots, cache.gather):
            dist.broadcast(t.to(self.device).contiguous(), src=0)
        return self.model(input_ids, cache=cache, positions=positions, **options)

    def stop(self) -> None:
        _send(None)


def _send(obj) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def distributed_engine(model, config: EngineConfig | None = None) -> Engine:
    """An Engine on every rank with one cache size for all (the smallest any rank can hold);
    rank 0's calls its model through a `Leader`."""
    config = replace(config or EngineConfig(), cuda_graphs=False)  # every forward goes through the Leader
    engine = Engine(model, config)
    n = torch.tensor(engine.cache.num_blocks, device=engine.device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    if int(n) != engine.cache.num_blocks:
        del engine
        engine = Engine(model, replace(config, num_blocks=int(n)))
    if dist.get_rank() == 0:
        engine.model = Leader(engine.model, engine.device)
    return engine


@torch.inference_mode()
def follow(engine: Engine) -> None:
    """Ranks > 0: run each forward rank 0 broadcasts, until it says stop."""
    while (msg := _send(None)) is not None:
        ids, pos, slots, gather = (torch.empty(s, dtype=torch.long, device=engine.device) for s in msg["shapes"])
        for t in (ids, pos, slots, gather):
            dist.broadcast(t, src=0)
        engine.cache.slots, engine.cache.gather = slots, gather
        engine.model(ids, cache=engine.cache, positions=pos, **msg["options"])
