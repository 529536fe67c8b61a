"""logit_bias, presence / frequency / repetition penalties, min_tokens and min_p, each checked
against a hand computation of its OpenAI / vLLM definition (plain Python loops over the
vocabulary, independent of the tensor code)."""

import math

import pytest
import torch

from dsv32.engine.sampler import (
    SamplingParams,
    adjusted_logits,
    processed_logits,
    sample,
)

V = 12


def logits(seed=0):
    return torch.randn(1, V, generator=torch.Generator().manual_seed(seed)) * 3


def hand(row: list[float], p: SamplingParams, prompt: list[int], out: list[int], ends: list[int]) -> list[float]:
    """The definitions, one token at a time."""
    x = list(row)
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(prompt + out):  # repetition: CTRL / HF / vLLM, over prompt and output
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in range(V):  # presence / frequency: OpenAI, over the output only
        c = out.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty * (1 if c else 0)
    if len(out) < p.min_tokens:
        for t in ends:
            x[t] = -math.inf
    return x


@pytest.mark.parametrize("kw", [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 0.7},
    {"presence_penalty": -0.5, "frequency_penalty": 2.0},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8, "frequency_penalty": 0.3},
    {"logit_bias": {4: 100.0, 7: -100.0}},
    {"min_tokens": 5},
    {"min_tokens": 2},
])
def test_adjusted_logits_follow_the_definitions(kw):
    p = SamplingParams(**kw)
    prompt, out, ends = [1, 2, 2, 9], [3, 3, 5, 2], [0, 6]
    got = adjusted_logits(logits(), [p], [prompt + out], [len(prompt)], [ends])[0].tolist()
    want = hand(logits()[0].tolist(), p, prompt, out, ends)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_a_batch_adjusts_each_row_as_it_would_alone():
    ps = [SamplingParams(presence_penalty=1.0, logit_bias={3: 5.0}), SamplingParams(),
          SamplingParams(repetition_penalty=1.5, frequency_penalty=-0.5, min_tokens=9)]
    histories = [[1, 2, 3, 3], [4, 4], [5, 6, 6, 7, 5]]
    x = torch.cat([logits(0), logits(1), logits(2)])
    batch = adjusted_logits(x, ps, histories, [2, 1, 3], [[0], [0], [0, 11]])
    for r in range(3):
        alone = adjusted_logits(x[r:r + 1], [ps[r]], [histories[r]], [[2, 1, 3][r]], [[[0], [0], [0, 11]][r]])
        assert torch.equal(batch[r], alone[0])
        assert batch[r].tolist() == pytest.approx(
            hand(x[r].tolist(), ps[r], histories[r][:[2, 1, 3][r]], histories[r][[2, 1, 3][r]:],
                 [[0], [0], [0, 11]][r]), rel=1e-5, abs=1e-5)


def test_rows_without_adjustments_are_untouched():
    x = torch.cat([logits(0), logits(1)])
    got = adjusted_logits(x, [SamplingParams(), SamplingParams(frequency_penalty=1.0)], [[1, 1], [1, 1]], [1, 1],
                          [[], []])
    assert torch.equal(got[0], x[0]) and not torch.equal(got[1], x[1])


def test_a_bias_of_100_makes_that_token_the_only_output():
    x = logits()
    t = int(x[0].argmin())
    p = SamplingParams(temperature=1.0, logit_bias={t: 100.0})
    g = torch.Generator().manual_seed(0)
    assert {sample(x, [p], [g])[0].token for _ in range(50)} == {t}


def test_min_p_keeps_tokens_within_a_factor_of_the_top_one():
    x = logits(3)
    for mp in (0.05, 0.3, 0.9):
        _, keep = processed_logits(x, [1.0], [1.0], [0], [mp])
        probs = x.softmax(-1)[0].tolist()
        assert keep[0].tolist() == [q >= mp * max(probs) - 1e-7 for q in probs]


@pytest.mark.parametrize("kw, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"logit_bias": {3: 101.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"presence_penalty": math.nan}, "presence_penalty"),
])
def test_out_of_range_parameters_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)
