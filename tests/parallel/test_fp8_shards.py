"""The sharded FP8 layers at tp=2, simulated in one process: each rank's part cut from a full
FP8Linear as the sharded loader cuts it (load.fp8_part), multiplied by the layers of
dsv32.parallel (the row-parallel all-reduce done by hand as a sum), against the unsharded
FP8Linear and against a dequantised fp32 product with a bound worked out from e4m3's rounding."""

import logging

import pytest
import torch
import torch.nn as nn

from dsv32.kernels import force
from dsv32.kernels.fp8_gemm import act_quant_ref
from dsv32.model import fp8 as fp8_mod
from dsv32.model.fp8 import FP8, FP8Linear, fp8_paths, weight_dequant
from dsv32.parallel import layers
from dsv32.parallel.layers import RowParallelLinear, local_linear
from dsv32.parallel.load import fp8_part

BLOCK = (128, 128)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine: cuBLASLt or Triton compiled


@pytest.fixture(autouse=True)
def _default_device():
    with torch.device(DEV):
        yield


def _full(out_features, in_features, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(lin.weight, std=0.05)
    return FP8Linear.from_linear(lin)


def _shard(full: FP8Linear, idx, cls):
    """Rank part idx of `full` as the sharded loader builds it (keep_fp8, then fp8_part)."""
    w, s, offset = fp8_part(full.weight, full.weight_scale_inv, idx, tuple(full.weight.shape), BLOCK)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w.clone(), requires_grad=False)
    lin.register_buffer("weight_scale_inv", s.clone())
    lin.fp8_block = BLOCK
    if offset != (0, 0):
        lin.fp8_offset = offset
    lin.__class__ = cls
    return lin


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _within_fp8_bound(y, x, w_deq):
    """|y - x @ W^T| <= (|dx|) @ |W|^T + fp32 slack, elementwise, where dx bounds the rounding of
    x to e4m3 per 1x128 block of scale s: half an ulp, 2^-4 |x| for normals (3 mantissa bits)
    and 2^-10 s below 2^-6 s (subnormal spacing 2^-9)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    _, s = act_quant_ref(x2.float())
    dx = 2.0 ** -4 * x2.abs() + 2.0 ** -10 * s.double().repeat_interleave(128, 1)
    w = w_deq.double()
    ref = x2 @ w.t()
    bound = dx @ w.abs().t() + 1e-5 * (x2.abs() @ w.abs().t())
    err = (y.reshape(ref.shape).double() - ref).abs()
    assert (err <= bound).all(), f"error {err.max():.3e} over the FP8 bound where it is {bound[err > bound][0]:.3e}"
    return ref


@pytest.fixture
def calls(monkeypatch):
    """Count the calls of the one FP8 linear and of the fallback."""
    seen = {"fp8_linear": 0}
    real = fp8_mod.fp8_linear

    def counted(*a):
        seen["fp8_linear"] += 1
        return real(*a)

    monkeypatch.setattr(layers, "fp8_linear", counted)
    monkeypatch.setattr(layers, "dequantised_calls", 0)
    return seen


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_aligned_tp2_shards_multiply_in_fp8_and_equal_the_unsharded_layer(backend, calls):
    x = torch.randn(3, 5, 512)
    col = _full(512, 512, seed=1)    # column-parallel: rows 0:256 and 256:512
    row = _full(384, 512, seed=2)    # row-parallel: columns 0:256 and 256:512
    cols = [_shard(col, (slice(r * 256, (r + 1) * 256), slice(None)), layers.FP8Linear) for r in range(2)]
    rows = [_shard(row, (slice(None), slice(r * 256, (r + 1) * 256)), RowParallelLinear) for r in range(2)]
    assert fp8_paths(nn.ModuleList(cols + rows))["dequantise"] == []
    with force(backend):
        y_col = torch.cat([m(x) for m in cols], -1)
        y_row = sum(local_linear(m, x[..., r * 256:(r + 1) * 256]) for r, m in enumerate(rows))  # all-reduce by hand
        want_col, want_row = col(x), row(x)
    assert calls == {"fp8_linear": 4} and layers.dequantised_calls == 0
    # the same e4m3 bytes and the same 1x128 activation blocks: only fp32 summation order differs
    assert _rel(y_col, want_col) < 1e-6 and _rel(y_row, want_row) < 1e-6
    for y, full in ((y_col, col), (y_row, row)):
        _within_fp8_bound(y, x, weight_dequant(full.weight, full.weight_scale_inv, dtype=torch.float32))


def test_a_shard_that_cuts_a_block_falls_back_exactly_and_logs_once(calls, caplog):
    x = torch.randn(4, 384)
    col = _full(384, 384, seed=3)    # tp=2 rows 0:192 (kernel) and 192:384 (starts 64 rows into a block)
    row = _full(256, 384, seed=4)    # tp=2 columns 0:192 (K no multiple of 128), 192:384 (inside a block)
    cols = [_shard(col, (slice(r * 192, (r + 1) * 192), slice(None)), layers.FP8Linear) for r in range(2)]
    rows = [_shard(row, (slice(None), slice(r * 192, (r + 1) * 192)), RowParallelLinear) for r in range(2)]
    assert cols[1].fp8_offset == (64, 0) and rows[1].fp8_offset == (0, 64)
    assert fp8_paths(nn.ModuleList(cols + rows))["dequantise"] == ["1", "2", "3"]
    full_col = weight_dequant(col.weight, col.weight_scale_inv, dtype=torch.float32)
    full_row = weight_dequant(row.weight, row.weight_scale_inv, dtype=torch.float32)
    # the checkpoint's bytes are kept, not requantised: the dequantised parts are the full weight's slices
    assert torch.equal(layers.weight_of(cols[1], torch.float32), full_col[192:])
    assert torch.equal(layers.weight_of(rows[1], torch.float32), full_row[:, 192:])
    with caplog.at_level(logging.WARNING, logger="dsv32.parallel.layers"), force("ref"):
        y_col = torch.cat([m(x) for m in cols], -1)
        y_row = sum(local_linear(m, x[:, r * 192:(r + 1) * 192]) for r, m in enumerate(rows))
        want_col, want_row = col(x), row(x)
    assert calls == {"fp8_linear": 1} and layers.dequantised_calls == 3
    assert len(caplog.records) == 1   # three fallback calls, one warning
    assert "starts inside a 128x128 block" in caplog.records[0].message
    # the fallback multiplies unquantised activations: the dequantised product to fp32 rounding
    assert _rel(y_col[:, 192:], x @ full_col[192:].t()) < 1e-6
    assert _rel(y_row, x @ full_row.t()) < 1e-6
    # and the unsharded FP8Linear (activations in e4m3) within the FP8 bound of the same product
    _within_fp8_bound(want_col, x, full_col)
    _within_fp8_bound(want_row, x, full_row)
    _within_fp8_bound(y_col, x, full_col)


def test_fp8_part_reads_the_blocks_a_slice_overlaps_by_hand():
    w = torch.zeros(300, 256).to(FP8)
    s = torch.arange(6.0).view(3, 2)                       # blocks of rows 0-127, 128-255, 256-299
    part, scale, offset = fp8_part(w, s, (slice(100, 260), slice(128, 256)), (300, 256), BLOCK)
    assert part.shape == (160, 128) and offset == (100, 0)
    assert torch.equal(scale, torch.tensor([[1.0], [3.0], [5.0]]))   # rows 100..259 touch all three
