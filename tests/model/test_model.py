"""Properties of the model that hold by construction of the architecture."""

import math

import pytest
import torch

from dsv32.config import preset
from dsv32.model import ContextLengthError, Transformer
from dsv32.model.indexer import all_keys_selection, hadamard, pack_selection
from dsv32.model.moe import Gate, MoE
from dsv32.model.rope import apply_rope_half, apply_rope_interleaved, rope_cos_sin


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


def ids(b=2, s=40, seed=0):
    return torch.randint(0, 512, (b, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("sparse", [False, True])
def test_mha_equals_absorbed_mqa(tiny, sparse):
    x = ids()
    a = tiny(x, sparse=sparse, mode="mha", return_attn_probs=True)
    b = tiny(x, sparse=sparse, mode="mqa", return_attn_probs=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    for pa, pb in zip(a.attn_probs, b.attn_probs):
        assert torch.allclose(pa, pb, atol=1e-5)


@torch.no_grad()
def test_dsa_with_topk_covering_the_sequence_is_dense():
    torch.manual_seed(0)
    m = Transformer(preset("tiny").replace(index_topk=64)).eval()
    x = ids(s=40)
    assert torch.allclose(m(x, sparse=True).logits, m(x, sparse=False).logits, atol=1e-6)
    # and with k < seq it is not
    m.cfg.index_topk = 8
    assert (m(x, sparse=True).logits - m(x, sparse=False).logits).abs().max() > 1e-3


@torch.no_grad()
def test_dsa_attends_only_to_selected_keys(tiny):
    out = tiny(ids(), sparse=True, return_aux=True, return_attn_probs=True)
    for probs, idx, scores in zip(out.attn_probs, out.topk_indices, out.index_scores):
        sel = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx.clamp(min=0), True)
        assert probs[~sel].abs().max() == 0
        heads = tiny.cfg.num_attention_heads
        assert torch.allclose(probs.sum(-1), torch.full_like(probs[..., 0], heads), atol=1e-5)
        # selection = the k highest causal index scores; -1 only where fewer keys exist
        s = scores.shape[1]
        k = idx.shape[-1]
        n_valid = (idx >= 0).sum(-1)
        assert torch.equal(n_valid, torch.arange(1, s + 1).clamp(max=k).expand_as(n_valid))
        kth = scores.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("inf")).amin(-1, keepdim=True)
        unselected = scores.masked_fill(sel, float("-inf"))
        assert (unselected <= kth).all()


@torch.no_grad()
@pytest.mark.parametrize("mode", ["mha", "mqa"])
def test_cached_decode_equals_full_forward(tiny, mode):
    x = ids(b=2, s=36)
    full = tiny(x).logits
    cache = tiny.new_cache(2, 36)
    parts = [tiny(x[:, :20], cache=cache, mode=mode).logits]
    parts += [tiny(x[:, i:i + 1], start_pos=i, cache=cache, mode=mode).logits for i in range(20, 36)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_forced_routing_with_own_choice_equals_free_routing(tiny):
    x = ids()
    free = tiny(x)
    forced = tiny(x, forced_experts=free.expert_ids)
    assert torch.equal(free.logits, forced.logits)
    # forcing other experts changes the output, and the router still gets gradient
    other = [(e + 1) % tiny.cfg.n_routed_experts for e in free.expert_ids]
    out = tiny(x, forced_experts=other)
    assert (out.logits - free.logits).abs().max() > 1e-4
    out.logits.square().mean().backward()
    gate = tiny.layers[1].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["mha", "mqa"])
def test_forced_key_selection_with_own_choice_equals_free_selection(tiny, mode):
    x = ids()
    free = tiny(x, mode=mode, return_topk=True)
    assert len(free.topk_indices) == tiny.cfg.num_hidden_layers and not free.index_scores
    forced = pack_selection(torch.stack(free.topk_indices, 2))            # [B, S, layers, k]
    out = tiny(x, mode=mode, forced_topk=forced)
    torch.testing.assert_close(out.logits, free.logits, rtol=0, atol=1e-6)  # key order may differ: sums reorder
    # other key sets change the output: here every query's first k keys
    first = all_keys_selection(torch.arange(40).expand(2, 40), tiny.cfg.index_topk)[:, :, None]
    other = first.expand(-1, -1, tiny.cfg.num_hidden_layers, -1)
    assert (tiny(x, mode=mode, forced_topk=other).logits - free.logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="forced_topk must be"):
        tiny(x[:, :10], forced_topk=forced)
    with pytest.raises(ValueError, match="beyond the 40 keys"):
        tiny(x, forced_topk=pack_selection(torch.full_like(torch.stack(free.topk_indices, 2), 45)))


def random_moe(cfg):
    """A MoE on its own (the Transformer initialises the gate, whose weight starts uninitialised)."""
    moe = MoE(cfg).eval()
    moe.gate.weight.normal_(0.0, 0.1)
    return moe


@torch.no_grad()
def test_stacked_experts_as_grouped_gemms_equal_one_expert_at_a_time():
    torch.manual_seed(0)
    cfg = preset("tiny").replace(n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1)
    moe = random_moe(cfg)
    x = torch.randn(2, 7, cfg.hidden_size)
    forced = torch.tensor([[0, 1, 2]] * 10 + [[2, 5, 7]] * 4)           # experts 3, 4 and 6 get nothing
    want, want_forced = moe(x)[0], moe(x, forced)[0]
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    assert moe.stack_experts()
    w13, w2 = moe.stacked
    assert moe.experts[5].up_proj.weight.data_ptr() == w13[5, cfg.moe_intermediate_size:].data_ptr()
    assert all(torch.equal(v, state[k]) for k, v in moe.state_dict().items())   # same values, same names
    assert moe._grouped(x.view(-1, cfg.hidden_size))
    torch.testing.assert_close(moe(x)[0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe(x, forced)[0], want_forced, rtol=1e-5, atol=1e-6)
    # loading new weights into the parameters is loading them into the stacks
    other = random_moe(cfg)
    moe.load_state_dict(other.state_dict())
    torch.testing.assert_close(moe(x)[0], other(x)[0], rtol=1e-5, atol=1e-6)
    with torch.enable_grad():
        assert not moe._grouped(x.view(-1, cfg.hidden_size))             # training: one expert at a time
    moe.to(torch.float64)                                                # new storage: the stacks no longer back it
    assert not moe._grouped(x.double().view(-1, cfg.hidden_size))
    torch.testing.assert_close(moe(x.double())[0].float(), other(x)[0], rtol=1e-5, atol=1e-6)


def test_gate_group_limited_selection_by_hand():
    cfg = preset("tiny").replace(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
                                 routed_scaling_factor=2.0)
    g = Gate(cfg)
    with torch.no_grad():
        g.weight.zero_()
        g.e_score_correction_bias.copy_(torch.tensor([0.0, 0.9, 0.8, 0.0, 0.0, 0.0, 0.5, 0.45]))
    w, ids_, _ = g(torch.zeros(1, cfg.hidden_size))
    # groups (0,1) (2,3) (4,5) (6,7) score top2 sums .9, .8, 0, .95 -> groups 3 and 0 kept;
    # experts 1 (0.9) and 6 (0.5) win; expert 2 (0.8) is in a dropped group
    assert sorted(ids_[0].tolist()) == [1, 6]
    # weights from the uncorrected scores (all sigmoid(0) = .5): renormalised, times 2.0
    assert torch.allclose(w, torch.full((1, 2), 1.0))


def test_rope_layouts_rotate_the_right_pairs():
    cfg = preset("tiny")
    cos, sin = rope_cos_sin(cfg, torch.tensor([[3]]))
    d = cfg.qk_rope_head_dim
    x = torch.randn(1, 1, 1, d)
    inter, half = apply_rope_interleaved(x, cos, sin), apply_rope_half(x, cos, sin)
    c, s = cos[0, 0, 0], sin[0, 0, 0]  # first frequency
    assert torch.allclose(inter[0, 0, 0, :2], torch.stack([x[0, 0, 0, 0] * c - x[0, 0, 0, 1] * s,
                                                          x[0, 0, 0, 1] * c + x[0, 0, 0, 0] * s]))
    h = d // 2
    assert torch.allclose(half[0, 0, 0, [0, h]], torch.stack([x[0, 0, 0, 0] * c - x[0, 0, 0, h] * s,
                                                             x[0, 0, 0, h] * c + x[0, 0, 0, 0] * s]))
    # both are rotations: relative position only
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    dots = []
    for p in (0, 7):
        cq, sq = rope_cos_sin(cfg, torch.tensor([[p + 5]]))
        ck, sk = rope_cos_sin(cfg, torch.tensor([[p]]))
        dots.append((apply_rope_half(q, cq, sq) * apply_rope_half(k, ck, sk)).sum())
    assert torch.allclose(dots[0], dots[1], atol=1e-5)


@torch.no_grad()
def test_indexer_query_chunking_is_exact(tiny, monkeypatch):
    import dsv32.kernels.indexer as indexer

    x = ids(s=30)
    want = tiny(x, return_aux=True).index_scores
    monkeypatch.setattr(indexer, "LOGIT_CHUNK", 2 * 8 * 30 * 7)  # 7 queries per chunk
    got = tiny(x, return_aux=True).index_scores
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@torch.no_grad()
def test_attention_prob_chunking_is_exact(tiny, monkeypatch):
    import dsv32.model.mla as mla

    x = ids(s=30)
    want = tiny(x, return_attn_probs=True).attn_probs
    monkeypatch.setattr(mla, "PROB_CHUNK", 2 * 4 * 30 * 4)  # 4 queries per chunk
    got = tiny(x, return_attn_probs=True).attn_probs
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want, got))


def test_hadamard_is_orthonormal():
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    assert torch.allclose((hadamard(x) * hadamard(y)).sum(-1), (x * y).sum(-1), atol=1e-5)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)


@torch.no_grad()
def test_indexer_fp8_simulation_stays_close(tiny):
    x = ids()
    a = tiny(x, return_aux=True)
    b = tiny(x, return_aux=True, indexer_fp8=True)
    for sa, sb, ia, ib in zip(a.index_scores, b.index_scores, a.topk_indices, b.topk_indices):
        m = torch.isfinite(sa)
        rel = (sa[m] - sb[m]).norm() / sa[m].norm()
        assert 0 < rel < 0.15  # quantised (differs), but only by e4m3 rounding
        same = (torch.sort(ia, -1).values == torch.sort(ib, -1).values).float().mean()
        assert same > 0.8  # and mostly the same keys are selected


def test_mtp_logits_shapes_and_gradient(tiny):
    x = ids(s=20)
    out = tiny(x, mtp=True)
    assert [t.shape for t in out.mtp_logits] == [(2, 19, 512)]
    out.mtp_logits[0].sum().backward()
    assert tiny.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


@torch.no_grad()
def test_mtp_input_is_eh_proj_of_normed_next_embedding_and_normed_hidden():
    """DeepSeek-V3 eq. 21, by hand: h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)] with distinct
    norm weights, then the MTP block and the shared head (lm_head after its own norm)."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny")).eval()
    layer = m.mtp[0]
    layer.enorm.weight.copy_(2.0 + torch.rand_like(layer.enorm.weight))
    layer.hnorm.weight.copy_(0.1 + 0.1 * torch.rand_like(layer.hnorm.weight))
    x = ids(s=12)
    out = m(x, mtp=True)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + m.cfg.rms_norm_eps) * w

    n = x.shape[1] - 1
    emb = m.embed_tokens.weight[x[:, 1:]]                                 # t_{i+1}, i = 0..n-1
    pre = torch.cat([rms(emb, layer.enorm.weight), rms(out.hidden[:, :n], layer.hnorm.weight)], -1) @ layer.eh_proj.weight.t()
    # the MTP block itself is an ordinary Block: run it on the hand-made input
    from dsv32.model.rope import rope_cos_sin
    from dsv32.model.transformer import Block, ModelOutput, Step, positions_and_mask

    pos, mask = positions_and_mask(x[:, :n], 0, None, None, m.cfg)
    cos, sin = rope_cos_sin(m.cfg, pos)
    h = Block.forward(layer, pre, cos, sin, Step(positions=pos, mask=mask), ModelOutput(None, None))
    want = m.lm_head(rms(h, layer.shared_head.norm.weight))
    torch.testing.assert_close(out.mtp_logits[0], want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_mtp_logits_at_i_see_token_i_plus_1_and_nothing_later():
    torch.manual_seed(0)
    m = Transformer(preset("tiny")).eval()
    x = ids(b=1, s=16)
    base = m(x, mtp=True).mtp_logits[0]                                   # [1, 15, V]: predicts t_{i+2}
    i = 6
    nxt, later = x.clone(), x.clone()
    nxt[0, i + 1] = (x[0, i + 1] + 1) % 512
    later[0, i + 2] = (x[0, i + 2] + 1) % 512
    assert (m(nxt, mtp=True).mtp_logits[0][0, i] - base[0, i]).abs().max() > 1e-2     # 0.61 here
    # nothing later leaks in: up to rounding, since a later token changes how many rows each MoE
    # expert multiplies, and the BLAS blocks (and so rounds) by row count (~1e-7 here; not bit-equal
    # with torch 2.13's CPU build)
    torch.testing.assert_close(m(later, mtp=True).mtp_logits[0][0, :i + 1], base[0, :i + 1], rtol=0, atol=1e-5)


@torch.no_grad()
def test_two_mtp_depths_each_predict_one_token_further():
    """Depth k's logits [B, S-k, V] at position i see tokens up to t_{i+k} and nothing later."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny").replace(num_nextn_predict_layers=2)).eval()
    x = ids(b=1, s=16)
    base = m(x, mtp=True).mtp_logits
    assert [t.shape[1] for t in base] == [15, 14]
    i = 5
    for k in (1, 2):
        at, after = x.clone(), x.clone()
        at[0, i + k] = (x[0, i + k] + 1) % 512
        after[0, i + k + 1] = (x[0, i + k + 1] + 1) % 512
        assert (m(at, mtp=True).mtp_logits[k - 1][0, i] - base[k - 1][0, i]).abs().max() > 1e-4, k
        # (equal up to rounding: a changed later token regroups the MoE's rows per expert)
        torch.testing.assert_close(m(after, mtp=True).mtp_logits[k - 1][0, :i + 1], base[k - 1][0, :i + 1],
                                   rtol=0, atol=1e-5)


def test_gate_without_topk_renormalisation_by_hand():
    """norm_topk_prob=False: the chosen experts' weights are their raw sigmoid scores times
    routed_scaling_factor (DeepSeek-V3's gate before V3's renormalisation)."""
    cfg = preset("tiny").replace(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2,
                                 norm_topk_prob=False, routed_scaling_factor=2.5)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[3, 0], gate.weight[5, 0], gate.weight[1, 0] = 2.0, 1.0, 0.5   # logits 2, 1, 0.5, 0 ...
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    w, ids_, _ = gate(x)
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert ids_[0].tolist() == [3, 5]
    torch.testing.assert_close(w[0], torch.tensor([2.5 * sig(2.0), 2.5 * sig(1.0)]))
    normed = Gate(cfg.replace(norm_topk_prob=True))
    normed.load_state_dict(gate.state_dict())
    total = sig(2.0) + sig(1.0)
    torch.testing.assert_close(normed(x)[0][0], torch.tensor([2.5 * sig(2.0) / total, 2.5 * sig(1.0) / total]))


def test_detached_indexer_gets_no_lm_gradient(tiny):
    out = tiny(ids(s=24), return_aux=True, detach_indexer=True)
    out.logits.sum().backward(retain_graph=True)
    ix = tiny.layers[0].self_attn.indexer
    assert ix.wq_b.weight.grad is None and ix.wk.weight.grad is None
    sum(s[torch.isfinite(s)].sum() for s in out.index_scores).backward()
    assert ix.wq_b.weight.grad.abs().sum() > 0
    assert tiny.layers[0].self_attn.q_a_proj.weight.grad.abs().sum() > 0  # from the LM loss only
    tiny.zero_grad(set_to_none=True)


def test_too_long_and_bad_inputs_fail_clearly(tiny):
    with pytest.raises(ContextLengthError, match="max_position_embeddings"):
        tiny(torch.zeros(1, 1025, dtype=torch.long))
    cache = tiny.new_cache(1, 8)
    with pytest.raises(ContextLengthError, match="cache"):
        tiny(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="token ids"):
        tiny(torch.full((1, 4), 512))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        tiny(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cache"):
        tiny(torch.zeros(1, 1, dtype=torch.long), start_pos=3)


def test_full_671b_builds_on_meta_without_allocating():
    with torch.device("meta"):
        m = Transformer(preset("deepseek-v3.2"))
    n = sum(p.numel() for p in m.parameters())
    main = n - sum(p.numel() for p in m.mtp.parameters())
    assert 670e9 < main < 672e9  # 671B main model; the MTP module adds ~11.5B
    assert all(p.device.type == "meta" for p in m.parameters())


@torch.no_grad()
@pytest.mark.parametrize("mode", ["mha", "mqa"])
def test_batched_decode_at_different_positions(tiny, mode):
    x = ids(b=2, s=24)
    cache = tiny.new_cache(2, 32)
    tiny(x, cache=cache)
    new = torch.tensor([[5], [7]])
    pos = torch.tensor([[24], [17]])  # row 1 continues after its first 17 tokens only
    got = tiny(new, cache=cache, positions=pos, mode=mode).logits[:, 0]
    want0 = tiny(torch.cat([x[:1], new[:1]], 1)).logits[0, -1]
    want1 = tiny(torch.cat([x[1:, :17], new[1:]], 1)).logits[0, -1]
    assert torch.allclose(got[0], want0, atol=1e-5) and torch.allclose(got[1], want1, atol=1e-5)
