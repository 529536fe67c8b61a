import json

import pytest

from dsv32.config import PRESETS, ConfigError, ModelConfig, preset


def official() -> dict:
    return preset("deepseek-v3.2").to_hf()


def test_official_config_round_trips(tmp_path):
    d = official()
    assert d["model_type"] == "deepseek_v32" and d["index_topk"] == 2048 and d["index_n_heads"] == 64
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert ModelConfig.load(tmp_path) == preset("deepseek-v3.2")


def test_transformers_layout_is_read():
    d = official()
    d.pop("rope_theta"), d.pop("rope_scaling"), d.pop("num_nextn_predict_layers")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 40,
                            "original_max_position_embeddings": 4096}
    d["mlp_layer_types"] = ["dense"] * 3 + ["sparse"] * 58
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["factor"] == 40
    assert cfg.num_nextn_predict_layers == 0


@pytest.mark.parametrize("field", ["kv_lora_rank", "index_topk", "vocab_size", "q_lora_rank"])
def test_missing_field_is_named(field):
    d = official()
    del d[field]
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(d)


@pytest.mark.parametrize("change,field", [
    ({"n_group": 7}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok"),
    ({"first_k_dense_replace": 99}, "first_k_dense_replace"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"index_head_dim": 48}, "index_head_dim"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"hidden_size": "7168"}, "hidden_size"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"mlp_layer_types": ["sparse"] * 61}, "mlp_layer_types"),
    ({"model_type": "llama"}, "model_type"),
])
def test_contradictory_field_is_named(change, field):
    d = official() | change
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(d)


def test_bad_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.load(tmp_path / "nowhere")


def test_presets_are_valid_and_yarn_scale():
    for name in PRESETS:
        preset(name).validate()
    cfg = preset("deepseek-v3.2")
    # softmax scale = 192^-0.5 * (0.1 * ln 40 + 1)^2
    assert abs(cfg.softmax_scale - 192 ** -0.5 * (0.1 * 2.302585093 * 1.6020599913 + 1) ** 2) < 1e-6
    with pytest.raises(KeyError, match="unknown preset"):
        preset("huge")
