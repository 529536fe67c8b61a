"""One request's bad sampling parameters never fail another: validated at admission, sanitised
(a tiny temperature is greedy), and a sampling failure that belongs to one row fails that row
alone. The oracle: each request's output when it runs alone."""

import math

import pytest
import torch

from dsv32.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def run(engine, prompts, params):
    seqs = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    while engine.has_work():
        engine.step()
    return [engine.output(s) for s in seqs]


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_parameters_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_tiny_temperature_samples_greedily(tiny):
    engine = Engine(tiny, EngineConfig(num_blocks=16, block_size=16))
    ps = prompts(2)
    greedy = run(engine, ps, [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * 2)
    tiny_t = run(engine, ps, [SamplingParams(temperature=1e-40, max_tokens=6, ignore_eos=True)] * 2)
    assert [o.token_ids for o in tiny_t] == [o.token_ids for o in greedy]
    assert all(math.isfinite(lp) for o in tiny_t for lp in o.logprobs)


def test_a_row_whose_sampling_raises_fails_alone(tiny):
    engine = Engine(tiny, EngineConfig(num_blocks=64, block_size=16))
    ps = prompts(5)
    normal = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)] * 2
    hostile = SamplingParams(max_tokens=6)
    hostile.temperature = math.nan  # past validation, as a buggy caller could: the softmax is nan, multinomial raises
    params = [*normal[:2], hostile, *normal[2:]]
    solo = [run(engine, [p], [q])[0].token_ids for p, q in zip(ps, params) if q is not hostile]
    outs = run(engine, ps, params)
    assert [o.token_ids for o in outs[:2] + outs[3:]] == solo
    bad = outs[2]
    assert bad.finish_reason == "error" and "sampling failed" in bad.error and bad.token_ids == []
    bm = engine.scheduler.blocks
    assert bm.num_free == len(bm.ref) and not engine.seqs
