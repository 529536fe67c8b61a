import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv32 import load_model, save_model
from dsv32.checkpoint import INDEX, CheckpointError, is_fp8_weight
from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.model.fp8 import FP8, weight_dequant, weight_quant


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


def test_save_load_round_trip_is_exact_and_sharded(tiny, tmp_path):
    save_model(tiny, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / f).exists() for f in files)
    names = set(index["weight_map"])
    # official names, MTP as layer num_hidden_layers with its own copies of embedding and head
    assert "model.layers.0.self_attn.indexer.k_norm.bias" in names
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.3.eh_proj.weight" in names and "model.layers.3.shared_head.head.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    m = load_model(tmp_path, dtype=torch.float32)
    for (n, a), (_, b) in zip(tiny.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 512, (1, 20))
    assert torch.equal(m(x, mtp=True).mtp_logits[0], tiny(x, mtp=True).mtp_logits[0])


def test_fp8_checkpoint_layout_and_dequantised_load(tiny, tmp_path):
    save_model(tiny, tmp_path, fp8=True)
    sd = {}
    for f in set(json.loads((tmp_path / INDEX).read_text())["weight_map"].values()):
        sd.update(load_file(tmp_path / f))
    assert sd["model.layers.0.self_attn.q_b_proj.weight"].dtype == FP8
    assert sd["model.layers.0.self_attn.q_b_proj.weight_scale_inv"].dtype == torch.float32
    assert sd["model.layers.0.self_attn.indexer.wk.weight"].dtype == FP8
    assert sd["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == torch.float32
    assert sd["model.embed_tokens.weight"].dtype == torch.float32
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in sd
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
    m = load_model(tmp_path, dtype=torch.float32)
    w0 = tiny.layers[0].self_attn.q_b_proj.weight
    w1 = m.layers[0].self_attn.q_b_proj.weight
    assert not torch.equal(w0, w1) and (w0 - w1).abs().max() <= w0.abs().max() / 16
    # the loaded model is exactly the original with its FP8 weights rounded through e4m3 blocks
    ref = Transformer(tiny.cfg)
    with torch.no_grad():
        for (name, p), (_, q) in zip(ref.named_parameters(), tiny.named_parameters()):
            key = "model." + name if not name.startswith(("lm_head", "mtp")) else name
            rounded = weight_dequant(*weight_quant(q), dtype=torch.float32) if is_fp8_weight(key) else q
            p.copy_(rounded)
    x = torch.randint(0, 512, (1, 24))
    assert torch.equal(ref(x).logits, m(x).logits)
    a, b = tiny(x).logits, m(x).logits
    assert (a - b).norm() / a.norm() < 0.15


def test_block_fp8_by_hand():
    w = torch.zeros(130, 5)
    w[0, 0], w[129, 4] = 448.0 * 3, -2.0  # two row blocks: 128 rows, then 2 rows
    q, s = weight_quant(w)
    assert q.dtype == FP8 and s.shape == (2, 1)
    assert torch.allclose(s[:, 0], torch.tensor([3.0, 2.0 / 448]))
    assert torch.equal(weight_dequant(q, s, dtype=torch.float32), w)
    with pytest.raises(ValueError, match="scale_inv shape"):
        weight_dequant(q, torch.ones(1, 1))


def test_fp8_weight_rule():
    assert is_fp8_weight("model.layers.5.mlp.experts.3.gate_proj.weight")
    assert is_fp8_weight("model.layers.0.self_attn.kv_b_proj.weight")
    assert not is_fp8_weight("model.layers.5.mlp.gate.weight")
    assert not is_fp8_weight("model.layers.0.self_attn.indexer.weights_proj.weight")
    assert not is_fp8_weight("model.layers.61.eh_proj.weight")
    assert not is_fp8_weight("lm_head.weight")


def _one_file(tiny, tmp_path):
    save_model(tiny, tmp_path)
    (f,) = set(json.loads((tmp_path / INDEX).read_text())["weight_map"].values())
    return tmp_path / f, load_file(tmp_path / f)


def test_missing_tensor_is_named(tiny, tmp_path):
    f, sd = _one_file(tiny, tmp_path)
    del sd["model.layers.2.self_attn.indexer.wk.weight"]
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.2\.self_attn\.indexer\.wk\.weight"):
        load_model(tmp_path)


def test_misshapen_tensor_is_named(tiny, tmp_path):
    f, sd = _one_file(tiny, tmp_path)
    sd["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight.*\(3, 3\)"):
        load_model(tmp_path)


def test_unexpected_tensor_and_missing_shard(tiny, tmp_path):
    f, sd = _one_file(tiny, tmp_path)
    sd["model.layers.9.self_attn.o_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="match nothing"):
        load_model(tmp_path)
    f.unlink()
    with pytest.raises(CheckpointError, match="not in"):
        load_model(tmp_path)


def test_tied_embeddings_survive_loading(tmp_path):
    model = Transformer(preset("tiny").replace(tie_word_embeddings=True)).eval()
    save_model(model, tmp_path)
    back = load_model(tmp_path, dtype=torch.float32)
    assert back.lm_head.weight is back.embed_tokens.weight
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_a_model_served_from_stacked_experts_still_saves(tmp_path):
    """The engine makes each expert's weights views into two stacks (grouped GEMMs); the model
    still saves as separate, unshared tensors with the official names, and loads back equal."""
    from dsv32.engine import Engine, EngineConfig

    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    Engine(model, EngineConfig(num_blocks=4))
    assert model.layers[1].mlp.stacked is not None
    save_model(model, tmp_path)
    back = load_model(tmp_path, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
