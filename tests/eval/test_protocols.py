"""The IOI/ICPC protocol on hand-built candidate sets: what is filtered, which are submitted,
and the max-over-subtasks score."""

import pytest

from dsv32.eval.protocols import Candidate, filter_candidates, ioi_score, select_submissions


def cand(i, think, ok=True, within=True, refused=False, scores=(0.0, 0.0, 0.0)):
    return Candidate(f"c{i}", think, ok, within, refused, list(scores))


def test_failed_samples_overlong_and_refusals_are_dropped():
    cs = [cand(0, 10), cand(1, 99, ok=False), cand(2, 98, within=False), cand(3, 97, refused=True), cand(4, 5)]
    assert [c.id for c in filter_candidates(cs)] == ["c0", "c4"]


def test_the_longest_thinking_survivors_are_submitted_up_to_the_limit():
    cs = [cand(0, 10), cand(1, 500, ok=False), cand(2, 30), cand(3, 20), cand(4, 30)]
    assert [c.id for c in select_submissions(cs, limit=3)] == ["c2", "c4", "c3"]
    assert select_submissions([cand(0, 1, refused=True)]) == []


def test_an_ioi_problem_scores_the_best_submission_per_subtask():
    subs = [cand(0, 1, scores=(1.0, 0.0, 0.5)), cand(1, 1, scores=(0.0, 1.0, 0.2))]
    assert ioi_score(subs, [10, 30, 60]) == pytest.approx(10 + 30 + 30)
    assert ioi_score([], [10, 30, 60]) == 0.0
    with pytest.raises(ValueError, match="c0 has 3 subtask scores, the problem has 2"):
        ioi_score(subs, [50, 50])
