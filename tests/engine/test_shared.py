"""One engine shared by threads: requests from many threads are batched together, and each comes
back as it would alone (the oracle: `rollout.complete` on an engine of its own, batch 1)."""

import threading

import pytest
import torch

from dsv32.engine import (
    Engine,
    EngineClosed,
    EngineConfig,
    SamplingParams,
    SharedEngine,
)
from dsv32.model import ContextLengthError
from dsv32.rl.rollout import complete

CONFIG = EngineConfig(num_blocks=64, block_size=16, max_num_seqs=8, prefill_chunk=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def requests(n: int) -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(2, 512, (5 + 9 * i,), generator=g).tolist(),
             SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12 + i, seed=i, ignore_eos=True,
                            return_rl_data=True)) for i in range(n)]


def in_threads(shared: SharedEngine, reqs: list) -> list:
    """Each request's output, each request submitted by a thread of its own at the same moment."""
    outs, start = [None] * len(reqs), threading.Barrier(len(reqs))

    def submit(i):
        start.wait()
        outs[i] = shared.complete([reqs[i]])[0]

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def test_requests_from_many_threads_are_batched_and_each_samples_what_it_would_alone(tiny):
    reqs = requests(5)
    alone = [complete(Engine(tiny, CONFIG), [r])[0] for r in reqs]
    with SharedEngine(Engine(tiny, CONFIG)) as shared:
        outs = in_threads(shared, reqs)
    assert shared.max_batch > 1                                      # they ran in one batch
    for (prompt, params), a, o in zip(reqs, alone, outs):
        # a seeded request draws from its own generator: the same tokens, whoever runs beside it
        assert o.prompt_token_ids == prompt and len(o.token_ids) == params.max_tokens
        assert o.token_ids == a.token_ids and o.finish_reason == a.finish_reason == "length"
        # the RL records are whole: kept sets and routes as alone; log-probs up to float32
        # rounding (a batched matmul sums in another order)
        assert [k.tolist() for k in o.kept] == [k.tolist() for k in a.kept]
        assert torch.equal(o.experts, a.experts) and torch.equal(o.selection, a.selection)
        assert max(abs(x - y) for x, y in zip(o.logprobs, a.logprobs)) < 1e-5


def test_one_call_with_several_requests_returns_them_in_order(tiny):
    reqs = requests(3)
    with SharedEngine(Engine(tiny, CONFIG)) as shared:
        outs = shared.complete(reqs)
        assert shared.complete([]) == []
    assert [o.prompt_token_ids for o in outs] == [p for p, _ in reqs]
    assert [o.token_ids for o in outs] == [o.token_ids for o in complete(Engine(tiny, CONFIG), reqs)]


def test_a_refused_request_raises_in_its_caller_and_the_engine_serves_on(tiny):
    with SharedEngine(Engine(tiny, CONFIG)) as shared:
        too_long = [5] * shared.max_model_len
        with pytest.raises(ContextLengthError, match="no room to generate"):
            shared.complete([requests(1)[0], (too_long, SamplingParams())])   # neither runs
        assert not shared.engine.seqs
        with pytest.raises(ValueError, match="token ids"):
            shared.complete([([10 ** 6], SamplingParams())])
        (out,) = shared.complete(requests(1))
    assert out.finish_reason == "length" and out.error is None


def test_a_failing_step_fails_the_requests_in_flight_not_the_engine_and_close_stops_it(tiny):
    shared = SharedEngine(Engine(tiny, CONFIG))
    run = shared.engine.runner.run

    def broken(plan):
        shared.engine.runner.run = run            # fails once
        raise RuntimeError("the device fell over")

    shared.engine.runner.run = broken
    outs = shared.complete(requests(2))
    assert [o.finish_reason for o in outs] == ["error", "error"] and all(o.token_ids == [] for o in outs)
    assert outs[0].error == "the engine step failed: RuntimeError: the device fell over"
    assert not shared.engine.seqs and shared.engine.scheduler.blocks.num_free == CONFIG.num_blocks
    (out,) = shared.complete(requests(1))          # the driver goes on
    assert out.finish_reason == "length" and out.error is None
    shared.close()
    assert not shared._thread.is_alive()
    with pytest.raises(EngineClosed):
        shared.complete(requests(1))
    shared.close()                                 # twice is fine
