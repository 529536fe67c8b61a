"""Decode steps with static shapes, captured as CUDA graphs (the ModelRunner owns a DecodeGraphs per
kind of step: plain decode, or with speculative decoding the verifying forward, the MTP module
over the same positions, and the MTP module's chained drafts).

An eager decode step launches hundreds of small kernels from Python; a CUDA graph replays them
all in one launch. A graph fixes every shape and address, so a step's inputs live in static
buffers, one set per batch-size bucket (1, 2, 4, 8, then every 16 up to max_num_seqs): token ids
and positions [Bb, W] (W = width, the consecutive tokens a row feeds: 1, or 1 + k for a verifying
decode) and the block table [Bb, nb], nb = ceil(max_model_len / block_size). Each bucket's
buffers make one static Batch (batch.py); inside the graph its slots, its gather map [Bb, T]
(T = nb * block_size) and the sequence lengths are computed from them, and the mask spans all T
positions. A step of B sequences refills the buffers (`load`, padding to the bucket with rows that
read and write only the cache's scratch block), replays (`replay`), and uses the outputs of its B
rows after the graph. Each bucket is captured at its first replay, after two warm-up runs (Triton
compiles and autotunes its kernels there, outside the capture). The forward may read other static
inputs of its owner (the MTP module's hidden states): the owner fills them before `replay`.

Off CUDA the same static inputs run eagerly: that is how the CPU tests check the layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from dsv32.engine.batch import Batch
from dsv32.model import ModelOutput


def buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16, the last covering max_num_seqs."""
    out = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    out += list(range(16, max_num_seqs, 16))
    return out + [max_num_seqs] if not out or out[-1] < max_num_seqs else out


class DecodeGraphs:
    """forward(batch) -> its output (a ModelOutput, or a tuple of tensors): the eager forward each
    graph captures. width: tokens a row feeds, at consecutive positions."""

    def __init__(self, forward: Callable[[Batch], ModelOutput], device: torch.device, block_size: int,
                 max_num_seqs: int, max_model_len: int, scratch_block: int, width: int = 1):
        if not 1 <= width <= block_size:
            raise ValueError(f"width must be in [1, block_size={block_size}], got {width}")
        self.forward, self.block_size, self.scratch, self.width = forward, block_size, scratch_block, width
        self.sizes = buckets(max_num_seqs)
        n, bs = self.sizes[-1], block_size
        self.nb = -(-max_model_len // bs)
        t = self.nb * bs
        self.ids = torch.zeros(n, width, dtype=torch.long, device=device)
        self.pos = torch.arange(width, device=device).repeat(n, 1)
        self.table = torch.full((n, self.nb), scratch_block, dtype=torch.int32, device=device)
        # computed inside the graph from the three above
        self.slots = torch.zeros(n, width, dtype=torch.long, device=device)
        self.gather = torch.zeros(n, t, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        j = torch.arange(t, device=device)                                          # [T] positions
        self.j_block, self.j_off = j // bs, j % bs                                  # their block column, offset
        self.batches = {b: Batch(self.ids[:b], self.pos[:b], self.slots[:b], self.gather[:b], self.table[:b],
                                 self.seq_lens[:b], "mqa", decode_shaped=True, context_len=t, static=True)
                        for b in self.sizes}
        self.offsets = torch.arange(width, device=device)                            # [W]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, ModelOutput]] = {}
        self.pool = None
        self.capture = device.type == "cuda"

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    def load(self, tokens, starts, block_tables: list[list[int]]) -> Batch:
        """Fill the smallest bucket holding these B sequences -> its static Batch, the first B rows
        sampled. tokens: [B, W] the tokens fed (rows of a list, or a tensor on any device; width 1
        also takes a flat list); starts: [B] the first one's position (a list or a tensor);
        block_tables: the sequences' blocks."""
        n, w = len(block_tables), self.width
        b = next(size for size in self.sizes if size >= n)
        rows = [t + [self.scratch] * (self.nb - len(t)) for t in block_tables]
        rows += [[self.scratch] * self.nb] * (b - n)                                # padding rows
        self.ids[:n].copy_(torch.as_tensor(tokens).reshape(n, w), non_blocking=True)
        self.ids[n:b].zero_()
        self.pos[:n].copy_(torch.as_tensor(starts).to(self.pos.device)[:, None] + self.offsets, non_blocking=True)
        self.pos[n:b].copy_(self.offsets.expand(b - n, w))                           # 0..W-1, in the scratch block
        self.table[:b].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        return replace(self.batches[b], sample_rows=tuple(range(n)))

    def replay(self, batch: Batch) -> ModelOutput:
        """The forward of a loaded bucket: its graph replayed on CUDA (captured now if this is the
        bucket's first step), run eagerly elsewhere."""
        b = batch.input_ids.shape[0]
        if not self.capture:
            return self._forward(b)
        if b not in self.graphs:
            self._capture(b)
        graph, out = self.graphs[b]
        graph.replay()
        return out

    def _forward(self, b: int) -> ModelOutput:
        """The step over the first b rows of the buffers: slots, gather and lengths from the table
        and positions, then the model."""
        bs, table, pos = self.block_size, self.table[:b], self.pos[:b]
        torch.add(table.gather(1, pos // bs).long() * bs, pos % bs, out=self.slots[:b])      # [b, W]
        torch.add(table[:, self.j_block].long() * bs, self.j_off, out=self.gather[:b])       # [b, T]
        self.seq_lens[:b].copy_(pos[:, -1] + 1)
        return self.forward(self.batches[b])

    def _capture(self, b: int) -> None:
        """Capture bucket b's graph; the captures' own runs touch only the scratch block, and the
        step's inputs loaded before are put back after."""
        step = [t[:b].clone() for t in (self.ids, self.pos, self.table)]
        self.ids[:b].zero_()
        self.pos[:b].copy_(self.offsets.expand(b, self.width))
        self.table[:b].fill_(self.scratch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes here
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = (graph, out)
        for buf, saved in zip((self.ids, self.pos, self.table), step):
            buf[:b].copy_(saved)
