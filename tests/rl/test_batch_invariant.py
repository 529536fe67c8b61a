"""The batch-invariant mode: products whose rows do not depend on the batch, and the engine's
sampling log-probs given back bit for bit by the trainer's replay forward (the RL trainer's own
call), with the bisect tool naming where bits part."""

import copy

import pytest
import torch

from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.model import Transformer
from dsv32.model.batch_invariant import batch_invariant, fixed_key_set, padded_pointwise, row_tiled, tiled_mm
from dsv32.rl.bisect import bisect
from dsv32.rl.rollout import new_trajectory, pack, replay_logprobs
from dsv32.rl.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_a_rows_product_does_not_depend_on_the_rows_beside_it():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 200, generator=g), torch.randn(300, 200, generator=g)
    full = tiled_mm(x, w.t())
    for m, off in ((1, 0), (3, 7), (17, 100), (40, 260)):
        assert torch.equal(tiled_mm(x[off:off + m], w.t()), full[off:off + m])
    assert torch.allclose(full, x @ w.t(), atol=1e-4)
    a, b = torch.randn(4, 5, 6, 7, generator=g), torch.randn(6, 7, 8, generator=g)
    with torch.inference_mode(), batch_invariant():   # linear and einsum lower to the tiled products
        one = torch.nn.functional.linear(x[5:6], w)
        ein = torch.einsum("bshd,hdc->bshc", a[:1], b)
        assert torch.equal(one, torch.nn.functional.linear(x, w)[5:6])
        assert torch.equal(ein, torch.einsum("bshd,hdc->bshc", a, b)[:1])
    # an element at the end of a small tensor and inside a large one: the same bits
    t = torch.randn(37, 8, generator=g)
    big = torch.cat([torch.randn(95, 8, generator=g), t[-1:], torch.randn(48, 8, generator=g)])
    assert torch.equal(padded_pointwise(torch.ops.aten.sigmoid.default, t)[-1],
                       padded_pointwise(torch.ops.aten.sigmoid.default, big)[95])
    assert torch.equal(padded_pointwise(torch.ops.aten.sigmoid.default, t), t.sigmoid())


def test_row_tiled_reductions_compute_what_the_plain_ones_do():
    """What the mode runs on CUDA for last-dimension reductions, checked here against the plain ops."""
    aten, x = torch.ops.aten, torch.randn(3, 37, 24, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(row_tiled(aten.mean.dim, x, (x, [-1], True), {}), x.mean(-1, keepdim=True))
    assert torch.allclose(row_tiled(aten.sum.dim_IntList, x, (x, [2]), {"dtype": torch.float64}),
                          x.sum(-1, dtype=torch.float64))
    assert torch.allclose(row_tiled(aten._log_softmax.default, x, (x, -1, False), {}), x.log_softmax(-1))
    assert torch.allclose(row_tiled(aten.logsumexp.default, x, (x, [-1]), {}), x.logsumexp(-1))
    assert torch.equal(row_tiled(aten.amax.default, x, (x, [-1], True), {}), x.amax(-1, keepdim=True))


def test_fixed_key_sets_are_padded_and_sorted_like_a_replayed_selection():
    idx = torch.tensor([[[5, -1, 2], [0, 3, 1]]])
    assert fixed_key_set(idx, 5).tolist() == [[[-1, -1, -1, 2, 5], [-1, -1, 0, 1, 3]]]


def rollout(model, prompts, params, config):
    eng = Engine(model, config)
    seqs = [eng.add_request(p, params) for p in prompts]
    while eng.has_work():
        eng.step()
    trajs = []
    for p, s in zip(prompts, seqs):
        t = new_trajectory(Task("test", []), p)
        t.add_sampled(eng.output(s))
        trajs.append(t)
    return trajs


@pytest.mark.parametrize("dtype,device", [(torch.float32, "cpu"), (torch.bfloat16, "cpu"),
                                          pytest.param(torch.bfloat16, "cuda", marks=pytest.mark.gpu)])
def test_engine_logprobs_are_the_trainers_bit_for_bit(dtype, device):
    """Four prompts (two past index_topk: key selections replayed), chunked prefill, batched
    decode at temperature 0.9 with top-p: every sampled token's log-prob from the trainer's replay
    (a separate copy of the weights, autograd on, experts one at a time) equals the engine's."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny").replace(index_topk=8)).to(device, dtype).eval()
    policy = copy.deepcopy(model).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 14, 30, 21)]
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=2, ignore_eos=True, return_rl_data=True)
    trajs = rollout(model, prompts, params, EngineConfig(num_blocks=32, block_size=16, prefill_chunk=16,
                                                         batch_invariant=True))
    batch = pack(trajs, device=device)
    with torch.enable_grad():
        lp = replay_logprobs(policy, batch, 0.9, batch_invariant=True)
    assert lp.requires_grad
    got, want = lp.detach()[batch.action], batch.logp_old[batch.action]
    assert got.numel() == 40 and torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} differ"


def test_bisect_finds_no_difference_in_the_mode_and_names_the_first_module_that_differs():
    torch.manual_seed(0)
    model = Transformer(preset("tiny").replace(index_topk=8)).eval()
    prompts = [[3, 5, 7, 11, 13], list(range(2, 22))]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=1, ignore_eos=True, return_rl_data=True)
    config = EngineConfig(num_blocks=16, block_size=16, batch_invariant=True)
    report = bisect(model, prompts, params, config)
    assert report["bit_equal_share"] == 1.0 and report["first_differing_module"] == {}

    def nudge(module, inputs, output):  # the replay (autograd on) only: one layer's output moves
        return output * (1 + 2 ** -8) if torch.is_grad_enabled() else output

    handle = model.layers[1].self_attn.kv_a_layernorm.register_forward_hook(nudge)
    try:
        report = bisect(model, prompts, params, config)
    finally:
        handle.remove()
    assert set(report["first_differing_module"]) == {"layers.1.self_attn.kv_a_layernorm"}
    assert [d["position"] for d in report["first_difference_per_request"]] == [0, 0]
    assert report["bit_equal_share"] < 1.0
