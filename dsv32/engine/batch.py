"""Batch: one forward's inputs, built by the ModelRunner and passed down with the forward.

An engine step runs a forward per group of prefill chunks over one (start, end) range, then one
for every decode. Everything such a forward needs from the engine is in its Batch: the token ids
and their positions, the cache slot each new entry is written to, the slots each sequence reads
back (its positions 0..T-1), its block table and length (what the paged decode kernels read), the
MLA mode, and which rows are sampled. The paged cache holds storage only: `PagedCache.bind(batch)`
is the cache the model sees for that one forward. A Batch is all a follower rank needs to replay a
forward (parallel/engine.py).

Slot = block * block_size + offset, a row of the cache's storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DECODE_TOKENS = 16  # the most consecutive new tokens per row a forward runs on the paged decode kernels


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor          # [B, S] the tokens fed
    positions: torch.Tensor          # [B, S] their positions
    slots: torch.Tensor              # [B, S] the cache slot each fed token's entries are written to
    gather: torch.Tensor             # [B, T] the slot of each position 0..T-1 of each sequence (read);
                                     # beyond a sequence's own length: padding the causal mask hides
    block_table: torch.Tensor        # [B, nb] int32, each row padded
    seq_lens: torch.Tensor           # [B] int32: tokens in the cache after this forward
    mode: str = "mqa"                # MLA execution mode: "mha" (short prefill chunks) or "mqa"
    sample_rows: tuple[int, ...] = ()  # rows whose last position's logits are sampled
    return_topk: bool = False        # keep each layer's selected keys (what RL records)
    decode_shaped: bool = False      # absorbed MQA over 1 to DECODE_TOKENS consecutive new tokens per row
                                     # (a decode, or a verifying one with drafts): what the paged decode
                                     # kernels serve
    context_len: int | None = None   # T fixed by static inputs (graph-shaped decode: the whole table);
                                     # None: one past the largest position
    static: bool = False             # a DecodeGraphs bucket's buffers, refilled each step (graphs.py)

    @classmethod
    def build(cls, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: list[list[int]],
              block_size: int, mode: str = "mqa", sample_rows: tuple[int, ...] = (),
              return_topk: bool = False) -> Batch:
        """The Batch of tokens input_ids [B, S] at positions [B, S] of the sequences whose cache
        blocks are block_tables (one list per row), on input_ids' device."""
        dev, bs = input_ids.device, block_size
        width = max(len(t) for t in block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], device=dev)  # [B, nb]
        positions = positions.to(dev)
        slots = table.gather(1, positions // bs) * bs + positions % bs                        # [B, S]
        j = torch.arange(int(positions.max()) + 1, device=dev)                                # [T]
        gather = table[:, (j // bs).clamp(max=width - 1)] * bs + j % bs                       # [B, T]
        s = positions.shape[1]
        decode_shaped = mode == "mqa" and (s == 1 or (s <= DECODE_TOKENS and bool(
            (positions == positions[:, :1] + torch.arange(s, device=dev)).all())))
        return cls(input_ids, positions, slots, gather, table.int(), (positions.amax(1) + 1).int(), mode,
                   tuple(sample_rows), return_topk, decode_shaped)
