"""Sparse MLA decode: the reference against the model's absorbed-MQA attention over the engine's
paged cache (the independent truth), the Triton kernel against the reference (Triton's
interpreter on CPU, small shapes; real shapes on the GPU), and the FP8 byte layout by hand."""

import math

import pytest
import torch

from dsv32.config import preset
from dsv32.engine.batch import Batch
from dsv32.engine.cache import PagedCache, _quant_rows
from dsv32.kernels import force
from dsv32.kernels.sparse_mla_decode import (
    auto_num_splits,
    dequant_fp8_rows,
    fp8_row_bytes,
    sparse_mla_decode,
    sparse_mla_decode_ref,
    sparse_mla_decode_triton,
)
from dsv32.model.mla import MLA

SCALE = 576 ** -0.5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel: natively, or interpreted on CPU


def fp8_rows(kv: torch.Tensor) -> torch.Tensor:
    """bf16 [N, 576] -> the cache's FP8 rows [N, 656], through the engine's own quantiser."""
    rope = kv[:, 512:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return torch.cat([_quant_rows(kv[:, :512], 128), rope], -1)


def make_case(b, s_q, h, k, num_slots=400, fp8=False, device="cpu"):
    """Random q, cache and global slot indices, with -1 holes and one row with no valid index."""
    q = torch.randn(b, s_q, h, 576, device=device).to(torch.bfloat16)
    kv = (torch.randn(num_slots, 576, device=device) * 2).to(torch.bfloat16)
    cache = fp8_rows(kv) if fp8 else kv
    idx = torch.stack([torch.randperm(num_slots, device=device)[:k] for _ in range(b * s_q)])
    idx = idx.view(b, s_q, k).to(torch.int32)
    idx[torch.rand(b, s_q, k, device=device) < 0.2] = -1
    idx[-1, -1] = -1
    return q, cache, idx


def assert_close(got, want):
    (o, lse), (o_ref, lse_ref) = got, want
    assert o.shape == o_ref.shape and o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(lse.isinf(), lse_ref.isinf())
    fin = lse_ref.isfinite()
    torch.testing.assert_close(lse[fin], lse_ref[fin], rtol=1e-4, atol=1e-4)
    # p is rounded to bf16 before the PV product (as in FlashMLA): ~2^-9 relative per term
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=1e-2)


# ---- the reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_equals_model_mqa_over_the_paged_cache(fp8, backend):
    """Latents that PagedCache wrote into scattered blocks, read back through global slot ids,
    give what the model's absorbed MLA (MLA._mqa) computes from the same (dequantised) latents
    at sequence positions: the reference, and the kernel under Triton's interpreter."""
    cfg = preset("tiny").replace(kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=64)  # V3.2's latent
    mla = MLA(cfg).eval()
    b, s, t, k, h, c = 2, 2, 100, 24, cfg.num_attention_heads, cfg.kv_lora_rank
    cache = PagedCache(cfg, num_blocks=8, fp8=fp8, dtype=torch.bfloat16)
    positions = torch.arange(t).expand(b, t)
    batch = Batch.build(torch.zeros_like(positions), positions, [[5, 2], [7, 0]], 64)  # interleaved blocks
    kv, pe = torch.randn(b, t, c), torch.randn(b, t, 64)
    kv_read, pe_read, _ = cache.bind(batch).update(0, kv, pe, torch.randn(b, t, 64), positions)

    pos = torch.stack([torch.randperm(t)[:k] for _ in range(b * s)]).view(b, s, k)
    pos[torch.rand(b, s, k) < 0.25] = -1
    q_nope, q_pe = torch.randn(b, s, h, cfg.qk_nope_head_dim), torch.randn(b, s, h, 64)
    with torch.no_grad():
        want, _ = mla._mqa(q_nope, q_pe, kv_read.float(), pe_read.float(), None, pos, False)

        w = mla.kv_b_proj.weight.view(h, cfg.qk_nope_head_dim + cfg.v_head_dim, c)
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w[:, :cfg.qk_nope_head_dim])
        q = torch.cat([q_lat, q_pe], -1).to(torch.bfloat16)
        slots = torch.where(pos >= 0, batch.gather[:, None, :].expand(b, s, t).gather(2, pos.clamp(min=0)), -1)
        dev = DEVICE if backend == "triton" else "cpu"
        with force(backend):
            o_lat, lse = sparse_mla_decode(q.to(dev), cache.kv[0].to(dev), slots.to(dev, torch.int32),
                                           cfg.softmax_scale)
        got = torch.einsum("bshc,hdc->bshd", o_lat.float().cpu(), w[:, cfg.qk_nope_head_dim:])
    assert (got - want).norm() / want.norm() < 2e-2
    assert lse.isfinite().all()


def test_reference_lse_merges_like_a_split():
    """Attention over A ∪ B from the two halves: lse = logaddexp, out = exp-weighted mean."""
    q, cache, idx = make_case(2, 2, 4, 32)
    idx[-1, -1] = torch.arange(32)
    a, b_ = idx.clone(), idx.clone()
    a[..., 16:], b_[..., :16] = -1, -1
    (o, lse), (oa, la), (ob, lb) = (sparse_mla_decode_ref(q, cache, i, SCALE) for i in (idx, a, b_))
    merged = torch.logaddexp(la, lb)
    torch.testing.assert_close(lse, merged)
    wa, wb = torch.exp(la - merged).nan_to_num(0), torch.exp(lb - merged).nan_to_num(0)
    torch.testing.assert_close(o.float(), wa[..., None] * oa.float() + wb[..., None] * ob.float(),
                               rtol=1e-2, atol=1e-2)


def test_reference_row_without_indices_is_zero_with_lse_minus_inf():
    q, cache, idx = make_case(1, 2, 4, 8)
    o, lse = sparse_mla_decode_ref(q, cache, idx, SCALE)
    assert (o[0, -1] == 0).all() and (lse[0, -1] == float("-inf")).all()


def test_fp8_row_is_flashmla_layout_by_hand():
    """656 bytes: 512 e4m3 latent values, 4 fp32 scales (one per 128), 64 bf16 rope values."""
    assert fp8_row_bytes(512, 64) == 656
    kv = torch.randn(3, 576).to(torch.bfloat16)
    rows = fp8_rows(kv)
    assert rows.shape == (3, 656) and rows.dtype == torch.uint8
    scales = rows[:, 512:528].contiguous().view(torch.float32)                        # [3, 4]
    amax = kv[:, :512].float().view(3, 4, 128).abs().amax(-1)
    torch.testing.assert_close(scales, amax / 448)
    assert torch.equal(rows[:, 528:].contiguous().view(torch.bfloat16), kv[:, 512:])
    vals = rows[:, :512].contiguous().view(torch.float8_e4m3fn).float().view(3, 4, 128)
    by_hand = (vals * scales[..., None]).view(3, 512).to(torch.bfloat16)
    assert torch.equal(dequant_fp8_rows(rows, 512, 64), torch.cat([by_hand, kv[:, 512:]], -1))
    assert (dequant_fp8_rows(rows, 512, 64)[:, :512].float() - kv[:, :512].float()).abs().max() < 0.07 * amax.max()


def test_bad_inputs_fail_clearly():
    q, cache, idx = make_case(1, 1, 4, 8)
    with pytest.raises(ValueError, match="q must be"):
        sparse_mla_decode_ref(q.float(), cache, idx, SCALE)
    with pytest.raises(ValueError, match="idx must be"):
        sparse_mla_decode_ref(q, cache, idx[0], SCALE)
    with pytest.raises(ValueError, match="cache must be"):
        sparse_mla_decode_ref(q, cache[:, :512], idx, SCALE)
    with pytest.raises(ValueError, match="cache must be"):
        sparse_mla_decode_ref(q, cache.view(torch.uint8)[:, :600], idx, SCALE)


# ---- the kernel (Triton's interpreter on CPU) ----------------------------------------------------

@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("s_q,b,h,num_splits", [(1, 3, 16, 1), (2, 2, 20, 3), (2, 1, 16, None)])
def test_kernel_matches_reference(fp8, s_q, b, h, num_splits):
    q, cache, idx = make_case(b, s_q, h, 70, fp8=fp8, device=DEVICE)  # 70: ragged last tile and split
    with force("triton"):
        got = sparse_mla_decode(q, cache, idx, SCALE, num_splits=num_splits)
    assert_close(got, sparse_mla_decode_ref(q, cache, idx, SCALE))
    assert (got[0][-1, -1] == 0).all() and (got[1][-1, -1] == float("-inf")).all()


def test_kernel_split_counts_agree():
    """Three splits (64 + 64 + 22 indices) and int64 indices give what one split gives."""
    q, cache, idx = make_case(1, 2, 16, 150, fp8=True, device=DEVICE)
    one = sparse_mla_decode_triton(q, cache, idx, SCALE, num_splits=1)
    three = sparse_mla_decode_triton(q, cache, idx.long(), SCALE, num_splits=3)
    torch.testing.assert_close(three[1], one[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(three[0].float(), one[0].float(), rtol=1e-2, atol=1e-2)


def test_dispatcher_on_cpu_equals_a_softmax_over_the_selected_rows():
    """The automatic choice on CPU tensors, against attention written out per query: softmax of
    q . row * scale over the selected rows (holes skipped), values = the rows' first 512 dims."""
    q, cache, idx = make_case(1, 2, 4, 8)
    with force(None):
        o, lse = sparse_mla_decode(q, cache, idx, SCALE)
    for s in range(2):
        rows = cache[idx[0, s][idx[0, s] >= 0].long()].float()              # [n, 576]
        for h in range(4):
            if len(rows) == 0:
                assert lse[0, s, h].item() == float("-inf")
                continue
            logits = rows @ q[0, s, h].float() * SCALE
            p = logits.softmax(0)
            torch.testing.assert_close(lse[0, s, h], logits.logsumexp(0), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(o[0, s, h].float(), p @ rows[:, :512], rtol=2e-2, atol=1e-2)


def test_head_dims_the_kernel_cannot_tile_take_the_twin():
    """Found on an H200: a tiny model (d_v 128, rope 8, as the CUDA-graph test builds) reached the
    kernel, whose rope dot needs an inner dimension of 16. Forced to Triton, such a model gets the
    reference's answer; the kernel itself refuses those dims by name."""
    q = torch.randn(2, 1, 4, 136).to(torch.bfloat16)
    cache = torch.randn(50, 136).to(torch.bfloat16)
    idx = torch.randint(0, 50, (2, 1, 12), dtype=torch.int32)
    with force("triton"):
        got = sparse_mla_decode(q, cache, idx, SCALE, d_v=128)
    want = sparse_mla_decode_ref(q, cache, idx, SCALE, d_v=128)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="at least 16"):
        sparse_mla_decode_triton(q, cache, idx, SCALE, d_v=128)


@pytest.mark.parametrize("rows,k", [(1, 2048), (4, 2048), (64, 2048), (256, 2048), (2, 100)])
def test_auto_num_splits_fills_the_gpu_once(rows, k):
    splits = auto_num_splits(rows, 2, k, 132)
    tiles = math.ceil(k / 64)
    assert 1 <= splits <= max(1, tiles // 2)
    assert rows * 2 * splits <= max(132, rows * 2)
    if rows * 2 * 2 <= 132 and tiles >= 4:  # room for a second split: taken
        assert splits >= 2


# ---- the GPU, real shapes ------------------------------------------------------------------------

def gpu_case(b, s_q, fp8, s_k=32768, h=128, k=2048):
    """b sequences of s_k tokens each in one paged cache; each query picks k of its own tokens."""
    q = torch.randn(b, s_q, h, 576, device="cuda").to(torch.bfloat16)
    kv = torch.randn(b * s_k, 576, device="cuda").to(torch.bfloat16)
    cache = fp8_rows(kv) if fp8 else kv
    own = torch.rand(b * s_q, s_k, device="cuda").topk(k, -1).indices.view(b, s_q, k)
    idx = (own + s_k * torch.arange(b, device="cuda")[:, None, None]).to(torch.int32)
    idx[:, :, -100:] = -1
    return q, cache, idx


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("b,s_q", [(1, 1), (1, 2), (64, 1), (64, 2)])
def test_kernel_matches_reference_on_gpu(fp8, b, s_q):
    q, cache, idx = gpu_case(b, s_q, fp8)
    idx[0, 0] = -1
    got = sparse_mla_decode(q, cache, idx, SCALE)
    assert_close(got, sparse_mla_decode_ref(q, cache, idx, SCALE))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 5, 32])
def test_kernel_forced_splits_on_gpu(num_splits):
    q, cache, idx = gpu_case(1, 2, True)
    assert_close(sparse_mla_decode(q, cache, idx, SCALE, num_splits=num_splits),
                 sparse_mla_decode_ref(q, cache, idx, SCALE))


@pytest.mark.gpu
def test_same_cache_bytes_as_flashmla():
    """FlashMLA's FP8 sparse decode reads our cache bytes as its own layout and agrees (it rounds
    the fp32 scales to bf16, so the bound is loose)."""
    flash_mla = pytest.importorskip("flash_mla")
    q, cache, idx = gpu_case(2, 2, True)
    sched, _ = flash_mla.get_mla_metadata()
    out, _ = flash_mla.flash_mla_with_kvcache(
        q, cache.view(torch.float8_e4m3fn).view(-1, 64, 1, 656), None, None, 512, sched, None,
        softmax_scale=SCALE, causal=False, is_fp8_kvcache=True, indices=idx, use_legacy=True)
    ours, _ = sparse_mla_decode(q, cache, idx, SCALE)
    assert (out.float() - ours.float()).norm() / ours.float().norm() < 1e-2
