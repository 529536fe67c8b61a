"""pass@k against the binomial formula computed directly with math.comb, and its edge cases."""

import math
import statistics
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.eval.passk import aggregate, pass_at_k


def direct(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@st.composite
def nck(draw):
    n = draw(st.integers(1, 300))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@settings(max_examples=300, deadline=None)
@given(nck())
def test_pass_at_k_equals_one_minus_the_ratio_of_binomials(args):
    n, c, k = args
    assert pass_at_k(n, c, k) == pytest.approx(direct(n, c, k), abs=1e-12)


def test_pass_at_k_stays_finite_where_the_binomials_overflow_a_float():
    n, c, k = 2000, 3, 500  # C(2000, 500) ~ 1e486
    assert pass_at_k(n, c, k) == pytest.approx(float(1 - Fraction(math.comb(n - c, k), math.comb(n, k))), rel=1e-12)


def test_edge_cases():
    assert pass_at_k(16, 0, 1) == 0.0 and pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0 and pass_at_k(16, 16, 16) == 1.0
    assert pass_at_k(16, 1, 16) == 1.0  # k = n: all samples drawn, the correct one among them
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the fraction correct


def test_k_beyond_n_is_refused():
    with pytest.raises(ValueError, match=r"pass@17 needs at least k=17 samples per task, but the task has n=16"):
        pass_at_k(16, 3, 17)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(4, 1, 0)


def test_aggregate_is_the_mean_over_tasks_with_its_standard_error():
    counts = [(8, 0), (8, 3), (8, 8), (8, 5)]
    values = [direct(n, c, 2) for n, c in counts]
    got = aggregate(counts, 2)
    assert got.mean == pytest.approx(statistics.mean(values))
    assert got.stderr == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert got.tasks == 4 and aggregate([(8, 3)], 1).stderr == 0.0
    with pytest.raises(ValueError, match="no tasks"):
        aggregate([], 1)
