"""The engine under torchrun: rank 0 runs the whole `Engine` (scheduler, sampler, HTTP) with a
`Leader` for its ModelRunner, which broadcasts each forward's Batch (token ids, positions, the
paged-cache slots to write and read, block tables, mode) before running it. The other ranks hold
the same cache layout, receive each Batch and run the same forward with their shard of the model
(`follow`), so the collectives inside it line up. Only rank 0 samples.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace

import torch
import torch.distributed as dist

from dsv32.engine import Engine, EngineConfig
from dsv32.engine.batch import Batch
from dsv32.engine.runner import ModelRunner
from dsv32.model import ModelOutput

log = logging.getLogger(__name__)


class Leader(ModelRunner):
    """Rank 0's runner: every forward's Batch goes to the other ranks first."""

    def forward(self, batch: Batch) -> ModelOutput:
        _send_batch(batch, self.device)
        return super().forward(batch)

    def stop(self) -> None:
        """Release the followers."""
        _send(None)


def _send(obj) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _send_batch(batch: Batch, device) -> None:
    """Rank 0: the Batch's plain fields as one object, then each tensor."""
    values = {f.name: getattr(batch, f.name) for f in fields(Batch)}
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in values.items() if k not in tensors}
    _send({"plain": plain, "tensors": {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}})
    for t in tensors.values():
        dist.broadcast(t.to(device).contiguous(), src=0)


def _receive_batch(device) -> Batch | None:
    """Ranks > 0: the Batch rank 0 sends next, or None when it says stop."""
    msg = _send(None)
    if msg is None:
        return None
    tensors = {k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in msg["tensors"].items()}
    for t in tensors.values():
        dist.broadcast(t, src=0)
    return Batch(**msg["plain"], **tensors)


def distributed_engine(model, config: EngineConfig | None = None) -> Engine:
    """An Engine on every rank with one cache size for all (the smallest any rank can hold); rank
    0's drives a `Leader`."""
    config = config or EngineConfig()
    if config.speculative_tokens:  # the MTP module's forwards are not broadcast to the followers
        log.warning("the distributed engine decodes without drafting: speculative_tokens=%d ignored",
                    config.speculative_tokens)
    config = replace(config, cuda_graphs=False, speculative_tokens=0)  # followers replay forwards, not graphs
    runner_class = Leader if dist.get_rank() == 0 else ModelRunner
    engine = Engine(model, config, runner_class=runner_class)
    n = torch.tensor(engine.runner.num_blocks, device=engine.device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    if int(n) != engine.runner.num_blocks:
        del engine
        engine = Engine(model, replace(config, num_blocks=int(n)), runner_class=runner_class)
    return engine


@torch.inference_mode()
def follow(engine: Engine) -> None:
    """Ranks > 0: run each forward rank 0 broadcasts, until it says stop."""
    while (batch := _receive_batch(engine.device)) is not None:
        engine.runner.forward(batch)
