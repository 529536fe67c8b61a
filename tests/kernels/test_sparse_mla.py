"""Sparse MLA (MQA mode): the reference against dense masked attention and autograd, the Triton
kernels against the reference (under Triton's interpreter on CPU, at real shapes on GPU)."""

import pytest
import torch

from dsv32.kernels import force, sparse_mla as sm
from dsv32.kernels.sparse_mla import (sparse_mla, sparse_mla_bwd, sparse_mla_bwd_ref, sparse_mla_fwd,
                                      sparse_mla_fwd_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _default_device():
    """Tensors made without a device live on DEV: the small cases run compiled on a GPU machine."""
    with torch.device(DEV):
        yield


def make(t, h, n, k, d_v, d_pe, dtype, device=DEV, p_invalid=0.2):
    """Random q, kv and duplicate-free indices, some -1, and row 1 with no key at all."""
    q = torch.randn(t, h, d_v + d_pe, dtype=dtype, device=device)
    kv = torch.randn(n, d_v + d_pe, dtype=dtype, device=device)
    idx = torch.rand(t, n, device=device).argsort(-1)[:, :k].int()
    idx[torch.rand(t, k, device=device) < p_invalid] = -1
    idx[1] = -1
    return q, kv, idx, (d_v + d_pe) ** -0.5


def close(got, want, tol):
    err = (got.float() - want.float()).abs().max().item()
    ref = want.float().abs().max().item()
    assert err <= tol * ref, f"max error {err:.3g} > {tol} x max |want| {ref:.3g}"


def dense_masked(q, kv, idx, scale, d_v):
    """Independent truth: attention over all N keys with the unselected ones masked out."""
    sel = torch.zeros(idx.shape[0], kv.shape[0] + 1, dtype=torch.bool)
    sel = sel.scatter(1, idx.long() % (kv.shape[0] + 1), True)[:, :-1]      # -1 -> dummy column
    s = torch.einsum("thd,nd->thn", q, kv) * scale
    s = s.masked_fill(~sel[:, None, :], float("-inf"))
    return torch.softmax(s, -1) @ kv[:, :d_v], torch.logsumexp(s, -1)


@pytest.mark.parametrize("chunk", [1 << 26, 1000])  # one chunk; many chunks of a few queries
def test_ref_is_dense_attention_over_the_selected_keys(monkeypatch, chunk):
    monkeypatch.setattr(sm, "CHUNK", chunk)
    q, kv, idx, scale = make(7, 4, 50, 12, 24, 8, torch.float64)
    out, lse = sparse_mla_fwd_ref(q, kv, idx, scale, d_v=24)
    want, want_lse = dense_masked(q, kv, idx, scale, 24)
    has = (idx >= 0).any(1)
    torch.testing.assert_close(out[has], want[has])
    torch.testing.assert_close(lse[has], want_lse[has])
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()        # the row with no key


def test_ref_backward_matches_autograd_of_ref_forward(monkeypatch):
    monkeypatch.setattr(sm, "CHUNK", 2000)
    q, kv, idx, scale = make(6, 4, 30, 10, 16, 8, torch.float64)
    q.requires_grad_(True), kv.requires_grad_(True)
    out, lse = sparse_mla_fwd_ref(q, kv, idx, scale, d_v=16)
    dout = torch.randn_like(out)
    dq_want, dkv_want = torch.autograd.grad(out, (q, kv), dout)
    dq, dkv = sparse_mla_bwd_ref(q.detach(), kv.detach(), idx, out.detach(), lse, dout, scale, 16)
    torch.testing.assert_close(dq, dq_want)
    torch.testing.assert_close(dkv, dkv_want)
    assert (dq[1] == 0).all()


def test_op_gradcheck_on_reference():
    q, kv, idx, scale = make(3, 2, 9, 5, 8, 4, torch.float64, p_invalid=0.3)
    q.requires_grad_(True), kv.requires_grad_(True)
    with force("ref"):
        assert torch.autograd.gradcheck(lambda a, b: sparse_mla(a, b, idx, scale, 8), (q, kv))


# Triton under the interpreter: H = 24 is two head blocks of 16 (the second half empty), K = 40 is
# three blocks of 16 (the last one partial), latent 64 + rope 32. fp16, because the interpreter
# (Triton 3.9) multiplies bf16 tiles as their raw uint16 bits; bf16 is covered by the GPU tests.
SMALL = dict(t=5, n=64, k=40, d_v=64, d_pe=32, dtype=torch.float16)


@pytest.mark.parametrize("h", [16, 24])
def test_triton_forward_matches_ref(h):
    q, kv, idx, scale = make(h=h, **SMALL)
    out, lse = sparse_mla_fwd(q, kv, idx, scale, d_v=64)
    want, want_lse = sparse_mla_fwd_ref(q, kv, idx, scale, d_v=64)
    close(out, want, 1e-2)
    has = (idx >= 0).any(1)
    torch.testing.assert_close(lse[has], want_lse[has], atol=1e-2, rtol=0)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()


@pytest.mark.parametrize("growth", [0.5, 6.0])  # per block of 16 keys, in score units
def test_triton_forward_when_the_max_grows_across_blocks(growth):
    """Lazy rescaling: later key blocks score higher by `growth` each, so the running max moves by
    less than the threshold (no rescale, p up to 2^8) or by more (rescale); both stay exact."""
    q, kv, idx, _ = make(h=24, p_invalid=0.0, **SMALL)
    idx[1] = torch.arange(40, dtype=torch.int32)
    q = (q.float() / q.float().norm(dim=-1, keepdim=True)).half()         # |q| = 1 per head
    ramp = torch.arange(64, device=kv.device).div(16, rounding_mode="floor") * growth
    kv = (kv.float() / kv.float().norm(dim=-1, keepdim=True)).half()
    kv[:, :64] += ramp[:, None].half() * q[0, 0, :64].float().sign().half()  # score ~ ramp . |q_lat|_1
    idx = idx.sort(-1).values                                             # blocks visit keys in order
    out, lse = sparse_mla_fwd(q, kv, idx, 1.0, d_v=64)
    want, want_lse = sparse_mla_fwd_ref(q, kv, idx, 1.0, d_v=64)
    close(out, want, 1e-2)
    torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=1e-3)


def test_triton_backward_matches_ref():
    q, kv, idx, scale = make(h=24, **SMALL)
    out, lse = sparse_mla_fwd_ref(q, kv, idx, scale, d_v=64)
    dout = torch.randn_like(out)
    dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, 64)
    dq_want, dkv_want = sparse_mla_bwd_ref(q, kv, idx, out, lse, dout, scale, 64)
    close(dq, dq_want, 2e-2)
    close(dkv, dkv_want, 2e-2)
    assert (dq[1] == 0).all()
    untouched = torch.ones(kv.shape[0], dtype=torch.bool, device=kv.device)
    untouched[idx[idx >= 0].long()] = False
    assert (dkv[untouched] == 0).all()


def test_op_dispatches_and_its_gradients_agree():
    q, kv, idx, scale = make(h=16, **SMALL)
    grads = {}
    for backend in ("ref", "triton"):
        a, b = q.clone().requires_grad_(True), kv.clone().requires_grad_(True)
        with force(backend):
            out = sparse_mla(a, b, idx, scale, d_v=64)
            out.float().square().sum().backward()
        grads[backend] = out.detach(), a.grad, b.grad
    for got, want in zip(grads["triton"], grads["ref"]):
        close(got, want, 2e-2)


def test_bad_inputs_raise():
    q, kv, idx, scale = make(3, 2, 9, 5, 16, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="idx must be int32"):
        sparse_mla_fwd_ref(q, kv, idx.long(), scale, 16)
    with pytest.raises(ValueError, match="kv must be"):
        sparse_mla_fwd_ref(q, kv[:, :20], idx, scale, 16)
    with pytest.raises(ValueError, match="d_v"):
        sparse_mla_fwd_ref(q, kv, idx, scale, 40)
    with pytest.raises(ValueError, match="power of two"):
        sparse_mla_fwd(q, kv, idx, scale, 24)


# ----------------------------------------------------------------------------- GPU, real shapes

@pytest.mark.gpu
@pytest.mark.parametrize("t,h,n", [(256, 128, 8192), (1024, 64, 32768), (4096, 128, 32768),
                                   (300, 16, 8192)])
def test_gpu_forward_backward_match_ref(t, h, n):
    q, kv, idx, scale = make(t, h, n, 2048, 512, 64, torch.bfloat16, "cuda", p_invalid=0.1)
    out, lse = sparse_mla_fwd(q, kv, idx, scale)
    want, want_lse = sparse_mla_fwd_ref(q, kv, idx, scale)
    close(out, want, 1e-2)
    has = (idx >= 0).any(1)
    torch.testing.assert_close(lse[has], want_lse[has], atol=1e-2, rtol=0)
    dout = torch.randn_like(out)
    dq, dkv = sparse_mla_bwd(q, kv, idx, want, want_lse, dout, scale)
    dq_want, dkv_want = sparse_mla_bwd_ref(q, kv, idx, want, want_lse, dout, scale)
    close(dq, dq_want, 2e-2)
    close(dkv, dkv_want, 2e-2)


@pytest.mark.gpu
def test_gpu_op_uses_kernels_and_trains():
    q, kv, idx, scale = make(256, 128, 8192, 2048, 512, 64, torch.bfloat16, "cuda")
    a, b = q.clone().requires_grad_(True), kv.clone().requires_grad_(True)
    out = sparse_mla(a, b, idx, scale)
    out.float().square().sum().backward()
    with force("ref"):
        a2, b2 = q.clone().requires_grad_(True), kv.clone().requires_grad_(True)
        want = sparse_mla(a2, b2, idx, scale)
        want.float().square().sum().backward()
    close(out, want, 1e-2)
    close(a.grad, a2.grad, 2e-2)
    close(b.grad, b2.grad, 2e-2)
