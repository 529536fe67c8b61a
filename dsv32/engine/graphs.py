"""Decode steps with static shapes, captured as CUDA graphs.

An eager decode step launches hundreds of small kernels from Python; a CUDA graph replays them
all in one launch. A graph fixes every shape and address, so a step's inputs live in static
buffers, one set per batch-size bucket (1, 2, 4, 8, then every 16 up to max_num_seqs): token ids
and positions [Bb, 1] and the block table [Bb, nb], nb = ceil(max_model_len / block_size).
Inside the graph the cache's slots, its gather map [Bb, T] (T = nb * block_size) and the
sequence lengths are computed from those, and the mask spans all T positions (PagedCache.bind).
A step of B sequences pads to the next bucket with rows that read and write only the cache's
scratch block, refills the buffers, replays, and returns the logits of its B rows; sampling runs
after the graph. Each bucket is captured at its first use, after two warm-up runs (Triton
compiles and autotunes its kernels there, outside the capture).

Off CUDA the same static inputs run eagerly: that is how the CPU tests check the layout.
"""

from __future__ import annotations

import torch

from dsv32.engine.cache import PagedCache


def buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16, the last covering max_num_seqs."""
    out = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    out += list(range(16, max_num_seqs, 16))
    return out + [max_num_seqs] if not out or out[-1] < max_num_seqs else out


class DecodeGraphs:
    def __init__(self, model, cache: PagedCache, max_num_seqs: int, max_model_len: int, scratch_block: int):
        self.model, self.cache, self.scratch = model, cache, scratch_block
        self.sizes = buckets(max_num_seqs)
        dev, n, bs = cache.kv.device, self.sizes[-1], cache.block_size
        self.nb = -(-max_model_len // bs)
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.table = torch.full((n, self.nb), scratch_block, dtype=torch.int32, device=dev)
        j = torch.arange(self.nb * bs, device=dev)                                  # [T] positions
        self.j_block, self.j_off = j // bs, j % bs                                  # their block column, offset
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.capture = dev.type == "cuda"

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    def _forward(self, b: int) -> torch.Tensor:
        """The step over the first b rows of the buffers -> logits [b, V]."""
        bs, table, pos = self.cache.block_size, self.table[:b], self.pos[:b]
        slots = table.gather(1, pos // bs).long() * bs + pos % bs                  # [b, 1]
        gather = table[:, self.j_block].long() * bs + self.j_off                    # [b, T]
        self.cache.bind(slots, gather, table, (pos[:, 0] + 1).int())
        out = self.model(self.ids[:b], cache=self.cache, positions=pos, sparse=True, mode="mqa")
        return out.logits[:, -1]

    def _capture(self, b: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes here
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = (graph, logits)

    def run(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One decode step of B sequences (their last token, its position, their block tables)
        -> logits [B, V]."""
        n = len(tokens)
        b = next(size for size in self.sizes if size >= n)
        if self.capture and b not in self.graphs:
            self.ids[:b].zero_()
            self.pos[:b].zero_()
            self.table[:b].fill_(self.scratch)  # the captures' own runs touch only the scratch block
            self._capture(b)
        rows = [t + [self.scratch] * (self.nb - len(t)) for t in block_tables]
        rows += [[self.scratch] * self.nb] * (b - n)                                # padding rows
        pad = [0] * (b - n)
        self.ids[:b, 0].copy_(torch.tensor(tokens + pad), non_blocking=True)
        self.pos[:b, 0].copy_(torch.tensor(positions + pad), non_blocking=True)
        self.table[:b].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        if self.capture:
            graph, logits = self.graphs[b]
            graph.replay()
        else:
            logits = self._forward(b)
        return logits[:n]
