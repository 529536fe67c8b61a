"""The GRPO objective (spec §2.2-2.6) against hand computations and analytic gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.rl.objective import (
    group_advantages, grpo_loss, k3, kept_sets, kl_unbiased, off_policy_mask, sequence_mean, token_logprobs,
)


def test_advantage_is_reward_minus_group_mean_without_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 2.0, 4.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 7, 7])
    a = group_advantages(r, g)
    assert torch.allclose(a, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, -1.0, 1.0]))
    # scaling the rewards scales the advantages: no std normalisation
    assert torch.allclose(group_advantages(10 * r, g), 10 * a)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r, g[:3])


def test_token_logprobs_with_the_kept_set_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    keep = kept_sets([torch.tensor([0, 2], dtype=torch.int32)])
    assert keep.rows.tolist() == [0, 0] and keep.ids.tolist() == [0, 2] and keep.truncated.tolist() == [True]
    lp = token_logprobs(logits, torch.tensor([2]), temperature=0.5, keep=keep)
    # tempered logits 4, 2, 0, -2; kept {0, 2}: log(e^0 / (e^4 + e^0))
    assert lp.item() == pytest.approx(-math.log1p(math.exp(4)), abs=1e-6)
    full = token_logprobs(logits, torch.tensor([2]), temperature=0.5)
    assert full.item() == pytest.approx(-math.log(math.exp(4) + math.exp(2) + 1 + math.exp(-2)), abs=1e-6)
    assert token_logprobs(logits, torch.tensor([1]), keep=keep).item() == float("-inf")  # outside its set
    whole = kept_sets([None])  # the sampler kept every token: the plain log-softmax
    assert token_logprobs(logits, torch.tensor([1]), keep=whole).item() == pytest.approx(
        1.0 - math.log(math.exp(2) + math.exp(1) + 1 + math.exp(-1)), abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.tensor([0]), temperature=0)
    with pytest.raises(ValueError, match="kept sets of 2"):
        token_logprobs(logits, torch.tensor([0]), keep=kept_sets([None, None]))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_sparse_kept_sets_equal_a_dense_vocabulary_mask(seed):
    """Value and gradient equal the -inf-masked log-softmax over a [N, V] mask (the oracle)."""
    g = torch.Generator().manual_seed(seed)
    n, v = 7, 50
    logits = (3 * torch.randn(n, v, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    kept = []
    for i in range(n):
        if torch.rand(1, generator=g) < 0.3:
            kept.append(None)
        else:
            ids = torch.randperm(v, generator=g)[:int(torch.randint(1, v, (1,), generator=g))]
            kept.append(torch.cat([ids, targets[i:i + 1]]).unique().int())  # the sampled token was kept
    mask = torch.ones(n, v, dtype=torch.bool)
    for i, ids in enumerate(kept):
        if ids is not None:
            mask[i] = False
            mask[i, ids.long()] = True
    want = (logits / 0.7).masked_fill(~mask, float("-inf")).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    got = token_logprobs(logits, targets, 0.7, kept_sets(kept))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.randn(n, generator=g)
    (dw,) = torch.autograd.grad((want * w).sum(), logits)
    (dg,) = torch.autograd.grad((got * w).sum(), logits)
    torch.testing.assert_close(dg, dw, rtol=1e-5, atol=1e-6)


def test_kl_terms_by_hand():
    logp, old, ref = torch.tensor(math.log(0.2)), torch.tensor(math.log(0.4)), torch.tensor(math.log(0.5))
    rho = 0.5 / 0.2
    assert k3(logp, ref).item() == pytest.approx(rho - math.log(rho) - 1, rel=1e-6)
    assert kl_unbiased(logp, old, ref).item() == pytest.approx(0.2 / 0.4 * (rho - math.log(rho) - 1), rel=1e-6)


def test_unbiased_kl_gradient_equals_the_analytic_kl_gradient():
    """On a categorical policy pi_theta = softmax(theta), the expectation over tokens drawn from
    a *different* pi_old of grad(eq. 7) is exactly grad KL(pi_theta || pi_ref); plain K3's is not."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    log_old = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)
    log_ref = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)

    def logp():
        return theta.log_softmax(-1)

    exact = torch.autograd.grad((logp().exp() * (logp() - log_ref)).sum(), theta)[0]
    # E_{x ~ pi_old}[grad estimator(x)], enumerated over the 6 tokens
    est = torch.autograd.grad((log_old.exp() * kl_unbiased(logp(), log_old, log_ref)).sum(), theta)[0]
    assert torch.allclose(est, exact, atol=1e-12)
    plain = torch.autograd.grad((log_old.exp() * k3(logp(), log_ref)).sum(), theta)[0]
    assert (plain - exact).abs().max() > 1e-2
    # detaching the leading ratio (gradient through one factor only) would also be wrong
    w = (logp() - log_old).exp().detach()
    one_factor = torch.autograd.grad((log_old.exp() * w * k3(logp(), log_ref)).sum(), theta)[0]
    assert (one_factor - exact).abs().max() > 1e-2


def test_off_policy_mask_touches_only_negative_far_sequences():
    logp = torch.zeros(5, 3)
    old = torch.tensor([[0.5, 0.5, 0.5],     # A < 0, mean log(old/theta) = 0.5 > delta: masked
                        [0.5, 0.5, 0.5],     # A > 0, as far off-policy: kept
                        [0.5, 0.5, 0.5],     # A = 0: kept
                        [0.05, 0.05, 0.05],  # A < 0, near: kept
                        [0.9, 0.0, 9.0]])    # A < 0, mean over its two action tokens 0.45
    action = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([-1.0, 1.0, 0.0, -1.0, -1.0])
    m = off_policy_mask(adv, old, logp, action, delta=0.2)
    assert m.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # sequence 4's divergence is (0.9 + 0) / 2 = 0.45: its non-action token (9.0) does not count
    m = off_policy_mask(adv, old, logp, action, delta=0.47)
    assert m.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def _hand_objective(logp, old, ref, adv, action, beta, eps, delta):
    """Eq. 8 written out with Python loops: 1/G sum_i 1/|o_i| sum_t (min(...) M_i - beta KL)."""
    total = 0.0
    for i in range(len(adv)):
        ts = [t for t in range(len(action[i])) if action[i][t]]
        div = sum(old[i][t] - logp[i][t] for t in ts) / len(ts)
        m = 0.0 if (adv[i] < 0 and div > delta) else 1.0
        s = 0.0
        for t in ts:
            r = math.exp(logp[i][t] - old[i][t])
            surr = min(r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i])
            rho = math.exp(ref[i][t] - logp[i][t])
            kl = r * (rho - math.log(rho) - 1)
            s += surr * m - beta[i] * kl
        total += s / len(ts)
    return total / len(adv)


def test_grpo_loss_equals_the_hand_computed_objective():
    g = torch.Generator().manual_seed(1)
    logp = (torch.rand(4, 5, generator=g) * -2).double()
    old = logp + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.4
    ref = logp + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.3
    action = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([0.5, -0.5, -1.0, 1.0], dtype=torch.float64)
    beta = torch.tensor([0.1, 0.0, 0.3, 0.1], dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, adv, action, ref, beta, clip_eps=0.2, mask_delta=0.1)
    want = _hand_objective(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), action.tolist(), beta.tolist(), 0.2, 0.1)
    assert loss.item() == pytest.approx(-want, rel=1e-10)
    assert 0 < stats["masked_frac"] < 1 and stats["kl"] > 0
    # clip fraction by hand: tokens where min() took the clipped branch
    r = (logp - old).exp()
    clipped = (r.clamp(0.8, 1.2) * adv[:, None] < r * adv[:, None]) & action
    assert stats["clip_frac"] == pytest.approx(clipped.sum().item() / action.sum().item())
    assert stats["mismatch"] == pytest.approx(((logp - old).abs() * action).sum().item() / action.sum().item())
    # switching the mask off is eq. 5
    loss5, s5 = grpo_loss(logp, old, adv, action, ref, beta, clip_eps=0.2, mask_delta=None)
    assert loss5.item() == pytest.approx(-_hand_objective(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                                                          action.tolist(), beta.tolist(), 0.2, float("inf")), rel=1e-10)
    assert s5["masked_frac"] == 0


def test_masking_zeroes_the_surrogate_gradient_but_never_the_kl():
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    old = torch.full((2, 3), -0.5)  # mean log(old / theta) = 0.5 for both
    ref = torch.full((2, 3), -2.0)
    action = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([-1.0, -1.0])
    loss, stats = grpo_loss(logp, old, adv, action, None, 0.0, mask_delta=0.2)
    loss.backward()
    assert stats["masked_frac"] == 1.0 and logp.grad.abs().max() == 0
    logp.grad = None
    loss, _ = grpo_loss(logp, old, adv, action, ref, 0.5, mask_delta=0.2)
    loss.backward()
    assert logp.grad.abs().min() > 0  # the KL term still pulls on a masked sequence


def test_sequence_then_group_normalisation():
    """A long and a short sequence weigh the same (1/|o_i| inside, 1/G outside)."""
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    action = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert sequence_mean(x, action).tolist() == [1.0, 3.0]
    # on-policy (ratio 1, no KL): -J = -(1/G) sum_i A_i
    logp = torch.zeros(2, 4)
    loss, _ = grpo_loss(logp, logp, torch.tensor([1.0, -3.0]), action, mask_delta=None)
    assert loss.item() == pytest.approx(1.0)


def test_bad_shapes_name_the_tensor():
    with pytest.raises(ValueError, match="adv"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="logp_old"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool))


def test_grpo_steps_raise_the_rewarded_actions_probability():
    """A 5-armed bandit policy softmax(theta), arm 0 rewarded: rollout batches of 4 groups x 8
    from the frozen pi_old, 2 mini-batch steps each (the second off-policy), KL to the start."""
    g = torch.Generator().manual_seed(0)
    theta = torch.zeros(5, requires_grad=True)
    ref = theta.detach().log_softmax(-1)
    opt = torch.optim.SGD([theta], lr=0.5)
    for _ in range(30):
        old = theta.detach().log_softmax(-1)
        arms = torch.multinomial(old.exp(), 32, replacement=True, generator=g)     # [32]
        adv = group_advantages((arms == 0).float(), torch.arange(4).repeat_interleave(8))
        for half in (slice(0, 16), slice(16, 32)):
            a = arms[half]
            logp = theta.log_softmax(-1)[a][:, None]                                # one token per sequence
            loss, _ = grpo_loss(logp, old[a][:, None], adv[half], torch.ones_like(logp, dtype=torch.bool),
                                ref[a][:, None], 0.01)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert theta.softmax(-1)[0] > 0.9
