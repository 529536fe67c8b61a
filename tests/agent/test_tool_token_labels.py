"""The agent experiments' tool-token weight (experiments/agent_context.py `tool_token_labels`):
the expert's labels stay, the other tokens become targets at the asked rate."""

import math
import random
import sys
from pathlib import Path

import pytest

from dsv32.train.losses import IGNORE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from agent_context import tool_token_labels  # noqa: E402


def examples(n: int = 40, length: int = 500, seed: int = 0):
    """(ids, labels) with about a fifth of each example labelled as the expert's."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, 4096) for _ in range(length)]
        out.append((ids, [t if rng.random() < 0.2 else IGNORE for t in ids]))
    return out


def test_weight_zero_keeps_the_expert_labels_and_weight_one_labels_every_token():
    ex = examples()
    assert tool_token_labels(ex, 0.0, seed=1) == ex
    assert [lab for _, lab in tool_token_labels(ex, 1.0, seed=1)] == [ids for ids, _ in ex]


def test_a_fractional_weight_labels_that_share_of_the_other_tokens_with_their_own_ids():
    ex, w = examples(), 0.25
    got = tool_token_labels(ex, w, seed=3)
    others = labelled = 0
    for (ids, old), (ids2, new) in zip(ex, got):
        assert ids2 == ids
        for t, a, b in zip(ids, old, new):
            if a != IGNORE:
                assert b == a            # the expert's targets are untouched
            else:
                others += 1
                labelled += b != IGNORE
                assert b in (IGNORE, t)  # a new target is the token itself
    sd = math.sqrt(others * w * (1 - w))
    assert abs(labelled - w * others) < 5 * sd   # binomial(others, w), 5 standard deviations
    assert tool_token_labels(ex, w, seed=3) == got   # seeded


@pytest.mark.parametrize("w", [-0.1, 1.5])
def test_a_weight_outside_zero_one_is_refused(w):
    with pytest.raises(ValueError, match="tool-token weight"):
        tool_token_labels(examples(n=1), w, seed=0)
