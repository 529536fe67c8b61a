"""The batch-invariant mode: what it buys (the share of sampled tokens whose log-prob the trainer's
replay gives back bit for bit) and what it costs (engine decode tokens/s, the replay's forward +
backward time), with the mode off and on.

    python bench/batch_invariant.py --out DIR                                  # CPU, tiny, fp32
    python bench/batch_invariant.py --device cuda --dtype bfloat16 --out DIR   # one GPU

A GRPO-like batch: --prompts prompts of random lengths, sampled at temperature 1.0 with top-p 0.95
and RL records, replayed as the RL trainer does (a separate copy of the weights, autograd on).
Writes batch_invariant-<device>.json and .md under --out; where bits still differ, the per-module
count of first differences comes from dsv32/rl/bisect.py (`python -m dsv32.rl.bisect`).
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (its profile.py)

from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.model import Transformer
from dsv32.rl.agreement import bitwise_agreement, kept_sizes
from dsv32.rl.rollout import new_trajectory, pack, replay_logprobs
from dsv32.rl.tasks import Task


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, policy, prompts, params, invariant: bool, device: str) -> dict:
    eng = Engine(model, EngineConfig(num_blocks=len(prompts) * 8 + 8, block_size=64, max_num_seqs=len(prompts),
                                     batch_invariant=invariant))
    seqs = [eng.add_request(p, params) for p in prompts]
    sync(device)
    t0 = time.perf_counter()
    while eng.has_work():
        eng.step()
    sync(device)
    engine_s = time.perf_counter() - t0
    trajs = []
    for p, s in zip(prompts, seqs):
        t = new_trajectory(Task("bench", []), p)
        t.add_sampled(eng.output(s))
        trajs.append(t)
    batch = pack(trajs, device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.enable_grad():
        lp = replay_logprobs(policy, batch, params.temperature, batch_invariant=invariant)
        lp[batch.action].sum().backward()
    sync(device)
    replay_s = time.perf_counter() - t0
    policy.zero_grad(set_to_none=True)
    got, want = lp.detach()[batch.action].float(), batch.logp_old[batch.action].float()
    n = int(batch.action.sum())
    # the share that says something is the one among tokens with more than one kept candidate
    agree = bitwise_agreement(got, want, kept_sizes(batch.keep))
    return {"batch_invariant": invariant, "sampled_tokens": n, "bit_equal_share": agree["bit_equal_share"],
            "multi_candidate_tokens": agree["multi_candidate_tokens"],
            "bit_equal_share_multi": agree["bit_equal_share_multi"],
            "max_abs_diff": float((got - want).abs().max()), "engine_tokens_per_s": round(n / engine_s, 1),
            "engine_s": round(engine_s, 3), "replay_fwd_bwd_s": round(replay_s, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--index-topk", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = Transformer(preset(args.preset).replace(index_topk=args.index_topk)).to(args.device, dtype).eval()
    policy = copy.deepcopy(model).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 64, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(2, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.tokens, seed=0, ignore_eos=True,
                            return_rl_data=True)
    rows = []
    for invariant in (False, True):
        measure(model, policy, prompts[:1], SamplingParams(max_tokens=2, return_rl_data=True), invariant, args.device)
        rows.append(measure(model, policy, prompts, params, invariant, args.device))
        print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"device": device, "preset": args.preset, "dtype": args.dtype, "prompts": args.prompts,
              "tokens": args.tokens, "rows": rows,
              "engine_slowdown": round(rows[0]["engine_tokens_per_s"] / rows[1]["engine_tokens_per_s"], 2),
              "replay_slowdown": round(rows[1]["replay_fwd_bwd_s"] / rows[0]["replay_fwd_bwd_s"], 2)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"batch_invariant-{device.replace(' ', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Batch-invariant mode on {device} ({args.preset}, {args.dtype})", "",
             f"{args.prompts} prompts, {args.tokens} sampled tokens each, temperature 1.0, top-p 0.95.", "",
             "| mode | sampled tokens | bit-equal log-probs | with > 1 kept candidate | bit-equal among those | max abs diff | engine tokens/s | replay fwd+bwd s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        multi = "-" if r["bit_equal_share_multi"] is None else f"{r['bit_equal_share_multi']:.1%}"
        lines.append(f"| {'batch-invariant' if r['batch_invariant'] else 'default'} | {r['sampled_tokens']} | "
                     f"{r['bit_equal_share']:.1%} | {r['multi_candidate_tokens']} | {multi} | {r['max_abs_diff']:.3g} | {r['engine_tokens_per_s']} | "
                     f"{r['replay_fwd_bwd_s']} |")
    lines += ["", f"Cost: engine {result['engine_slowdown']}x slower, replay {result['replay_slowdown']}x slower."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
