"""Indexer logits: the references against a per-head loop and the model's Indexer; the Triton
kernels against the references, prefill and paged decode. The small cases run under Triton's
interpreter on CPU and compiled on a GPU; the `gpu` ones at real shapes."""

import re

import pytest
import torch

from dsv32.config import preset
from dsv32.engine.batch import Batch
from dsv32.engine.cache import PagedCache, _quant_rows
from dsv32.kernels import force
from dsv32.kernels.indexer import (
    FP8,
    _num_sms,
    _paged_args,
    _paged_configs,
    _paged_kernel,
    _prefill_configs,
    indexer_logits,
    indexer_logits_paged,
    indexer_logits_paged_ref,
    indexer_logits_paged_triton,
    indexer_logits_ref,
    indexer_logits_triton,
    paged_launch,
)
from dsv32.model.indexer import Indexer
from dsv32.model.rope import apply_rope_half, rope_cos_sin

NEG = float("-inf")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# Hopper's FP8 tensor cores accumulate with fewer mantissa bits than fp32 (why DeepGEMM promotes
# partial sums): 4e-5 of the largest logit seen on an H100; the interpreter is exact to 1e-5
RTOL = 1e-4 if DEV == "cuda" else 1e-5


def assert_logits_close(got, want, rtol=RTOL):
    """Same -inf pattern; finite entries within rtol of the largest |logit|."""
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "masked positions differ"
    fin = torch.isfinite(want)
    scale = want[fin].abs().max().clamp(min=1e-6) if fin.any() else 1.0
    assert ((got[fin] - want[fin]).abs() <= rtol * scale).all(), (got[fin] - want[fin]).abs().max()


def inputs(b, s, t, h, d, fp8=False, device="cpu"):
    q, k, w = (torch.randn(*shape, device=device) for shape in ((b, s, h, d), (b, t, d), (b, s, h)))
    if not fp8:
        return q.bfloat16(), k.bfloat16(), w, None, None
    qs, ks = torch.rand(b, s, h, device=device) + 0.1, torch.rand(b, t, device=device) + 0.1
    return q.to(FP8), k.to(FP8), w, qs, ks


def test_ref_is_the_per_head_sum():
    q, k, w, qs, ks = inputs(2, 5, 7, 3, 16, fp8=True)
    end = torch.tensor([[1, 2, 3, 7, 0], [7, 7, 4, 5, 6]])
    want = torch.full((2, 5, 7), NEG)
    for b in range(2):
        for s in range(5):
            for t in range(end[b, s]):
                dots = (q[b, s].float() * qs[b, s, :, None]) @ (k[b, t].float() * ks[b, t])  # [H]
                want[b, s, t] = (w[b, s] * dots.relu()).sum()
    assert_logits_close(indexer_logits_ref(q, k, w, qs, ks, end), want)


@torch.no_grad()
def test_ref_matches_model_indexer():
    cfg = preset("tiny")
    ix = Indexer(cfg).eval()
    b, s = 2, 9
    x, qr = torch.randn(b, s, cfg.hidden_size), torch.randn(b, s, cfg.q_lora_rank)
    cos, sin = rope_cos_sin(cfg, torch.arange(s).expand(b, s))
    mask = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
    k = ix.key(x, cos, sin)
    # the query and weights as Indexer.forward builds them
    r = cfg.qk_rope_head_dim
    q = ix.wq_b(qr).view(b, s, ix.n_heads, ix.head_dim)
    q = torch.cat([apply_rope_half(q[..., :r], cos, sin), q[..., r:]], -1)
    w = x.float() @ ix.weights_proj.weight.float().t() * (ix.n_heads ** -0.5 * ix.head_dim ** -0.5)
    end = torch.arange(1, s + 1).expand(b, s)
    assert torch.equal(indexer_logits_ref(q, k, w, k_end=end), ix(x, qr, k, cos, sin, mask))


@pytest.mark.parametrize("fp8", [False, True])
def test_prefill_kernel_causal(fp8):
    b, s, t, h, d = 2, 70, 150, 3, 32
    q, k, w, qs, ks = inputs(b, s, t, h, d, fp8, DEV)
    end = (t - s + 1 + torch.arange(s, device=DEV)).expand(b, s).clone()  # the last s of t positions
    end[1] = torch.randint(0, t + 1, (s,), device=DEV)                   # ragged
    assert_logits_close(indexer_logits_triton(q, k, w, qs, ks, end), indexer_logits_ref(q, k, w, qs, ks, end))


@pytest.mark.parametrize("config", _prefill_configs(), ids=str)
def test_prefill_kernel_every_config(config):
    """Each config the GPU autotuner may pick; ragged ends, shapes off the tile grid."""
    b, s, t, h, d = 1, 40, 200, 2, 16
    q, k, w, qs, ks = inputs(b, s, t, h, d, fp8=True, device=DEV)
    end = torch.randint(0, t + 1, (b, s), device=DEV)
    got = indexer_logits_triton(q, k, w, qs, ks, end, config=config)
    assert_logits_close(got, indexer_logits_ref(q, k, w, qs, ks, end))


def test_prefill_kernel_mixed_dtypes():
    q, k, w, qs, _ = inputs(1, 20, 50, 2, 16, fp8=True, device=DEV)
    kb = k.float().bfloat16()  # fp8 queries against bf16 keys meet in bf16
    assert_logits_close(indexer_logits_triton(q, kb, w, qs, None), indexer_logits_ref(q, kb, w, qs, None))


def grads_through(fn, q, k, w, end, g):
    """(logits, dq, dk, dw) of sum(g * logits) over the finite logits, through fn(q, k, w, k_end)."""
    q, k, w = (x.detach().clone().requires_grad_() for x in (q, k, w))
    out = fn(q, k, w, end)
    (torch.where(torch.isfinite(out), out, 0.0) * g).sum().backward()
    return out.detach(), q.grad, k.grad, w.grad


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_gradient_equals_autograd_through_the_reference(backend, dtype):
    """indexer_logits is differentiable on both paths (stages 1 and 2 train through it): its
    backward, recomputing the dots, against autograd through the plain-torch einsums."""
    b, s, t, h, d = 2, 40, 70, 3, 16
    q, k, w = torch.randn(b, s, h, d, device=DEV), torch.randn(b, t, d, device=DEV), torch.randn(b, s, h, device=DEV)
    q, k = q.to(dtype), k.to(dtype)
    end = torch.randint(0, t + 1, (b, s), device=DEV)
    g = torch.randn(b, s, t, device=DEV)
    want = grads_through(lambda *a: indexer_logits_ref(a[0], a[1], a[2], k_end=a[3]), q, k, w, end, g)
    with force(backend):
        got = grads_through(lambda *a: indexer_logits(a[0], a[1], a[2], k_end=a[3]), q, k, w, end, g)
    assert_logits_close(got[0], want[0])
    for name, x, y in zip(("dq", "dk", "dw"), got[1:], want[1:]):
        assert x.dtype == y.dtype and x.abs().sum() > 0, name
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-4,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-4, msg=name)


def fp8_page_cache(keys, bs):
    """keys [num_slots, D] -> FP8 pages [num_slots / bs, bs * (D + 4)] uint8, laid out by hand:
    each page's bs rows of D e4m3 bytes, then their bs fp32 scales."""
    n, d = keys.shape
    rows = _quant_rows(keys, d).view(n // bs, bs, d + 4)
    return torch.cat([rows[..., :d].reshape(n // bs, bs * d), rows[..., d:].reshape(n // bs, bs * 4)], 1)


def paged_setup(lens, h=4, d=32, n=2, bs=16, fp8_cache=True, fp8_q=False, max_blocks=6, garbage=True):
    """A shuffled block pool; table rows past a sequence's blocks hold out-of-range block ids."""
    b = len(lens)
    pool = b * max_blocks + 3
    keys = torch.randn(pool * bs, d)
    cache = fp8_page_cache(keys, bs) if fp8_cache else keys.bfloat16()
    table = torch.randperm(pool)[:b * max_blocks].view(b, max_blocks).int()
    if garbage:
        for i, L in enumerate(lens):
            table[i, -(-L // bs):] = 10 ** 6
    q, w = torch.randn(b, n, h, d), torch.randn(b, n, h)
    qs = torch.rand(b, n, h).to(DEV) + 0.1 if fp8_q else None
    q = q.to(FP8) if fp8_q else q.bfloat16()
    return q.to(DEV), w.to(DEV), cache.to(DEV), table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV), qs, bs


@pytest.mark.parametrize("fp8_cache,fp8_q", [(True, True), (True, False), (False, False), (False, True)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_paged_kernel(fp8_cache, fp8_q, n):
    q, w, cache, table, lens, qs, bs = paged_setup([n, 16, 37, 96], n=n, fp8_cache=fp8_cache, fp8_q=fp8_q)
    got = indexer_logits_paged_triton(q, w, cache, table, lens, qs, bs)
    assert_logits_close(got, indexer_logits_paged_ref(q, w, cache, table, lens, qs, bs))
    assert torch.isneginf(got[3, 0, 96 - n + 1:]).all() and torch.isfinite(got[3, n - 1, :96]).all()


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("config", _paged_configs(), ids=str)
def test_paged_kernel_every_config_and_odd_heads(config, n):
    """Each fixed decode config, with 2 queries a row (held in registers) and 3 (reloaded per tile);
    6 heads (padded to 16 for the MMA); 64-token pages."""
    q, w, cache, table, lens, qs, bs = paged_setup([5, 64, 80, 128], h=6, n=n, fp8_q=True, bs=64, max_blocks=2)
    got = indexer_logits_paged_triton(q, w, cache, table, lens, qs, bs, config=config)
    assert_logits_close(got, indexer_logits_paged_ref(q, w, cache, table, lens, qs, bs))


def test_paged_launch_splits_the_context_of_few_sequences():
    """paged_launch: the longest span of 2048, 1024, .., 128 tokens that gives 16 programs per
    SM, else 128; every span a whole number of BLOCK_T tiles."""
    sms = _num_sms(torch.device(DEV))
    for b, max_len in [(1, 32768), (1, 131072), (2, 4096), (64, 32768), (64, 131072), (1, 100)]:
        config, span = paged_launch(b, max_len, torch.device(DEV))
        assert span % config.kwargs["BLOCK_T"] == 0 and span in (128, 256, 512, 1024, 2048)
        enough = lambda s: b * -(-max_len // s) >= 16 * sms  # noqa: E731
        assert (enough(span) or span == 128) and (span == 2048 or not enough(2 * span)), (b, max_len, span)
    if sms == 132:  # the H100's shapes
        assert paged_launch(64, 131072, torch.device(DEV))[1] == 2048
        assert paged_launch(64, 32768, torch.device(DEV))[1] == 512
        assert paged_launch(1, 131072, torch.device(DEV))[1] == 128


@pytest.mark.parametrize("n", [1, 2])
def test_paged_kernel_context_split_across_programs(n):
    """A context of 6 pages of 64 split over programs of 128 tokens (a few sequences' launch):
    ragged lengths, a program wholly past its sequence's end (only -inf written), a full one."""
    q, w, cache, table, lens, qs, bs = paged_setup([n, 200, 384], h=4, n=n, fp8_q=True, bs=64, max_blocks=6)
    _, grid, _, _ = _paged_args(q, w, cache, table, lens, qs, bs)
    assert grid[0] == 3  # three programs per sequence
    got = indexer_logits_paged_triton(q, w, cache, table, lens, qs, bs)
    assert_logits_close(got, indexer_logits_paged_ref(q, w, cache, table, lens, qs, bs))
    assert torch.isneginf(got[0, 0, 1:]).all() and torch.isfinite(got[2, n - 1]).all()


@torch.no_grad()
def test_paged_matches_the_engine_cache():
    """The bytes PagedCache writes are what the kernel reads: same logits as the keys the cache
    hands back to the model (dequantised in fp32)."""
    cfg = preset("tiny")
    d = cfg.index_head_dim
    for fp8 in (True, False):
        cache = PagedCache(cfg, num_blocks=8, block_size=16, fp8=fp8, dtype=torch.float32, device=DEV)
        tables, lens = [[5, 2, 7], [0, 3]], [40, 23]
        pos = torch.arange(40, device=DEV).expand(2, 40)
        step = cache.bind(Batch.build(torch.zeros_like(pos), pos, tables, 16))
        kv = torch.randn(2, 40, cfg.kv_lora_rank, device=DEV)
        pe = torch.randn(2, 40, cfg.qk_rope_head_dim, device=DEV)
        _, _, ik_all = step.update(0, kv, pe, torch.randn(2, 40, d, device=DEV), pos)  # [2, 40, d]
        q = torch.randn(2, 2, cfg.index_n_heads, d, device=DEV).bfloat16()
        w = torch.randn(2, 2, cfg.index_n_heads, device=DEV)
        table = torch.tensor([[5, 2, 7], [0, 3, 0]], dtype=torch.int32, device=DEV)
        lens = torch.tensor(lens, device=DEV)
        end = lens[:, None] - 1 + torch.arange(2, device=DEV)
        want = indexer_logits_ref(q, ik_all, w, k_end=end)                   # [2, 2, 40]
        got = indexer_logits_paged_triton(q, w, cache.ik[0], table, lens, None, 16)
        assert_logits_close(got[..., :40], want, rtol=1e-4)


@torch.no_grad()
def test_fp8_pages_as_the_engine_cache_writes_them():
    """Byte for byte, PagedCache puts token (block, off)'s e4m3 key at block * PAGE * (D + 4) +
    off * D and its fp32 scale (amax / 448) at block * PAGE * (D + 4) + PAGE * D + 4 * off; the
    kernel reads those pages as the reference does, over a shuffled block table with partly filled
    last pages, and both score the keys dequantised by hand."""
    cfg = preset("tiny")
    d, bs, nb = cfg.index_head_dim, 64, 8
    c, r, _ = cfg.cache_widths
    cache = PagedCache(cfg, nb, bs, fp8=True, dtype=torch.float32, device=DEV)
    tables, lens = [[6, 1, 4], [3, 7]], [150, 70]
    want = torch.zeros(nb * bs * (d + 4), dtype=torch.uint8)
    hand = torch.zeros(2, 3 * bs, d)                                   # dequantised keys by position
    for i, (table, n) in enumerate(zip(tables, lens)):
        ik = torch.randn(1, n, d)
        pos = torch.arange(n, device=DEV)[None]
        step = cache.bind(Batch.build(torch.zeros_like(pos), pos, [table], bs))
        step.write(0, torch.randn(1, n, c, device=DEV), torch.randn(1, n, r, device=DEV), ik.to(DEV))
        for p, key in enumerate(ik[0]):
            scale = key.abs().amax() / 448
            e4m3 = (key / scale).to(FP8)
            hand[i, p] = e4m3.float() * scale
            page, off = table[p // bs] * bs * (d + 4), p % bs
            want[page + off * d:page + (off + 1) * d] = e4m3.view(torch.uint8)
            want[page + bs * d + 4 * off:page + bs * d + 4 * (off + 1)] = scale.reshape(1).view(torch.uint8)
    assert torch.equal(cache.ik[0].flatten().cpu(), want)
    assert not cache.ik[1:].any()

    q, w = torch.randn(2, 2, 4, d), torch.randn(2, 2, 4)
    qs = (torch.rand(2, 2, 4) + 0.1).to(DEV)
    q, w = q.to(FP8).to(DEV), w.to(DEV)
    table = torch.tensor([[6, 1, 4], [3, 7, 10 ** 6]], dtype=torch.int32, device=DEV)
    lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref = indexer_logits_paged_ref(q, w, cache.ik[0], table, lens, qs, bs)  # [2, 2, 192]
    end = lens[:, None] - 1 + torch.arange(2, device=DEV)
    assert_logits_close(ref, indexer_logits_ref(q, hand.to(DEV), w, qs, k_end=end))
    assert_logits_close(indexer_logits_paged_triton(q, w, cache.ik[0], table, lens, qs, bs), ref)


def test_dispatch_and_errors():
    q, k, w, _, _ = inputs(1, 4, 8, 2, 16)
    assert torch.equal(indexer_logits(q, k, w), indexer_logits_ref(q, k, w))  # CPU: the reference
    with force("triton"):
        qd, kd, wd = q.to(DEV), k.to(DEV), w.to(DEV)
        assert_logits_close(indexer_logits(qd, kd, wd), indexer_logits_ref(qd, kd, wd))
    with pytest.raises(ValueError, match="w must have shape"):
        indexer_logits(q, k, w[:, :2])
    with pytest.raises(ValueError, match="q_scale"):
        indexer_logits(q.to(FP8), k, w)
    with pytest.raises(ValueError, match="differentiable"):
        indexer_logits(q.to(FP8), k.to(FP8), w.requires_grad_(), torch.ones(1, 4, 2), torch.ones(1, 8))
    pq, pw, cache, table, lens, qs, bs = paged_setup([3, 9])
    with pytest.raises(ValueError, match="cache must be"):
        indexer_logits_paged(pq, pw, cache[:, :-1], table, lens, None, bs)
    with pytest.raises(ValueError, match="n >= 1"):
        indexer_logits_paged(pq[:, :0], pw[:, :0], cache, table, lens, None, bs)
    with force("ref"):
        want = indexer_logits_paged_ref(pq, pw, cache, table, lens, None, bs)
        assert torch.equal(indexer_logits_paged(pq, pw, cache, table, lens, None, bs), want)


# --- GPU, real shapes --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_prefill(fp8):
    b, s, t, h, d = 1, 512, 4096, 64, 128
    q, k, w, qs, ks = inputs(b, s, t, h, d, fp8, "cuda")
    end = (t - s + 1 + torch.arange(s, device="cuda")).expand(b, s)
    assert_logits_close(indexer_logits(q, k, w, qs, ks, end), indexer_logits_ref(q, k, w, qs, ks, end), 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_paged_128k(fp8):
    b, n, h, d, bs = 2, 2, 64, 128, 64
    max_blocks = 131072 // bs
    keys = torch.randn(b * max_blocks * bs, d, device="cuda")
    cache = fp8_page_cache(keys, bs) if fp8 else keys.bfloat16()
    table = torch.randperm(b * max_blocks, device="cuda").view(b, max_blocks).int()
    lens = torch.tensor([131072, 70001], dtype=torch.int32, device="cuda")
    q, w = torch.randn(b, n, h, d, device="cuda"), torch.randn(b, n, h, device="cuda")
    qs = torch.rand(b, n, h, device="cuda") + 0.1 if fp8 else None
    q = q.to(FP8) if fp8 else q.bfloat16()
    got = indexer_logits_paged(q, w, cache, table, lens, qs, bs)
    assert_logits_close(got, indexer_logits_paged_ref(q, w, cache, table, lens, qs, bs), 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("config", _paged_configs(), ids=str)
def test_gpu_paged_keys_arrive_in_16_byte_copies(config):
    """What the page layout is for: compiled, the kernel copies the FP8 keys to shared memory in
    16-byte cp.async (132-byte interleaved rows allowed only 4-byte ones, all of the copies); the
    4-byte copies left are block ids and scales."""
    q, w, cache, table, lens, qs, bs = paged_setup([100, 64], h=64, d=128, bs=64, max_blocks=2, fp8_q=True)
    _, grid, args, _ = _paged_args(q, w, cache, table, lens, qs, bs)
    kernel = _paged_kernel.warmup(*args, grid=grid, **config.kwargs, num_warps=config.num_warps,
                                  num_stages=config.num_stages)
    sizes = [int(x, 0) for x in re.findall(r"cp\.async\.c[ag]\.shared\.global\S* \[[^\]]*\], \[[^\]]*\], "
                                           r"(0x[0-9a-f]+|\d+)", kernel.asm["ptx"])]
    # Triton 3.6 on the H100: 70-73% of the copied bytes in 16-byte copies (the old layout: 0%)
    assert sizes and sum(x for x in sizes if x == 16) >= 0.6 * sum(sizes), sorted(sizes)
