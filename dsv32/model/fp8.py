"""Block-scaled FP8 (e4m3), as DeepSeek ships and serves V3.2.

Weights: one fp32 scale per 128x128 block, stored as `weight_scale_inv` (the factor that turns the
e4m3 values back into real ones: w = w_fp8 * scale_inv). Activations: one scale per 1x128 block
along the last dim, rounded up to a power of two ("ue8m0") in the official indexer.
"""

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv32.kernels import use_triton
from dsv32.kernels.fp8_gemm import act_quant, cublas_weight_scale, fp8_gemm, fp8_gemm_cublas, fp8_grouped_gemm

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

log = logging.getLogger(__name__)


def _pad_to(x: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    m, n = x.shape
    return F.pad(x, (0, -n % bn, 0, -m % bm))


def weight_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128),
                   dtype=torch.bfloat16, offset=(0, 0)) -> torch.Tensor:
    """w: [M, N] e4m3; scale_inv: [ceil((r+M)/bm), ceil((c+N)/bn)] fp32 -> [M, N] in dtype, where
    offset (r, c) is where w starts inside its first block (a shard cut from a larger weight)."""
    (m, n), (bm, bn), (r, c) = w.shape, block, offset
    expected = (-(-(r + m) // bm), -(-(c + n) // bn))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {m}x{n} "
                         f"at offset {tuple(offset)} with {bm}x{bn} blocks (expected {expected})")
    s = scale_inv.float().repeat_interleave(bm, 0).repeat_interleave(bn, 1)[r:r + m, c:c + n]
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


def fp8_backend(device) -> str:
    """The multiply fp8_linear runs on `device` (for log lines): cuBLASLt on an H100, else Triton on
    a GPU, else the torch reference (the same FP8 arithmetic in fp32, no FP8 tensor cores)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        return "cuBLASLt blockwise FP8 GEMM"
    if use_triton(torch.empty(0, device=device)):  # a GPU, or the interpreter where forced
        return "Triton FP8 GEMM"
    return "torch reference of the FP8 GEMM"


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """The one FP8 linear of the serving path: x [..., K] -> [..., N] in x's dtype, x quantised per
    1x128 block (act_quant) and multiplied with weight [N, K] e4m3 and its 128x128 scales
    scale_inv [ceil(N/128), K/128] (fp8_kernel_misfit says whether a weight fits): cuBLASLt's
    blockwise recipe on an H100, the Triton kernel on other GPUs, the torch reference on CPU.
    Both FP8Linear here and the sharded layers of dsv32.parallel multiply through it."""
    shape = x.shape
    q, scale = act_quant(x.reshape(-1, shape[-1]))
    if x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0) and cublas_fp8_fits(weight):
        # cuBLASLt's blockwise recipe: 1.7x our Triton GEMM at M=4096 on an H100 (bench/results)
        y = fp8_gemm_cublas(q, scale, weight, cublas_weight_scale(scale_inv), x.dtype)
    else:
        y = fp8_gemm(q, scale, weight, scale_inv, out_dtype=x.dtype)
    return y.view(*shape[:-1], weight.shape[0])


def cublas_fp8_fits(weight: torch.Tensor) -> bool:
    """Whether cuBLASLt's FP8 GEMM takes this weight [N, K]: it refuses a second operand [K, N] whose
    dimensions are not multiples of 16 (seen on an H100: N = 136 raised "mat2 shape (128x136) must be
    divisible by 16"); such a weight goes through the Triton kernel instead."""
    n, k = weight.shape
    return n % 16 == 0 and k % 16 == 0


def fp8_kernel_misfit(weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128),
                      offset=(0, 0)) -> str | None:
    """Why fp8_linear cannot take this e4m3 weight [N, K] (None: it can). It needs 128x128 blocks
    that start at the weight's first row and column (a shard cut on block boundaries), K a
    multiple of 128 (activations are quantised per 1x128) and scale_inv [ceil(N/128), K/128]."""
    n, k = weight.shape
    if tuple(block) != (128, 128):
        return f"{block[0]}x{block[1]} scale blocks, not 128x128"
    if tuple(offset) != (0, 0):
        return f"the shard starts inside a 128x128 block (at row {offset[0]}, column {offset[1]} of it)"
    if k % 128:
        return f"in_features {k} is not a multiple of 128"
    if tuple(scale_inv.shape) != (-(-n // 128), k // 128):
        return f"scale_inv {tuple(scale_inv.shape)} is not [ceil({n}/128), {k}/128]"
    return None


def fp8_paths(model: nn.Module) -> dict[str, list[str]]:
    """The modules of `model` holding e4m3 weights, by the path their forward takes: "kernel"
    (fp8_linear) or "dequantise" (the weight dequantised per call; a shard that cuts a block)."""
    out = {"kernel": [], "dequantise": []}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dtype == FP8 and hasattr(m, "weight_scale_inv"):
            misfit = fp8_kernel_misfit(w, m.weight_scale_inv, getattr(m, "fp8_block", (128, 128)),
                                       getattr(m, "fp8_offset", (0, 0)))
            out["kernel" if misfit is None else "dequantise"].append(name)
    return out


def log_fp8_paths(model: nn.Module, device) -> dict[str, list[str]]:
    """One log line: how many FP8 linears multiply through fp8_linear (and on what), how many
    dequantise per call. Returns fp8_paths(model)."""
    paths = fp8_paths(model)
    kernel, deq = paths["kernel"], paths["dequantise"]
    log.info("FP8 linears: %d through act_quant + %s, %d dequantised per call%s", len(kernel),
             fp8_backend(device), len(deq), f" (e.g. {', '.join(deq[:3])})" if deq else "")
    return paths


class FP8Linear(nn.Module):
    """A bias-free linear layer on block-scaled FP8 weights, as DeepSeek serves V3.2: the input is
    quantised per 1x128 block and multiplied in FP8 (cuBLASLt's blockwise recipe on an H100, the
    Triton kernel on other GPUs, the torch reference on CPU).

    Buffers, named as in the checkpoint: `weight` e4m3 [out, in] and `weight_scale_inv` fp32
    [ceil(out/128), in/128]. Inference only (no gradients), and keep it out of `model.to(dtype)`:
    the FP8 weights and fp32 scales must stay as they are.
    """

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        if in_features % 128:
            raise ValueError(f"in_features {in_features} is not a multiple of the 128-wide FP8 block")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(-(-out_features // 128), in_features // 128,
                                                             dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantise a bias-free nn.Linear's weight into 128x128 blocks."""
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias; the linear layer has one")
        m = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        m.weight, m.weight_scale_inv = weight_quant(linear.weight.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out] in x's dtype."""
        return fp8_linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 128x128 blocks"


def to_fp8_linears(model: nn.Module, select, quantize: bool = True) -> list[str]:
    """Replace every bias-free nn.Linear whose qualified name passes `select(name)` and whose input
    width is a multiple of 128 by an FP8Linear: quantised from its weight, or (quantize=False)
    empty, for a checkpoint loader to fill. Returns the replaced names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is None
             and m.in_features % 128 == 0 and select(n)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        linear = getattr(owner, child)
        new = (FP8Linear.from_linear(linear) if quantize
               else FP8Linear(linear.in_features, linear.out_features, device=linear.weight.device))
        setattr(owner, child, new)
    return names


def stack_fp8_experts(experts: nn.ModuleList) -> tuple[torch.Tensor, ...]:
    """Routed experts (MLPs of FP8Linear) -> (w13 [E, 2I, D] e4m3 with gate rows then up rows,
    s13 [E, 2I/128, D/128], w2 [E, D, I], s2 [E, D/128, I/128]): the grouped GEMM's operands."""
    if experts[0].gate_proj.out_features % 128:
        raise ValueError("moe_intermediate_size must be a multiple of 128 to stack gate and up blocks")
    w13 = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in experts])
    s13 = torch.stack([torch.cat([m.gate_proj.weight_scale_inv, m.up_proj.weight_scale_inv]) for m in experts])
    w2 = torch.stack([m.down_proj.weight for m in experts])
    s2 = torch.stack([m.down_proj.weight_scale_inv for m in experts])
    return w13, s13, w2, s2


def moe_experts_fp8(x, ids, weights, w13, s13, w2, s2) -> torch.Tensor:
    """The routed experts of one MoE layer as two grouped FP8 GEMMs, without a host sync.
    x: [T, D]; ids, weights: [T, k] (the gate's choice) -> [T, D]: sum_j weights[t, j] * expert
    ids[t, j] applied to x[t]. Operands from stack_fp8_experts."""
    t, k = ids.shape
    flat = ids.flatten()
    order = flat.argsort(stable=True)                               # [T*k] (token, slot) pairs by expert
    tok = order // k
    counts = torch.zeros(w13.shape[0], dtype=torch.long, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))             # bincount would sync
    offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)       # [E+1]
    q, s = act_quant(x)                                             # each token quantised once
    h = fp8_grouped_gemm(q[tok], s.t()[:, tok].t(), w13, s13, offsets, out_dtype=x.dtype)  # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    q, s = act_quant(F.silu(gate) * up)
    y = fp8_grouped_gemm(q, s, w2, s2, offsets, out_dtype=torch.float32)       # [T*k, D]
    y = y * weights.flatten()[order, None]
    return torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)
