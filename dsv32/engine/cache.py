"""The paged cache: blocks of 64 tokens holding, per layer, the MLA latent + rope key and the
indexer key; a block manager with prefix caching by block hash.

Two layouts [kernel-anchors §2.1, §2.2, §3]:
  bf16: per token latent [kv_lora_rank] + rope key [qk_rope_head_dim] + indexer key [index_head_dim]
        (a converted Llama-family model stores its keys and values in the first two);
  fp8:  MLA rows of 656 bytes per token = 512 e4m3 + 4 fp32 scales (one per 128) + 64 bf16 rope
        dims; indexer pages, DeepGEMM's layout: per block, block_size keys of 128 e4m3 bytes,
        then their block_size fp32 scales (132 bytes per token; keys 16-byte aligned).
Reads dequantise to the model's dtype (the plain-torch path). Decode steps of a V3.2 model read
the bytes directly instead: `paged_view` hands one layer's raw rows and the block tables to the
paged DSA kernels (indexer logits, sparse MLA decode), so no [B, T] copy of the cache is made.
Where a forward writes and what it reads is its Batch's (batch.py), never state of the cache.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass

import torch

from dsv32.config import ModelConfig
from dsv32.engine.batch import Batch
from dsv32.kernels.indexer import fp8_pages
from dsv32.model.fp8 import FP8, FP8_MAX


def _quant_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """x: [N, D] -> bytes [N, D + 4 * D/group]: e4m3 values then fp32 scales (amax / 448)."""
    n, d = x.shape
    xg = x.float().view(n, d // group, group)
    scale = xg.abs().amax(-1, keepdim=True).clamp(min=1e-8) / FP8_MAX
    q = (xg / scale).to(FP8).view(n, d)
    return torch.cat([q.view(torch.uint8), scale.view(n, -1).contiguous().view(torch.uint8)], -1)


def _dequant_rows(b: torch.Tensor, d: int, group: int, dtype) -> torch.Tensor:
    """Inverse of _quant_rows. b: [..., D + 4 * D/group] bytes -> [..., D]."""
    shape = b.shape[:-1]
    q = b[..., :d].contiguous().view(FP8).float().view(*shape, d // group, group)
    scale = b[..., d:].contiguous().view(torch.float32)[..., None]
    return (q * scale).view(*shape, d).to(dtype)


@dataclass
class PagedView:
    """One layer of the paged cache as the decode kernels read it (global slot = block * block_size
    + offset)."""
    kv: torch.Tensor           # [num_slots, C + R] bf16, or [num_slots, 656] uint8 (FP8)
    ik: torch.Tensor           # [num_slots, Di] bf16, or FP8 pages [num_blocks, block_size * (Di + 4)] uint8
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor     # [B] int32, this step's tokens included
    gather: torch.Tensor       # [B, T] global slot of each position
    block_size: int


class PagedCache:
    """Per-layer block storage, rows [num_blocks * block_size, bytes-or-dims] (FP8 indexer keys:
    pages [num_blocks, block_size * (Di + 4)] bytes). It holds no per-step state: a forward reads and
    writes it through `bind(batch)`, its Batch saying where. paged_decode=False keeps every step on
    the gathering path (the reference). max_len: the longest sequence it serves. mtp_layers: storage
    for that many MTP modules after the main layers (layer ids num_hidden_layers..; speculative
    decoding's drafts keep their own latents and indexer keys, in the same blocks as the main ones)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 64, fp8: bool = False,
                 dtype=torch.bfloat16, device="cpu", paged_decode: bool = True, max_len: int | None = None,
                 mtp_layers: int = 0):
        self.cfg, self.num_blocks, self.block_size, self.fp8, self.dtype = cfg, num_blocks, block_size, fp8, dtype
        c, r, di = cfg.cache_widths
        self.kv_group = min(128, c)
        n, layers = num_blocks * block_size, cfg.num_hidden_layers + mtp_layers
        if fp8 and not hasattr(cfg, "kv_lora_rank"):
            raise ValueError("the FP8 cache layouts are DeepSeek's, for MLA latents; this model has none")
        if fp8:
            kv_bytes = c + 4 * (c // self.kv_group) + 2 * r  # 656 for V3.2
            self.kv = torch.zeros(layers, n, kv_bytes, dtype=torch.uint8, device=device)
            self.ik = torch.zeros(layers, num_blocks, block_size * (di + 4), dtype=torch.uint8, device=device)
        else:
            self.kv = torch.zeros(layers, n, c + r, dtype=dtype, device=device)
            self.ik = torch.zeros(layers, n, di, dtype=dtype, device=device)
        self.max_len = max_len or cfg.max_position_embeddings
        # the sparse MLA decode kernel's layouts: MLA latents in groups of 128, bf16 or FP8 rows
        self.paged_decode = paged_decode and hasattr(cfg, "kv_lora_rank") and c % 128 == 0 and \
            self.kv.dtype in (torch.bfloat16, torch.uint8)

    def bytes_per_token(self) -> int:
        """Of one layer: 656 + 132 for V3.2 in FP8."""
        return (self.kv[0].numel() * self.kv.element_size() + self.ik[0].numel() * self.ik.element_size()) \
            // (self.num_blocks * self.block_size)

    def bind(self, batch: Batch) -> BoundCache:
        """The cache as the forward of `batch` sees it: the model's `cache` argument."""
        return BoundCache(self, batch)

    def write(self, layer: int, kv, pe, ik, slots: torch.Tensor) -> None:
        """Write entries kv, pe, ik [B, S, ...] at slots [B, S]."""
        c = self.cfg.cache_widths[0]
        slots = slots.flatten()
        if self.fp8:
            pe_bytes = pe.reshape(-1, pe.shape[-1]).to(torch.bfloat16).contiguous().view(torch.uint8)
            self.kv[layer][slots] = torch.cat([_quant_rows(kv.reshape(-1, c), self.kv_group), pe_bytes], -1)
            di = ik.shape[-1]
            rows = _quant_rows(ik.reshape(-1, di), di)                                  # [N, Di + 4]
            keys, scales = fp8_pages(self.ik[layer], di, self.block_size)
            block, off = slots // self.block_size, slots % self.block_size
            keys[block, off] = rows[:, :di]
            scales[block, off] = rows[:, di:].contiguous().view(torch.float32)[:, 0]
        else:
            self.kv[layer][slots] = torch.cat([kv, pe], -1).reshape(len(slots), -1).to(self.dtype)
            self.ik[layer][slots] = ik.reshape(len(slots), -1).to(self.dtype)

    def read(self, layer: int, gather: torch.Tensor):
        """The entries at slots gather [B, T], in the model's dtype: kv, pe, ik [B, T, ...]."""
        c, di = self.cfg.cache_widths[0], self.cfg.cache_widths[2]
        if self.fp8:
            rows = self.kv[layer][gather]                                               # [B, T, bytes]
            split = c + 4 * (c // self.kv_group)
            kv_all = _dequant_rows(rows[..., :split], c, self.kv_group, self.dtype)
            pe_all = rows[..., split:].contiguous().view(torch.bfloat16).to(self.dtype)
            keys, scales = fp8_pages(self.ik[layer], di, self.block_size)
            block, off = gather // self.block_size, gather % self.block_size              # [B, T]
            ik_all = (keys[block, off].view(FP8).float() * scales[block, off][..., None]).to(self.dtype)
            return kv_all, pe_all, ik_all
        both = self.kv[layer][gather]
        return both[..., :c], both[..., c:], self.ik[layer][gather]


@dataclass(frozen=True)
class BoundCache:
    """The paged cache for one forward: the storage, and the Batch saying where this forward's
    entries go (slots) and what each sequence reads (gather). It offers the model's cache hooks
    (see KVCache): `update`, and for decode steps `write` + `paged_view`."""
    cache: PagedCache
    batch: Batch

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def context_len(self) -> int | None:
        """T when fixed by static decode inputs (a CUDA graph's), else None."""
        return self.batch.context_len

    def write(self, layer: int, kv, pe, ik) -> None:
        """Write this forward's entries kv, pe, ik [B, S, ...] at its slots."""
        self.cache.write(layer, kv, pe, ik, self.batch.slots)

    def update(self, layer: int, kv, pe, ik, positions):
        """The model's cache hook: write [B, S, ...] entries at this forward's slots, return every
        sequence's entries [B, T, ...] in the model's dtype."""
        self.write(layer, kv, pe, ik)
        return self.cache.read(layer, self.batch.gather)

    def paged_view(self, layer: int) -> PagedView | None:
        """The raw rows of one layer and this forward's block tables for the paged decode kernels,
        or None where they do not apply (a prefill chunk, a layout they do not read, paged_decode off)."""
        if not (self.cache.paged_decode and self.batch.decode_shaped):
            return None
        b = self.batch
        return PagedView(self.cache.kv[layer], self.cache.ik[layer], b.block_table, b.seq_lens, b.gather,
                         self.cache.block_size)


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """Chained hash: a block is reusable only if the whole prefix before it matches too."""
    h = hashlib.sha256(parent or b"")
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class BlockManager:
    """Allocates cache blocks to sequences; full blocks are registered by hash so that a later
    sequence with the same prefix reuses them (ref-counted). Freed blocks keep their hash until
    they are handed out again, so a prefix survives its sequence (LRU order). hash_overlap: tokens
    after a block that its hash also covers. Speculative decoding sets 1: the MTP module's entry at
    a block's last position is built from the token after it, so a block is only reusable where that
    token matches too."""

    def __init__(self, num_blocks: int, block_size: int = 64, hash_overlap: int = 0):
        self.block_size, self.hash_overlap = block_size, hash_overlap
        self.free: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, block: int | None = None) -> int:
        if block is None:
            block = self.free.popleft()
            h = self.hash_of.pop(block, None)
            if h is not None and self.by_hash.get(h) == block:
                del self.by_hash[h]
        else:
            self.free.remove(block)
        self.ref[block] = 1
        return block

    def lookup_prefix(self, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """Cached blocks (and their hashes) holding the longest block-aligned prefix of tokens,
        leaving at least one token to compute."""
        bs, blocks, hashes = self.block_size, [], []
        for i in range(0, len(tokens) - 1 - (len(tokens) - 1) % bs, bs):
            h = block_hash(hashes[-1] if hashes else None, tokens[i:i + bs + self.hash_overlap])
            b = self.by_hash.get(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
        return blocks, hashes

    def blocks_needed(self, n_tokens: int, cached: list[int]) -> int:
        fresh = -(-n_tokens // self.block_size) - len(cached)
        return fresh + sum(1 for b in cached if self.ref[b] == 0)  # reviving a free block uses it up

    def allocate(self, n_tokens: int, cached: list[int]) -> list[int]:
        table = []
        for b in cached:
            if self.ref[b] == 0:
                self._take(b)
            else:
                self.ref[b] += 1
            table.append(b)
        while len(table) * self.block_size < n_tokens:
            table.append(self._take())
        return table

    def append_slot(self, table: list[int], n_tokens: int) -> bool:
        """Grow table to hold n_tokens; False if no block is free."""
        while len(table) * self.block_size < n_tokens:
            if not self.free:
                return False
            table.append(self._take())
        return True

    def register(self, block: int, h: bytes) -> None:
        """Make a full block findable by its prefix hash."""
        if h not in self.by_hash:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def release(self, table: list[int]) -> None:
        for b in reversed(table):  # later blocks go first: they are the least reusable
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)
