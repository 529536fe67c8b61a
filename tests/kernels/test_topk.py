"""Top-k: the Triton radix select against torch.topk, as sets. The small cases run under Triton's
interpreter on CPU and compiled on a GPU; the `gpu` ones at real shapes."""

from dataclasses import replace

import pytest
import torch

from dsv32.kernels import force
from dsv32.kernels.topk import (
    BRACKET_STOP,
    FEW_ROWS,
    MANY_ROWS,
    MAX_CAP,
    MODE_SAMPLE,
    SELECT_STOP,
    _bracket,
    _partition,
    _plan,
    topk,
    topk_ref,
    topk_triton,
)
from dsv32.model.indexer import topk_select

NEG = float("-inf")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def assert_topk_set(scores: torch.Tensor, got: torch.Tensor, k: int):
    """got is a valid top-k of scores: min(k, #finite) distinct finite indices first, then -1;
    every chosen score >= the k-th largest; the chosen scores equal the k largest as a multiset."""
    assert got.shape == (scores.shape[0], k) and got.dtype == torch.int32
    scores, got = scores.cpu(), got.cpu().long()
    for r in range(scores.shape[0]):
        finite = scores[r][scores[r] > NEG]
        n = min(k, finite.numel())
        assert (got[r, :n] >= 0).all() and (got[r, n:] == -1).all(), f"row {r}: wrong -1 slots"
        idx = got[r, :n]
        assert idx.unique().numel() == n, f"row {r}: repeated indices"
        chosen = scores[r, idx].sort(descending=True).values
        best = finite.sort(descending=True).values[:n]
        assert (chosen > NEG).all(), f"row {r}: a masked key was chosen"
        if n:
            assert chosen[-1] >= best[-1], f"row {r}: a chosen score is below the k-th largest"
        assert torch.equal(chosen, best), f"row {r}: chosen scores differ from the {n} largest"


def test_ref_and_the_models_selection_are_top_k_sets():
    """topk_ref against a full sort (assert_topk_set), and topk_select's layout for the model:
    [B, S, min(k, T)] int64, a query with fewer than k allowed keys gets all of them, then -1."""
    x = torch.randn(3, 50)
    x[1, 10:] = NEG
    assert_topk_set(x, topk_ref(x, 20), 20)
    sel = topk_select(x[None], 20)[0]
    assert sel.dtype == torch.int64 and sel.shape == (3, 20)
    assert sorted(sel[1, :10].tolist()) == list(range(10)) and (sel[1, 10:] == -1).all()
    assert set(sel[0].tolist()) == set(x[0].argsort(descending=True)[:20].tolist())
    assert topk_select(x[None], 80).shape == (1, 3, 50)


@pytest.mark.parametrize("r,n,k", [(3, 100, 10), (2, 5000, 300), (3, 20000, 64), (2, 20000, 1000)])
def test_random_rows(r, n, k):
    x = torch.randn(r, n, device=DEV)
    assert_topk_set(x, topk_triton(x, k), k)


def test_k_above_n_and_masked_rows():
    x = torch.randn(4, 3000, device=DEV)
    x[0] = NEG                 # nothing allowed
    x[1, 7:] = NEG             # fewer finite than k
    x[2, ::2] = NEG            # ragged
    for k in (50, 5000):
        assert_topk_set(x, topk_triton(x, k), k)


def test_ties_at_the_threshold():
    # few distinct values: the k-th value is shared by many keys (and the bracket cannot hold)
    x = torch.randint(0, 4, (2, 20000), device=DEV).float()
    x[1, 5000:] = NEG
    assert_topk_set(x, topk_triton(x, 64), 64)
    assert_topk_set(x, topk_triton(x, 1500), 1500)
    small = torch.randint(0, 3, (3, 700), device=DEV).float()
    assert_topk_set(small, topk_triton(small, 100), 100)


def test_strided_input_and_negative_scores():
    x = -torch.rand(40, 3000, device=DEV).t()[:7]  # non-contiguous rows, all negative
    assert_topk_set(x, topk_triton(x, 33), 33)


def test_bracket_holds_on_random_rows():
    """The fast path runs: the sample quantiles bracket the k-th largest key."""
    n, k = 20000, 1000
    assert _plan(n, k, FEW_ROWS.groups)[0] == MODE_SAMPLE
    x = torch.randn(4, n, device=DEV)
    _, _, bounds, _ = _bracket(x, k, FEW_ROWS)
    bounds, x = bounds.cpu(), x.cpu()
    kth = x.topk(k, dim=-1).values[:, -1]
    key = kth.view(torch.int32).long() & 0xFFFFFFFF
    key = torch.where(kth < 0, 0xFFFFFFFF - key, key | 0x80000000)
    assert (bounds[:, 0] <= key).all() and (key <= bounds[:, 1]).all()
    assert (bounds[:, 0] > 1).all() and (bounds[:, 1] < 0xFFFFFFFF).all()  # a real bracket


def test_dispatch_and_errors():
    x = torch.randn(2, 64)
    assert torch.equal(topk(x, 8), topk_ref(x, 8))  # CPU tensors: the reference
    with force("triton"):
        assert_topk_set(x, topk(x.to(DEV), 8), 8)
    with pytest.raises(ValueError, match="scores"):
        topk(x.double(), 8)
    with pytest.raises(ValueError, match="k"):
        topk(x, 0)


SMALL = [FEW_ROWS, MANY_ROWS]


@pytest.mark.parametrize("launch", SMALL + [replace(FEW_ROWS, programs_per_sm=1)],
                         ids=["few_rows", "many_rows", "few_rows_one_program"])
def test_both_launches_on_random_ties_masked_and_short_rows(launch):
    """Each fixed launch (split partition with atomics, and one program per row counting in
    registers) against assert_topk_set: random rows on the sampled path, tie-heavy rows whose
    bracket cannot hold, mostly -inf rows, rows shorter than k, and a length off the block grid."""
    n = MAX_CAP + 3 * launch.block + 517
    x = torch.randn(6, n, device=DEV)
    x[1] = torch.randint(0, 5, (n,), device=DEV).float()  # ties at the k-th value
    x[2, torch.randperm(n, device=DEV)[:n - 40]] = NEG    # 40 finite scores, scattered
    x[3] = NEG
    x[4, : n // 2] = NEG                                   # the first half masked
    x[5, 100:] = NEG                                       # 100 finite: fewer than k
    assert _plan(n, 300, launch.groups)[0] == MODE_SAMPLE
    for k in (300, 2000):
        assert_topk_set(x, topk_triton(x, k, launch), k)
    short = torch.randn(3, 900, device=DEV)
    assert_topk_set(short, topk_triton(short, 1000, launch), 1000)  # k > n
    assert_topk_set(short, topk_triton(short, 64, launch), 64)      # n <= MAX_CAP: all candidates


def fast_path(x: torch.Tensor, k: int, launch) -> torch.Tensor:
    """Per row, whether the select takes the bracketed fast path (not the whole-row redo):
    the partition's counts hold the k-th largest within the candidate capacity."""
    mode, cap, bounds, counts = _bracket(x, k, launch)
    out = torch.empty(x.shape[0], k, dtype=torch.int32, device=x.device)
    _partition(x, k, launch, mode, cap, bounds, counts, out)
    n_sure, n_cand = counts[:, 0].cpu(), counts[:, 1].cpu()
    assert mode == MODE_SAMPLE
    return (n_sure <= k) & (n_cand <= cap) & (n_sure + n_cand >= k)


@pytest.mark.parametrize("launch", SMALL, ids=["few_rows", "many_rows"])
def test_select_narrows_then_ranks_pairwise_or_takes_ties(launch):
    """The fast path on both of its endings: random rows narrow to <= SELECT_STOP candidates and
    rank them pairwise; rows of 200 integer values (about 85 copies each, more than SELECT_STOP)
    narrow to one value and take the first of its ties. The rows' brackets must hold (fast_path),
    so the whole-row redo cannot hide a wrong select."""
    n, k = MAX_CAP + 8709, 300
    x = torch.randn(4, n, device=DEV)
    x[2:] = torch.randint(0, 200, (2, n), device=DEV).float()
    x[3, ::3] = NEG
    assert fast_path(x, k, launch).all()
    assert (x[2] == x[2].topk(k).values[-1]).sum() > SELECT_STOP  # the ties outnumber the stop
    assert_topk_set(x, topk_triton(x, k, launch), k)


def test_candidate_cap_holds_the_bracket_with_margin():
    """_plan's capacity: the expected candidates (the bracket's share of the sample times n) plus
    5 standard deviations of their count, rounded up to a power of two, for both sample sizes."""
    n, k = 131072, 2048
    for launch in SMALL:
        mode, r_hi, r_lo, cap = _plan(n, k, launch.groups)
        s = launch.groups * 8
        expected = (r_lo - r_hi + 2 * BRACKET_STOP) / s * n
        assert mode == MODE_SAMPLE and r_hi < k * s / n < r_lo
        assert cap >= expected * (1 + 5 / (r_lo - r_hi) ** 0.5) and cap & (cap - 1) == 0
        assert cap < 2 * expected * (1 + 5 / (r_lo - r_hi) ** 0.5)
    assert _plan(n, k, FEW_ROWS.groups)[3] < _plan(n, k, MANY_ROWS.groups)[3] or FEW_ROWS.groups == MANY_ROWS.groups


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 128, 4096])
def test_gpu_real_shapes(rows):
    x = torch.randn(rows, 131072, device="cuda")
    assert_topk_set(x[:64], topk(x, 2048)[:64], 2048)


@pytest.mark.gpu
@pytest.mark.parametrize("launch", SMALL, ids=["few_rows", "many_rows"])
def test_gpu_bracket_holds_at_the_benchmark_shape(launch):
    """Rows of 131072 normal scores, k = 2048: every row takes the fast path with either launch
    (a miss would be correct but redo the whole row, several times slower)."""
    x = torch.randn(256, 131072, device="cuda")
    assert fast_path(x, 2048, launch).all()
    assert_topk_set(x[:16], topk_triton(x, 2048, launch)[:16], 2048)


@pytest.mark.gpu
def test_gpu_causal_rows_and_ties():
    n = 131072
    x = torch.randn(64, n, device="cuda")
    ends = torch.randint(1, n, (64,), device="cuda")
    ends[:4] = torch.tensor([1, 100, 2048, 2049])
    x.masked_fill_(torch.arange(n, device="cuda") >= ends[:, None], NEG)
    assert_topk_set(x, topk(x, 2048), 2048)
    ties = torch.randint(0, 8, (16, n), device="cuda").float()
    assert_topk_set(ties, topk(ties, 2048), 2048)
