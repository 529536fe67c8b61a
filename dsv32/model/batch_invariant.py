"""Batch-invariant execution: a token's numbers do not depend on the tokens beside it.

The engine decodes B tokens per forward over a paged cache; the trainer replays whole sequences in
one forward. The same row of activations then meets GEMMs of different shapes, and BLAS libraries
(MKL, cuBLAS) choose their kernel by shape: a GEMV for one row, other tilings, split-K for others,
and a batched GEMM whose entries depend on how many there are. The row's dot products are summed in
a different order and its last bits differ, so the engine's log-probs are not the trainer's bit
for bit (docs/rl.md: 87-92% in bf16). The fix (He et al. 2025, "Defeating Nondeterminism in LLM
Inference"; torchtitan's bitwise-identical RL) is to make every reduction's order a function of
the row alone.

Two parts, applied from outside the layers:
  - `batch_invariant()`, a torch dispatch mode: every matrix product (aten mm, addmm, bmm,
    _grouped_mm; F.linear and einsum lower to them) runs as fixed-shape GEMMs of TILE rows, each
    tile copied into its own freshly allocated (aligned) buffer, so every output row is computed
    by the same kernel on the same operands whatever M, the batch count or the memory offset.
  - `Step.batch_invariant` (the model's forward option): sparse attention in absorbed MQA mode over
    a fixed-width key set per query (index_topk slots, sorted, -1 padding first), so each query's
    softmax and value sum reduce over the same slots in the same order in a decode step and in a
    full-sequence forward (MLA; `fixed_key_set`).
  - element-wise functions whose SIMD body and scalar tail round differently (sigmoid, silu, found
    with dsv32/rl/bisect.py) run over a flat copy padded to a multiple of VEC elements.
  - reductions over each row's last dimension (RMSNorm's mean, softmax, log-softmax, logsumexp):
    per row on the CPU already (tested); on CUDA, whose kernels lay threads out by the row count,
    they run TILE rows at a time (not yet measured on a GPU). The mode is slow (a Python loop of small GEMMs): it is a correctness mode, measured in
bench, not a serving mode; on GPU the same shape discipline needs fixed-tiling Triton kernels.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

TILE = 16   # rows of every GEMM the mode runs


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """t in a contiguous buffer of its own (the allocator aligns it), unless it already is one."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.data_ptr() % 64 == 0:
        return t
    return t.contiguous() if not t.is_contiguous() else t.clone()


def tiled_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N], each TILE rows of a (zero-padded) by one GEMM of shape [TILE, K] x [K, N]
    on aligned buffers: row i of the result does not depend on M or on the other rows."""
    m, k = a.shape
    b = _fresh(b)
    out = torch.empty(m, b.shape[1], dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    tile = torch.zeros(TILE, k, dtype=a.dtype, device=a.device)
    for i in range(0, m, TILE):
        n = min(TILE, m - i)
        tile.zero_()
        tile[:n] = a[i:i + n]
        out[i:i + n] = torch.mm(tile, b)[:n]
    return out


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([tiled_mm(a[i], b[i]) for i in range(a.shape[0])]) if a.shape[0] else \
        torch.empty(0, a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [R, K] rows grouped by offs (group g: rows offs[g-1]..offs[g]-1) times b [G, K, N]."""
    out = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = tiled_mm(a[start:end], b[g])
        start = end
    return out


# element-wise functions whose vectorised body and scalar tail round differently (seen for sigmoid
# and silu with AVX-512): an element's bits would depend on where the tensor ends
PADDED = {aten.sigmoid.default, aten.silu.default, aten.tanh.default, aten.gelu.default, aten.erf.default}
VEC = 64    # elements: a multiple of every SIMD loop's stride, so no element falls in a tail


def padded_pointwise(func, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """func over x's elements laid out flat and zero-padded to a multiple of VEC elements, so each
    one goes through the vectorised body whatever x's size."""
    n = x.numel()
    flat = torch.zeros(n + (-n) % VEC, dtype=x.dtype, device=x.device)
    flat[:n] = x.reshape(-1)
    return func(flat, *args, **kwargs)[:n].view(x.shape)


# reductions over the last dimension: per row on the CPU already; a GPU kernel's launch layout
# (threads per row) follows the row count, so on CUDA they run over TILE rows at a time
ROW_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.logsumexp.default, aten.amax.default}
ROW_SOFTMAX = {aten._softmax.default, aten._log_softmax.default}


def _last_dim(x: torch.Tensor, dim) -> bool:
    dims = [dim] if isinstance(dim, int) else list(dim or [])
    return x.dim() >= 2 and len(dims) == 1 and dims[0] % x.dim() == x.dim() - 1


def row_tiled(func, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """A last-dimension reduction or softmax of x, TILE rows at a time (zero-padded): each row's
    result comes from the same launch shape [TILE, D] whatever the number of rows."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    tile = torch.zeros(TILE, d, dtype=x.dtype, device=x.device)
    softmax = func in ROW_SOFTMAX
    keepdim = False if softmax else (args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    rest = dict(kwargs, keepdim=True) if not softmax else {}
    parts = []
    for i in range(0, rows.shape[0], TILE):
        n = min(TILE, rows.shape[0] - i)
        tile.zero_()
        tile[:n] = rows[i:i + n]
        out = func(tile, -1, args[2]) if softmax else func(tile, [-1], *args[3:], **rest)
        parts.append(out[:n].clone())
    out = torch.cat(parts)
    return out.view(x.shape) if softmax else out.view(*x.shape[:-1], *((1,) if keepdim else ()))


class BatchInvariant(TorchDispatchMode):
    """The dispatch mode behind `batch_invariant()`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.mm.default:
            return tiled_mm(*args)
        if func is aten.addmm.default:
            bias, a, b = args
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            return beta * bias + alpha * tiled_mm(a, b)
        x = args[0] if args else None
        if (func in ROW_REDUCTIONS or func in ROW_SOFTMAX) and isinstance(x, torch.Tensor) and x.is_cuda \
                and _last_dim(x, args[1] if len(args) > 1 else kwargs.get("dim")):
            return row_tiled(func, x, args, {k: v for k, v in kwargs.items() if k != "dim"})
        if func in PADDED:
            return padded_pointwise(func, *args, **kwargs)
        if func is aten.bmm.default:
            return _bmm(*args)
        if func is aten._grouped_mm.default:
            a, b = args[:2]
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            if offs is None or a.dim() != 2 or b.dim() != 3 or kwargs.get("bias") is not None:
                raise NotImplementedError("batch-invariant _grouped_mm: only 2-D rows by 3-D groups with offs")
            return _grouped_mm(a, b, offs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # under inference_mode linear, matmul, einsum arrive whole: lower them, in this mode
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


def batch_invariant() -> BatchInvariant:
    """`with batch_invariant(): model(...)`: matrix products in fixed-shape tiles (module docstring)."""
    return BatchInvariant()


def fixed_key_set(idx: torch.Tensor, k: int) -> torch.Tensor:
    """Selected key positions idx [B, S, k'] (k' <= k, -1 = none, any order) -> [B, S, k]: padded
    with -1 to k slots and sorted, -1s first: the layout of a replayed selection (unpack_selection),
    so a query reduces over the same slots in the same order in any forward."""
    if idx.shape[-1] < k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], k - idx.shape[-1]), -1)], -1)
    return idx.sort(-1).values
