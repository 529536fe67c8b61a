"""Which multiply each FP8 serving route runs, counted: a tiny FP8 checkpoint loaded three ways
(load_model(keep_fp8=True), dsv32.load(fp8_weights=True) on one device, the sharded loader at
tp=1 with fp8=True), three greedy tokens through the Engine, and the calls of fp8_gemm,
fp8_grouped_gemm (the FP8 GEMMs) and of the sharded layers' weight_dequant (dequantise per call).
CPU, a few seconds: `PYTHONPATH=. python experiments/fp8_serving_paths.py` (docs/kernels.md)."""

import collections
import tempfile

import torch

import dsv32.model.fp8 as fp8
import dsv32.parallel.layers as layers
from dsv32 import load_model, save_model
from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.loader import load
from dsv32.model import Transformer
from dsv32.parallel.load import load_sharded
from dsv32.parallel.mesh import make_parallel

calls = collections.Counter()


def spy(module, name):
    real = getattr(module, name)

    def counted(*a, **k):
        calls[name] += 1
        return real(*a, **k)

    setattr(module, name, counted)


def run(model, what):
    calls.clear()
    engine = Engine(model, EngineConfig(max_num_seqs=2, num_blocks=8, block_size=16))
    engine.add_request(list(range(2, 12)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    while engine.has_work():
        engine.step()
    stacked = [m.stacked is not None for m in model.modules() if hasattr(m, "stacked")]
    print(f"{what}: MoE experts stacked {stacked}, calls {dict(calls)}")


def main():
    spy(fp8, "fp8_gemm")
    spy(fp8, "fp8_grouped_gemm")
    spy(layers, "weight_dequant")
    cfg = preset("tiny").replace(hidden_size=128, q_lora_rank=128, kv_lora_rank=128, intermediate_size=256,
                                 moe_intermediate_size=128, v_head_dim=32)
    torch.manual_seed(0)
    ckpt = tempfile.mkdtemp(prefix="fp8-paths-")
    save_model(Transformer(cfg).eval(), ckpt, fp8=True)
    run(load_model(ckpt, dtype=torch.float32, keep_fp8=True), "load_model(keep_fp8=True) + Engine")
    model, _ = load(ckpt, dtype="float32", device="cpu", fp8_weights=True)
    print("dsv32.load(fp8_weights=True), one device: q_b_proj weight", model.layers[1].self_attn.q_b_proj.weight.dtype)
    run(load_sharded(ckpt, make_parallel(1, 1), torch.float32, fp8=True), "load_sharded(fp8=True) tp=1 + Engine")


if __name__ == "__main__":
    main()
