"""An FP8 checkpoint served with its weights kept in FP8: load_model(keep_fp8=True) /
dsv32.load(fp8_weights=True) through the Engine, whose dense linears multiply through fp8_linear
and whose routed experts run as grouped FP8 GEMMs, against the same checkpoint dequantised."""

import logging

import pytest
import torch

from dsv32 import load_model, save_model
from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.loader import load
from dsv32.model import Transformer, moe as moe_mod
from dsv32.model.fp8 import FP8, FP8Linear, fp8_backend
from dsv32.model.moe import MoE

# dims that are multiples of 128 where the FP8 projections read their input
CFG = preset("tiny").replace(hidden_size=128, q_lora_rank=128, kv_lora_rank=128, intermediate_size=256,
                             moe_intermediate_size=128, v_head_dim=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    save_model(Transformer(CFG).eval(), path, fp8=True)
    return path


def _greedy(model, prompts, graphs=False):
    engine = Engine(model, EngineConfig(max_num_seqs=4, num_blocks=16, block_size=16, cuda_graphs=graphs))
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    return [(s.output_tokens, s.logprobs) for s in seqs]


@pytest.mark.parametrize("device,dtype,tol", [
    ("cpu", torch.float32, 1e-3),
    # CUDA graphs, bf16 activations: a bf16 reordering that crosses an e4m3 rounding boundary of an
    # activation moves it by up to 2^-4, so near-ties flip; on an H100 one of 20 greedy tokens sat
    # 0.078 below the full forward's max (a random token sits ~0.5 below: log-probs span ~1 nat)
    pytest.param("cuda", torch.bfloat16, 0.1, marks=pytest.mark.gpu)])
def test_engine_on_kept_fp8_weights_runs_fp8_and_tracks_the_dequantised_model(ckpt, monkeypatch, caplog,
                                                                              device, dtype, tol):
    grouped = {"calls": 0}
    real = moe_mod.moe_experts_fp8

    def counted(*a):
        grouped["calls"] += 1
        return real(*a)

    monkeypatch.setattr(moe_mod, "moe_experts_fp8", counted)
    prompts = [[int(t) for t in torch.randint(2, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (5, 23)]
    with caplog.at_level(logging.INFO):
        kept = load_model(ckpt, dtype=dtype, device=device, keep_fp8=True)
        got = _greedy(kept, prompts, graphs=device == "cuda")
    plain = load_model(ckpt, dtype=dtype, device=device)
    # the serving path is FP8: experts stacked e4m3, run by the grouped GEMM; the active path logged
    moes = [m for m in kept.modules() if isinstance(m, MoE)]
    assert moes and all(m.stacked is not None and m.stacked[0].dtype == FP8 for m in moes)
    assert grouped["calls"] >= len(moes) * 2        # a prefill and decode steps through every MoE layer
    text = caplog.text
    assert f"through act_quant + {fp8_backend(device)}, 0 dequantised per call" in text
    assert f"({len(moes)} of them grouped FP8 GEMMs)" in text
    with torch.no_grad():
        for p, (tokens, logprobs) in zip(prompts, got):
            ids = torch.tensor([p + tokens], device=device)
            lp_kept = kept(ids).logits[0, len(p) - 1:-1].float().log_softmax(-1)     # [10, V]
            lp_plain = plain(ids).logits[0, len(p) - 1:-1].float().log_softmax(-1)
            chosen = torch.tensor(tokens, device=device)[:, None]
            # the engine (paged cache, absorbed decode, grouped experts) picks the kept model's own
            # greedy token, up to the reorderings of its dtype's sums (tol)
            assert (lp_kept.gather(1, chosen)[:, 0] >= lp_kept.max(-1).values - tol).all()
            assert max(abs(a - b) for a, b in zip(logprobs, lp_kept.gather(1, chosen)[:, 0].tolist())) < tol
            # against the dequantised model (e4m3 rounding of the activations, 2^-4 an element at
            # most): next-token distributions within KL 0.01 and log-probs within 0.05 on average
            # (measured on this model: KL <= 0.0025, mean 0.02). Greedy tokens are NOT compared:
            # a random model's next-token distribution is near-flat (log-probs ~ -ln 512) and FP8
            # rounding flips its near-ties (a third of the argmaxes on these prompts)
            kl = (lp_plain.exp() * (lp_plain - lp_kept)).sum(-1)
            assert kl.max() < 0.01 and (lp_kept - lp_plain).abs().mean() < 0.05


def test_load_fp8_weights_on_one_device(ckpt, tmp_path):
    model, _ = load(ckpt, dtype="float32", device="cpu", fp8_weights=True)
    assert isinstance(model.layers[1].self_attn.q_b_proj, FP8Linear)
    assert isinstance(model.layers[1].mlp.experts[0].down_proj, FP8Linear)
    model, _ = load(ckpt, dtype="float32", device="cpu")     # the default: dequantised at load
    assert model.layers[1].self_attn.q_b_proj.weight.dtype == torch.float32
    for source in ("tiny", None):   # a preset, the default model: no FP8 checkpoint to keep
        with pytest.raises(ValueError, match="fp8_weights"):
            load(source, device="cpu", fp8_weights=True)
    save_model(model, tmp_path / "bf16")
    with pytest.raises(ValueError, match="keep_fp8 needs an FP8 checkpoint"):
        load(tmp_path / "bf16", device="cpu", fp8_weights=True)
