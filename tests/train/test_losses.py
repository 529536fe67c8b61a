import math

import pytest
import torch
import torch.nn.functional as F

from dsv32.train import losses


def test_indexer_kl_dense_by_hand():
    torch.manual_seed(0)
    s = 5
    scores = torch.randn(1, s, s).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.rand(1, s, s).tril() * 3  # head-summed, unnormalised
    want = 0.0
    for t in range(s):
        p = [probs[0, t, j].item() for j in range(t + 1)]
        z = sum(p)
        q = torch.softmax(scores[0, t, :t + 1], -1).tolist()
        want += sum(pi / z * math.log((pi / z) / qi) for pi, qi in zip(p, q) if pi > 0)
    assert abs(losses.indexer_kl_dense(scores, probs).item() - want / s) < 1e-5


def test_indexer_kl_sparse_renormalises_over_the_selected_set():
    scores = torch.tensor([[[0.5, 1.0, -0.3, 2.0]]])
    probs = torch.tensor([[[0.1, 0.4, 0.2, 0.3]]])
    idx = torch.tensor([[[3, 1, -1]]])  # two selected, one empty slot
    p = torch.tensor([0.3, 0.4]) / 0.7
    q = torch.softmax(torch.tensor([2.0, 1.0]), -1)
    want = (p * (p / q).log()).sum()
    assert torch.allclose(losses.indexer_kl_sparse(scores, probs, idx), want, atol=1e-6)
    # matching distributions give zero
    assert losses.indexer_kl_sparse(torch.log(probs), probs, torch.tensor([[[0, 1, 2, 3]]])).abs() < 1e-6


def test_sequence_balance_loss_by_hand():
    # one sequence, 2 tokens, 4 experts, top-1: token 0 -> expert 0, token 1 -> expert 0
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.8, 0.2, 0.5, 0.5]])
    ids = torch.tensor([[0], [0]])
    f = torch.tensor([4 / 2 * 2, 0, 0, 0])                  # E / (k S) * count
    p = torch.stack([scores[0] / 2.0, scores[1] / 2.0]).mean(0)
    assert torch.allclose(losses.sequence_balance_loss(scores, ids, 1, 1), (f * p).sum())
    # balanced routing with uniform scores gives exactly 1
    ids = torch.tensor([[0], [1], [2], [3]])
    assert torch.allclose(losses.sequence_balance_loss(torch.ones(4, 4), ids, 1, 1), torch.tensor(1.0))


def test_bias_update_moves_towards_balance():
    bias = torch.zeros(4)
    losses.update_expert_bias(bias, torch.tensor([0, 0, 0, 1, 2, 2]), rate=0.01)
    assert torch.allclose(bias, torch.tensor([-0.01, 0.01, -0.01, 0.01]))  # mean load 1.5


def test_mtp_loss_alignment():
    torch.manual_seed(0)
    labels = torch.randint(0, 7, (2, 6))
    lg = torch.randn(2, 5, 7)  # depth 1: position i predicts labels[i + 1]
    want = F.cross_entropy(lg.reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert torch.allclose(losses.mtp_loss([lg], labels), want)


def test_attention_target_equals_transformers_attention_weights(tmp_path):
    """p summed over heads, from an implementation nobody here wrote."""
    transformers = pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "model"))
    from test_parity_transformers import _hf_model

    from dsv32 import load_model

    ref = _hf_model(tmp_path, index_topk=64)
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        att = ref(ids, output_attentions=True).attentions
        got = ours(ids, sparse=False, return_attn_probs=True).attn_probs
    for a, g in zip(att, got):
        assert torch.allclose(a.sum(1), g, atol=1e-5)
