"""The bit-equal share of replayed log-probs: over all sampled tokens, and among tokens whose kept
set held more than one candidate (a lone kept token has log-prob 0 on both sides whatever the
arithmetic), checked on a constructed batch whose shares are counted by hand."""

import pytest
import torch

from dsv32.rl.agreement import bitwise_agreement, kept_sizes
from dsv32.rl.objective import kept_sets


def test_a_constructed_batch_gives_the_hand_counted_shares():
    # six sampled tokens: kept sets of sizes 1, 3, 1, whole vocabulary, 2, 1
    keep = kept_sets([[7], [1, 4, 9], [2], None, [5, 6], [3]])
    assert kept_sizes(keep).tolist() == [1, 3, 1, -1, 2, 1]
    sampler = torch.tensor([0.0, -0.5, 0.0, -2.0, -0.25, 0.0])
    # the trainer: the three lone tokens bit-equal (0 = 0), of the three others only the 4th
    trainer = torch.tensor([0.0, -0.5 + 2 ** -10, 0.0, -2.0, -0.25 - 2 ** -8, 0.0])
    got = bitwise_agreement(trainer, sampler, kept_sizes(keep))
    assert got["sampled_tokens"] == 6 and got["multi_candidate_tokens"] == 3
    assert got["bit_equal_share"] == pytest.approx(4 / 6)       # 3 lone + 1 multi
    assert got["bit_equal_share_multi"] == pytest.approx(1 / 3)
    assert got["mean_abs_diff_multi"] == pytest.approx((2 ** -10 + 0 + 2 ** -8) / 3)


def test_without_kept_sets_a_token_is_multi_candidate_where_its_log_prob_is_not_zero():
    sampler = torch.tensor([0.0, -1.0, -3.0, 0.0])
    trainer = torch.tensor([0.0, -1.0, -3.0 + 1e-3, 0.0])
    got = bitwise_agreement(trainer, sampler)
    assert got["multi_candidate_tokens"] == 2
    assert got["bit_equal_share"] == pytest.approx(3 / 4) and got["bit_equal_share_multi"] == pytest.approx(1 / 2)


def test_only_lone_tokens_have_no_multi_candidate_share():
    keep = kept_sets([[1], [2]])
    got = bitwise_agreement(torch.zeros(2), torch.zeros(2), kept_sizes(keep))
    assert got["bit_equal_share"] == 1.0 and got["bit_equal_share_multi"] is None


def test_mismatched_shapes_are_refused_with_a_message():
    with pytest.raises(ValueError, match="must be the same"):
        bitwise_agreement(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="kept sizes"):
        bitwise_agreement(torch.zeros(3), torch.zeros(3), torch.ones(2, dtype=torch.long))
