"""Block-scaled FP8 (e4m3), as DeepSeek ships and serves V3.2.

Weights: one fp32 scale per 128x128 block, stored as `weight_scale_inv` (the factor that turns the
e4m3 values back into real ones: w = w_fp8 * scale_inv). Activations: one scale per 1x128 block
along the last dim, rounded up to a power of two ("ue8m0") in the official indexer.
"""

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _pad_to(x: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    m, n = x.shape
    return F.pad(x, (0, -n % bn, 0, -m % bm))


def weight_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128),
                   dtype=torch.bfloat16) -> torch.Tensor:
    """w: [M, N] e4m3; scale_inv: [ceil(M/bm), ceil(N/bn)] fp32 -> [M, N] in dtype."""
    (m, n), (bm, bn) = w.shape, block
    expected = (-(-m // bm), -(-n // bn))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {m}x{n} "
                         f"with {bm}x{bn} blocks (expected {expected})")
    s = scale_inv.float().repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:m, :n]
    return (w.float() * s).to(dtype)


def weight_quant(w: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [M, N] -> (e4m3 [M, N], scale_inv fp32 [ceil(M/bm), ceil(N/bn)]); amax maps to 448."""
    (m, n), (bm, bn) = w.shape, block
    wp = _pad_to(w.float(), bm, bn)
    blocks = wp.view(wp.shape[0] // bm, bm, wp.shape[1] // bn, bn)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [Mb, Nb]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view_as(wp)[:m, :n].contiguous(), scale_inv


def act_quant_dequant(x: torch.Tensor, block: int = 128, pow2_scale: bool = True) -> torch.Tensor:
    """Simulate 1xblock FP8 activation quantisation along the last dim: quantise, then dequantise."""
    d = x.shape[-1]
    blk = min(block, d)
    if d % blk:
        raise ValueError(f"last dim {d} is not a multiple of the FP8 block {blk}")
    xb = x.float().unflatten(-1, (d // blk, blk))
    scale = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4) / FP8_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (q.float() * scale).flatten(-2).to(x.dtype)
