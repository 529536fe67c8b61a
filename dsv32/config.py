"""ModelConfig: the one description of a DeepSeek-V3.2-architecture model.

Field names are those of the official Hugging Face `config.json` (model_type `deepseek_v32`), so a
reader can map code to checkpoint. `from_hf` also reads what `transformers` writes with
`save_pretrained` (`rope_parameters` instead of `rope_theta` + `rope_scaling`, `mlp_layer_types`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config that is missing a field or contradicts itself."""


# Fields a config.json must carry: without them the tensor shapes are unknown.
REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
    "index_n_heads", "index_head_dim", "index_topk",
)


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432             # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048          # one routed or shared expert
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1          # MTP modules, stored after the main layers
    num_attention_heads: int = 128
    num_key_value_heads: int = 128             # MLA: one K/V per head after expansion
    # MLA
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # DSA lightning indexer
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None    # official FP8: e4m3, 128x128 weight blocks

    def __post_init__(self):
        self.validate()

    # ---- derived fields ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @property
    def softmax_scale(self) -> float:
        """MLA scale: 1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim) squared."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling:
            m = yarn_mscale(self.rope_factor, self.rope_scaling.get("mscale_all_dim", 0) or 0)
            scale *= m * m
        return scale

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        if not self.quantization_config:
            return None
        return tuple(self.quantization_config.get("weight_block_size", (128, 128)))

    @property
    def cache_widths(self) -> tuple[int, int, int]:
        """Per-token cache entries: the MLA latent, the shared rope key, the indexer key."""
        return self.kv_lora_rank, self.qk_rope_head_dim, self.index_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """Layer i uses MoE (MTP layers, i >= num_hidden_layers, always do)."""
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    # ---- validation ----
    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"config field '{name}': {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group", "index_n_heads",
                     "index_head_dim", "index_topk", "max_position_embeddings", "moe_layer_freq"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        for name in ("num_nextn_predict_layers", "first_k_dense_replace", "n_shared_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                bad(name, f"must be a non-negative integer, got {v!r}")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA expands one K/V per head: must equal "
                f"num_attention_heads={self.num_attention_heads}, got {self.num_key_value_heads}")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"RoPE rotates pairs: must be even, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            bad("index_head_dim", f"the indexer applies RoPE to its first qk_rope_head_dim="
                f"{self.qk_rope_head_dim} dims: must be >= that, got {self.index_head_dim}")
        if self.index_head_dim & (self.index_head_dim - 1):
            bad("index_head_dim", f"the Hadamard rotation needs a power of two, got {self.index_head_dim}")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            bad("topk_group", f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            bad("num_experts_per_tok", f"{self.num_experts_per_tok} experts cannot be chosen from "
                f"topk_group={self.topk_group} groups of {per_group}")
        if self.n_group > 1 and per_group < 2:
            bad("n_group", "group scores sum each group's top-2 experts: need >= 2 experts per group")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"{self.first_k_dense_replace} exceeds num_hidden_layers="
                f"{self.num_hidden_layers}")
        if self.scoring_func != "sigmoid":
            bad("scoring_func", f"DeepSeek-V3.2 scores experts with 'sigmoid', got {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc",):
            bad("topk_method", f"only 'noaux_tc' (group-limited, bias-corrected) is defined, got {self.topk_method!r}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                bad("rope_scaling", f"only YaRN scaling is supported, got type {kind!r}")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in rs:
                    bad("rope_scaling", f"YaRN needs '{key}'")
            if rs["factor"] < 1:
                bad("rope_scaling", f"factor must be >= 1, got {rs['factor']}")
        if self.quantization_config is not None:
            qc = self.quantization_config
            if qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
                bad("quantization_config", f"only fp8 e4m3 block quantisation is supported, got {qc}")
            blk = qc.get("weight_block_size", [128, 128])
            if len(blk) != 2 or any(int(b) <= 0 for b in blk):
                bad("quantization_config", f"weight_block_size must be two positive ints, got {blk}")

    # ---- config.json ----
    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a parsed config.json (official or transformers-written)."""
        if d.get("model_type") not in (None, "deepseek_v32", "deepseek_v3"):
            raise ConfigError(f"config field 'model_type': expected 'deepseek_v32', got {d['model_type']!r}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        d = dict(d)
        rp = d.pop("rope_parameters", None)  # transformers >= 5 layout
        if rp is not None:
            rp = dict(rp)
            if "rope_theta" in d and "rope_theta" in rp and d["rope_theta"] != rp["rope_theta"]:
                raise ConfigError(f"config fields 'rope_theta' ({d['rope_theta']}) and "
                                  f"'rope_parameters.rope_theta' ({rp['rope_theta']}) disagree")
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            if kind != "default" and "rope_scaling" not in d:
                d["rope_scaling"] = {"type": kind, **rp}
        d.setdefault("rope_scaling", None)
        d.setdefault("num_nextn_predict_layers", 0)  # transformers drops the MTP modules
        d.setdefault("quantization_config", None)
        if "mlp_layer_types" in d:  # transformers: explicit per-layer pattern
            types = d.pop("mlp_layer_types")
            n_dense = d.get("first_k_dense_replace", 0)
            expected = ["dense"] * n_dense + ["sparse"] * (d["num_hidden_layers"] - n_dense)
            if types != expected:
                raise ConfigError(f"config field 'mlp_layer_types' = {types} does not match "
                                  f"first_k_dense_replace={n_dense}; only leading dense layers are supported")
        if d.get("q_lora_rank") is None:
            raise ConfigError("config field 'q_lora_rank': DSA needs the query latent (got null)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("torch_dtype") is None:
            kwargs["torch_dtype"] = d.get("dtype") or "bfloat16"
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None

    def to_hf(self) -> dict:
        """The official config.json layout."""
        d = dataclasses.asdict(self)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", **d}

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path.name} is not valid JSON: {e}") from None
        return cls.from_hf(d)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(factor=4.0, original=256):
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


PRESETS: dict[str, ModelConfig] = {
    # the official DeepSeek-V3.2 (671B total, 37B active), FP8 weights
    "deepseek-v3.2": ModelConfig(quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}),
}
# CPU tests in seconds: every feature present (groups, dense first layer, MTP, DSA with k < seq)
PRESETS["tiny"] = PRESETS["deepseek-v3.2"].replace(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
    index_n_heads=8, index_head_dim=16, index_topk=16, max_position_embeddings=1024,
    rope_scaling=_yarn(4.0, 256), quantization_config=None, torch_dtype="float32")
# one GPU, trainable from scratch: ~0.6B total, ~0.2B active
PRESETS["small"] = PRESETS["deepseek-v3.2"].replace(
    vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=12, num_nextn_predict_layers=1, num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
    index_n_heads=16, index_head_dim=64, index_topk=512, max_position_embeddings=16384,
    rope_scaling=_yarn(4.0, 4096), quantization_config=None, torch_dtype="bfloat16")


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
