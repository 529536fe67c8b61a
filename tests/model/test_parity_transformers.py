"""Parity with an implementation nobody here wrote: transformers' DeepseekV32ForCausalLM.

A small random model with every feature (group-limited MoE, a dense first layer, YaRN, DSA with
index_topk < sequence) is saved by transformers and loaded by dsv32; fp32 logits must match.
"""

import pytest
import torch
import transformers  # a dev dependency: missing, this file must fail, not skip (it catches most model bugs)

from dsv32 import load_model

HF_KW = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    n_shared_experts=1, n_group=4, topk_group=2, num_experts_per_tok=2, kv_lora_rank=32,
    q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, index_head_dim=16,
    index_n_heads=16, first_k_dense_replace=1, max_position_embeddings=256,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)


def _hf_model(tmp_path, index_topk, **overrides):
    torch.manual_seed(1)
    cfg = transformers.DeepseekV32Config(index_topk=index_topk, **{**HF_KW, **overrides})
    cfg._attn_implementation = "eager"
    ref = transformers.DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():  # random router bias and norms, so those paths are exercised too
        for name, t in list(ref.named_parameters()) + list(ref.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.rand_like(t) * 0.1)
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
    ref.save_pretrained(tmp_path)
    return ref


@pytest.mark.parametrize("index_topk,seq,norm_topk_prob", [(64, 24, True), (8, 40, True), (8, 40, False)],
                         ids=["dense", "dsa", "dsa-unnormalised-gate"])
def test_logits_match_transformers(tmp_path, index_topk, seq, norm_topk_prob):
    ref = _hf_model(tmp_path, index_topk, norm_topk_prob=norm_topk_prob)
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids, sparse=True).logits
        got_mqa = ours(ids, sparse=True, mode="mqa").logits
    assert (got - want).abs().max() < 1e-4
    assert (got_mqa - want).abs().max() < 1e-4
    if index_topk < seq:  # DSA really selected: dense attention gives something else
        dense = ours(ids, sparse=False).logits
        assert (dense - want).abs().max() > 1e-3


def test_index_scores_match_transformers_indexer(tmp_path):
    """The indexer's scores themselves, not only the keys they select: their scale enters the
    stage-1/2 KL, which top-k alone cannot see. transformers' indexer returns only indices, so its
    scores are read where it calls topk on them."""
    ref = _hf_model(tmp_path, index_topk=8)
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    seen, topk = [], torch.Tensor.topk

    def spy(t, *args, **kwargs):
        seen.append(t.detach().clone())
        return topk(t, *args, **kwargs)

    def on(module, args, kwargs):
        torch.Tensor.topk = spy

    def off(module, args, kwargs, output):
        torch.Tensor.topk = topk

    hooks = [m.register_forward_pre_hook(on, with_kwargs=True) for m in ref.modules()
             if type(m).__name__ == "DeepseekV32Indexer"]
    hooks += [m.register_forward_hook(off, with_kwargs=True) for m in ref.modules()
              if type(m).__name__ == "DeepseekV32Indexer"]
    try:
        with torch.no_grad():
            ref(ids)
    finally:
        torch.Tensor.topk = topk
        for h in hooks:
            h.remove()
    with torch.no_grad():
        got = ours(ids, return_aux=True).index_scores
    assert len(seen) == len(got) == HF_KW["num_hidden_layers"]
    causal = torch.ones(30, 30, dtype=torch.bool).tril()
    for layer, (want, mine) in enumerate(zip(seen, got)):
        want, mine = want[:, causal], mine[:, causal]
        assert torch.isfinite(mine).all() and mine.abs().max() > 1e-3, layer
        torch.testing.assert_close(mine, want.float(), rtol=1e-4, atol=1e-5, msg=f"layer {layer}")


def test_decode_with_cache_matches_transformers_full_forward(tmp_path):
    ref = _hf_model(tmp_path, index_topk=8)
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
        cache = ours.new_cache(1, 30)
        first = ours(ids[:, :12], cache=cache).logits
        steps = [ours(ids[:, i:i + 1], start_pos=i, cache=cache, mode="mqa").logits for i in range(12, 30)]
    got = torch.cat([first] + steps, dim=1)
    assert (got - want).abs().max() < 1e-4
