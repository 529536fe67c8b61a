"""YaRN rotary embeddings.

MLA rotates its rope dims as interleaved pairs (x0,x1),(x2,x3)...; the lightning indexer rotates
its first rope dims as two halves (x[:d/2], x[d/2:]). DeepSeek's first public V3.2 code used the
interleaved layout in the indexer too; that was a bug, fixed on 17 Nov 2025.
"""

import math

import torch

from dsv32.config import ModelConfig, yarn_mscale


def inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [rope_dim/2], YaRN-blended between interpolation and extrapolation;
    computed on `device` (no host-to-device copy: decode steps run inside CUDA graphs)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if not cfg.rope_scaling:
        return freqs
    rs = cfg.rope_scaling
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(n_rot):  # the dim whose wavelength fits n_rot times into orig
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [..., rope_dim/2] fp32 for integer positions [...]."""
    angles = positions.to(torch.float32)[..., None] * inv_freq(cfg, positions.device)
    m = 1.0
    if cfg.rope_scaling:  # YaRN attention factor (1.0 for DeepSeek, where mscale == mscale_all_dim)
        rs = cfg.rope_scaling
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            m = yarn_mscale(cfg.rope_factor, rs["mscale"]) / yarn_mscale(cfg.rope_factor, rs["mscale_all_dim"])
        else:
            m = yarn_mscale(cfg.rope_factor)
    return angles.cos() * m, angles.sin() * m


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA layout. x: [B, S, H, D]; cos, sin: [B, S, D/2]. Rotates the pairs (x[2i], x[2i+1])."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Indexer layout. x: [B, S, H, D]; cos, sin: [B, S, D/2]. Rotates (x[i], x[i + D/2])."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
