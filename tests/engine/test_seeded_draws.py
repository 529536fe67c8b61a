"""Seeded sampling (dsv32/engine/sampler.py `seeded_uniforms`, `inverse_cdf`): each seeded row
draws one host uniform per token and inverts its cumulative distribution, so the draws follow the
distribution, ids of probability 0 never come, and a row's token depends on its own generator only."""

import torch

from dsv32.engine.sampler import SamplingParams, inverse_cdf, sample, seeded_uniforms


def test_inverse_cdf_draws_follow_the_distribution():
    probs = torch.tensor([0.4, 0.0, 0.25, 0.2, 0.1, 0.05])
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = inverse_cdf(probs.expand(n, -1), u)
    freq = torch.bincount(ids, minlength=6).double() / n
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert freq[1] == 0
    assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-12).all(), freq


def test_inverse_cdf_never_returns_an_id_of_probability_zero_even_at_the_ends():
    probs = torch.tensor([[0.0, 0.0, 0.3, 0.7, 0.0, 0.0]] * 3)
    u = torch.tensor([0.0, 0.5, 1 - 2 ** -53], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [2, 3, 3]
    # a row that does not sum to 1 (float32 rounding) is drawn in proportion to its total
    assert inverse_cdf(torch.tensor([[0.2, 0.2]]), torch.tensor([0.49], dtype=torch.float64)).tolist() == [0]


def test_seeded_uniforms_are_each_rows_own_generators_draws_in_order():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    rows, u = seeded_uniforms([gens[0], None, gens[1]], 3, torch.device("cpu"))
    assert rows == [0, 2]
    want = [torch.rand(3, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (1, 2)]
    assert torch.equal(u, torch.stack(want))
    assert seeded_uniforms([None, None], 2, torch.device("cpu")) == ([], None)


def test_a_seeded_rows_tokens_do_not_depend_on_the_other_rows():
    """The same seed gives the same tokens alone and in a batch with unseeded and other seeded rows,
    over several steps (its generator advances one draw per token)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g)           # [row, step, V]
    p = SamplingParams(temperature=1.0, top_p=0.9)

    def run(batch_rows: list[int], seeds: list[int | None]) -> list[list[int]]:
        gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        return [[x.token for x in sample(logits[batch_rows, t], [p] * len(batch_rows), gens)] for t in range(5)]

    alone = [step[0] for step in run([0], [7])]
    mixed = [step[1] for step in run([1, 0, 2], [None, 7, 8])]
    assert alone == mixed
    assert alone != [step[0] for step in run([0], [9])] or alone != [step[0] for step in run([0], [10])]
