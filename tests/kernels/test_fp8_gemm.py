"""Block-scaled FP8 GEMMs: the Triton kernels (the interpreter on CPU) against the torch
references, the references against FP8 arithmetic done by hand, and FP8Linear / keep_fp8 loading."""

import pytest
import torch
import torch.nn as nn

from dsv32 import load_model, save_model
from dsv32.config import preset
from dsv32.kernels import force
from dsv32.kernels import fp8_gemm as K
from dsv32.model import Transformer
from dsv32.model.fp8 import (FP8, FP8Linear, act_quant_dequant, moe_experts_fp8, stack_fp8_experts,
                             to_fp8_linears, weight_dequant, weight_quant)
from dsv32.model.moe import MoE


def _dequant_act(q, s):
    return q.float() * s.repeat_interleave(128, 1)


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # small cases: interpreted on CPU, compiled on a GPU


@pytest.fixture(autouse=True)
def _default_device():
    """Tensors made without a device live on DEV: the small cases run compiled on a GPU machine."""
    with torch.device(DEV):
        yield

def _operands(m, n, k, dtype=torch.bfloat16, device=DEV):
    a, sa = K.act_quant_ref(torch.randn(m, k, device=device, dtype=dtype))
    b, sb = weight_quant(torch.randn(n, k, device=device) * 0.05)
    return a, sa, b, sb


def _close(out, ref, tol):
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


# ---- act_quant

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [True, False])
def test_act_quant_kernel_matches_reference_and_model_rule(dtype, pow2):
    x = torch.randn(37, 384, dtype=dtype) * 3
    x[5, 128:256] = 0                     # an all-zero block: amax clamps to 1e-4
    x[6, :128] = torch.linspace(-7, 7, 128, dtype=dtype)  # amax / 448 = 1/64 exactly
    q0, s0 = K.act_quant_ref(x, pow2)
    with force("triton"):
        q1, s1 = K.act_quant(x, pow2)
    assert q1.dtype == FP8 and s1.shape == (37, 3) and s1.stride() == (1, 37)  # M-major scales
    assert torch.equal(s0, s1) and torch.equal(q0.view(torch.uint8), q1.view(torch.uint8))
    assert s1[6, 0] == 1 / 64 and s1[5, 1] == (2.0 ** -22 if pow2 else torch.tensor(1e-4) / 448)
    # the model's simulation of the same quantisation gives the same numbers
    assert torch.equal(_dequant_act(q1, s1).to(dtype), act_quant_dequant(x, pow2_scale=pow2))


def test_act_quant_rounds_to_nearest_even_by_hand():
    vals = torch.tensor([448.0, 31.0, 17.0, 100.0, 68.0, 29.0, 31.5, -0.0029296875, 0.0009765625, -0.0003])
    want = torch.tensor([448.0, 32.0, 16.0, 96.0, 64.0, 28.0, 32.0, -0.00390625, 0.0, -0.0])  # e4m3, ties to even
    x = torch.zeros(2, 128)
    x[:, :10] = vals
    for backend in ("ref", "triton"):
        with force(backend):
            q, s = K.act_quant(x)
        assert torch.equal(s, torch.ones(2, 1)), backend
        assert torch.equal(q[:, :10].float(), want.expand(2, 10)), backend
        assert q[:, 9].view(torch.uint8).eq(0x80).all(), backend  # a negative value rounding to 0 keeps its sign


# ---- the GEMM

@pytest.mark.parametrize("m,n,k", [(37, 200, 256), (150, 200, 384), (1, 128, 128), (16, 64, 1280)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemm_kernel_matches_reference(m, n, k, out_dtype):
    a, sa, b, sb = _operands(m, n, k)
    ref = K.fp8_gemm_ref(a, sa, b, sb, out_dtype)
    with force("triton"):
        out = K.fp8_gemm(a, sa, b, sb, out_dtype)
        out_mmajor = K.fp8_gemm(a, sa.t().contiguous().t(), b, sb, out_dtype)  # act_quant's layout
    assert out.shape == (m, n) and out.dtype == out_dtype
    # fp32: the same sums in another order; bf16: one rounding (the interpreter truncates)
    _close(out, ref, 1e-6 if out_dtype == torch.float32 else 1e-2)
    assert torch.equal(out, out_mmajor)


def test_split_k_is_used_and_exact_for_small_m():
    assert K._split_k(tiles=1, num_kb=10, num_sms=4) == 2   # 2 splits of 5 K blocks
    assert K._split_k(tiles=1, num_kb=56, num_sms=132) == 8
    assert K._split_k(tiles=384, num_kb=12, num_sms=132) == 1
    a, sa, b, sb = _operands(16, 64, 1280)
    with force("triton"):
        out = K.fp8_gemm(a, sa, b, sb, torch.float32)
    _close(out, K.fp8_gemm_ref(a, sa, b, sb, torch.float32), 1e-6)


def test_reference_is_fp8_arithmetic_and_close_to_the_real_product():
    x, w = torch.randn(8, 256), torch.randn(130, 256)
    a, sa = K.act_quant_ref(x)
    b, sb = weight_quant(w)
    by_hand = _dequant_act(a, sa) @ weight_dequant(b, sb, dtype=torch.float32).t()
    out = K.fp8_gemm_ref(a, sa, b, sb, torch.float32)
    assert torch.allclose(out, by_hand, rtol=1e-5, atol=1e-5)
    _close(out, x @ w.t(), 0.1)   # e4m3 keeps 3 mantissa bits: a few percent, not more


def test_grouped_gemm_with_empty_and_ragged_groups():
    e, n, k = 6, 200, 256
    offsets = torch.tensor([0, 0, 30, 30, 100, 161, 161], dtype=torch.int32)   # empties first, middle, last
    a, sa, _, _ = _operands(161, n, k)
    bs = [weight_quant(torch.randn(n, k) * 0.05) for _ in range(e)]
    b, sb = torch.stack([q for q, _ in bs]), torch.stack([s for _, s in bs])
    ref = K.fp8_grouped_gemm_ref(a, sa, b, sb, offsets, torch.float32)
    for lo, hi, j in [(0, 30, 1), (30, 100, 3), (100, 161, 4)]:
        assert torch.equal(ref[lo:hi], K.fp8_gemm_ref(a[lo:hi], sa[lo:hi], b[j], sb[j], torch.float32))
    with force("triton"):
        out = K.fp8_grouped_gemm(a, sa, b, sb, offsets, torch.float32)
        out64 = K.fp8_grouped_gemm(a, sa, b, sb, offsets.long(), torch.float32)
    _close(out, ref, 1e-6)
    assert torch.equal(out, out64)


def test_bad_operands_raise():
    a, sa, b, sb = _operands(4, 128, 256)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        K.fp8_gemm(a.float(), sa, b, sb)
    with pytest.raises(ValueError, match="b_scale"):
        K.fp8_gemm(a, sa, b, sb[:, :1])
    with pytest.raises(ValueError, match="a_scale"):
        K.fp8_gemm(a, sa.t(), b, sb)
    with pytest.raises(ValueError, match="multiple of 128"):
        K.act_quant(torch.randn(4, 100))
    with pytest.raises(ValueError, match="group_offsets"):
        K.fp8_grouped_gemm(a, sa, b[None], sb[None], torch.tensor([0, 2, 4], dtype=torch.int32))


# ---- FP8Linear and keeping FP8 weights at load

def test_fp8_linear_matches_reference_and_the_bf16_layer():
    lin = nn.Linear(256, 200, bias=False)
    fl = FP8Linear.from_linear(lin)
    x = torch.randn(2, 5, 256)
    with force("ref"):
        y_ref = fl(x)
    with force("triton"):
        y = fl(x)
    assert y.shape == (2, 5, 200) and fl.weight.dtype == FP8 and fl.weight_scale_inv.shape == (2, 2)
    _close(y, y_ref, 1e-6)
    _close(y, lin(x).detach(), 0.1)
    with pytest.raises(ValueError, match="multiple of the 128"):
        FP8Linear(100, 64)


def test_weights_cublas_refuses_go_to_the_triton_kernel_and_still_match():
    """cuBLASLt's FP8 GEMM needs both weight dimensions to be multiples of 16 (an H100 refused
    N = 136): such a layer is not sent there, and the Triton kernel (the interpreter here) gives the
    reference's output for it."""
    from dsv32.model.fp8 import cublas_fp8_fits
    fl = FP8Linear.from_linear(nn.Linear(128, 136, bias=False))
    assert not cublas_fp8_fits(fl.weight)
    assert cublas_fp8_fits(FP8Linear.from_linear(nn.Linear(256, 2112, bias=False)).weight)
    x = torch.randn(3, 128)
    with force("ref"):
        y_ref = fl(x)
    with force("triton"):
        _close(fl(x), y_ref, 1e-6)


def test_keep_fp8_load_keeps_checkpoint_bytes(tmp_path):
    # dims that are multiples of 128 where the FP8 projections read their input
    cfg = preset("tiny").replace(hidden_size=128, q_lora_rank=128, kv_lora_rank=128, intermediate_size=256,
                                 moe_intermediate_size=128, v_head_dim=32)
    torch.manual_seed(0)
    save_model(Transformer(cfg).eval(), tmp_path, fp8=True)
    plain = load_model(tmp_path, dtype=torch.float32)
    kept = load_model(tmp_path, dtype=torch.float32, keep_fp8=True)
    attn, moe = kept.layers[1].self_attn, kept.layers[1].mlp
    assert isinstance(attn.q_b_proj, FP8Linear) and isinstance(moe.experts[0].down_proj, FP8Linear)
    assert isinstance(attn.o_proj, FP8Linear) and isinstance(attn.indexer.wk, FP8Linear)
    assert not isinstance(attn.indexer.weights_proj, FP8Linear)   # bf16 in the checkpoint
    assert not isinstance(attn.kv_b_proj, FP8Linear)   # absorbed attention reads its weight
    # the e4m3 bytes and scales are the file's, dequantising them gives the plain load's weight
    w, s = attn.q_b_proj.weight, attn.q_b_proj.weight_scale_inv
    assert torch.equal(weight_dequant(w, s, dtype=torch.float32), plain.layers[1].self_attn.q_b_proj.weight)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with force("ref"):
        a, b, c = plain(ids).logits, kept(ids).logits, kept(ids, mode="mqa").logits
    _close(b, a, 0.1)   # only the activations' 1x128 FP8 rounding differs
    _close(c, b, 1e-4)  # absorbed attention agrees with the expanded one
    save_model(plain, tmp_path / "bf16")
    with pytest.raises(ValueError, match="keep_fp8"):
        load_model(tmp_path / "bf16", keep_fp8=True)


def test_to_fp8_linears_selects_by_name():
    net = nn.Sequential(nn.Linear(128, 64, bias=False), nn.Linear(64, 128, bias=False), nn.Linear(128, 8))
    assert to_fp8_linears(net, lambda n: True) == ["0"]   # 64 inputs and the biased layer stay
    assert isinstance(net[0], FP8Linear) and isinstance(net[1], nn.Linear)


def test_moe_experts_as_two_grouped_gemms_match_the_expert_loop():
    cfg = preset("tiny").replace(hidden_size=128, moe_intermediate_size=128, n_shared_experts=0)
    moe = MoE(cfg).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    to_fp8_linears(moe, lambda n: n.startswith("experts."))
    x = torch.randn(10, 128)
    weights, ids, _ = moe.gate(x)
    stacked = stack_fp8_experts(moe.experts)
    assert stacked[0].shape == (8, 256, 128) and stacked[3].shape == (8, 1, 1)
    with force("ref"):
        loop = moe(x[None])[0][0]                 # MoE.forward: one expert at a time, FP8Linear each
        ref = moe_experts_fp8(x, ids, weights, *stacked)
    with force("triton"):
        out = moe_experts_fp8(x, ids, weights, *stacked)
    _close(ref, loop, 1e-5)
    _close(out, ref, 1e-5)


# ---- GPU, real shapes (DeepSeek-V3 projections)

V3_SHAPES = [(7168, 2048), (2112, 7168), (24576, 1536), (4096, 7168)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", V3_SHAPES)
@pytest.mark.parametrize("m", [64, 4096])
def test_fp8_gemm_gpu_real_shapes(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a, sa = K.act_quant(x)
    a_ref, sa_ref = K.act_quant_ref(x)
    assert torch.equal(sa, sa_ref) and torch.equal(a.view(torch.uint8), a_ref.view(torch.uint8))
    b, sb = weight_quant(torch.randn(n, k, device="cuda") * 0.02)
    ref = K.fp8_gemm_ref(a, sa, b, sb, torch.float32)
    _close(K.fp8_gemm(a, sa, b, sb), ref, 5e-3)
    _close(K.fp8_gemm(a, sa, b, sb, torch.float32), ref, 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", V3_SHAPES)
@pytest.mark.parametrize("m", [64, 4095])
def test_fp8_gemm_cublas_gpu(m, n, k):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuBLASLt's 1x128 x 128x128 recipe is SM90 only")
    a, sa, b, sb = _operands(m, n, k, device="cuda")
    out = K.fp8_gemm_cublas(a, sa, b, K.cublas_weight_scale(sb))
    _close(out, K.fp8_gemm_ref(a, sa, b, sb, torch.float32), 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)])
def test_fp8_grouped_gemm_gpu(n, k):
    e = 8
    sizes = torch.tensor([512, 0, 700, 512, 1, 300, 512, 1500])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).int().cuda()
    a, sa = K.act_quant(torch.randn(int(sizes.sum()), k, device="cuda", dtype=torch.bfloat16))
    bs = [weight_quant(torch.randn(n, k, device="cuda") * 0.02) for _ in range(e)]
    b, sb = torch.stack([q for q, _ in bs]), torch.stack([s for _, s in bs])
    out = K.fp8_grouped_gemm(a, sa, b, sb, offsets)
    _close(out, K.fp8_grouped_gemm_ref(a, sa, b, sb, offsets, torch.float32), 5e-3)


@pytest.mark.gpu
def test_moe_experts_fp8_gpu():
    e, d, inter, t, k = 32, 7168, 2048, 512, 8
    w13, s13 = map(torch.stack, zip(*[weight_quant(torch.randn(2 * inter, d, device="cuda") * 0.02) for _ in range(e)]))
    w2, s2 = map(torch.stack, zip(*[weight_quant(torch.randn(d, inter, device="cuda") * 0.02) for _ in range(e)]))
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(t, e, device="cuda").topk(k, dim=-1).indices
    weights = torch.rand(t, k, device="cuda")
    out = moe_experts_fp8(x, ids, weights, w13, s13, w2, s2)
    with force("ref"):
        ref = moe_experts_fp8(x, ids, weights, w13, s13, w2, s2)
    _close(out, ref, 1e-2)
