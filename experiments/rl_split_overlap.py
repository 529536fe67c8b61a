"""How many of rl_arithmetic's held-out prompts its training streams also drew, with the old split
(held-out prompts drawn from the same generators, nothing excluded) and with the new one (held-out
and OOD prompts excluded by hash from every SFT and RL prompt). No model runs: the prompt streams
are pure functions of the seeds, drawn here as the experiment and the RL trainer draw them.

    python experiments/rl_split_overlap.py --out runs/split_overlap     # CPU, seconds

The defaults are the documented GPU runs (docs/rl.md): the MoE's SFT of 400 steps x 64 examples,
its main runs (64 prompts a step, seeds 0-3, up to 56 steps) and ablation (16 prompts a step, 65
steps); SmolLM2's SFT of 100 steps x 32 and RL of 32 prompts a step for 102 steps.
"""

import argparse
import json
import random
from pathlib import Path

from dsv32.rl.tasks import Domain, TaskMix, prompt_hash
from experiments.rl_arithmetic import clean_splits, hashes_of

MOE = [Domain("arithmetic", 0, 3), Domain("arithmetic-tool", 0.01, 1)]
ABLATION = [Domain("arithmetic", 0.02)]
SMOLLM2 = [Domain("arithmetic", 0)]


def sft_stream(mix: TaskMix, steps: int, batch: int, seed: int = 0) -> None:
    """warm_start's draws: max(256, steps * batch / 4) tasks with random.Random(seed + 1)."""
    mix.sample(random.Random(seed + 1), max(256, steps * batch // 4))


def rl_stream(mix: TaskMix, prompts: int, steps: int, seed: int) -> None:
    """RLTrainer's draws: each step samples its prompts, then shuffles their order, from one
    random.Random(seed)."""
    rng = random.Random(seed)
    for _ in range(steps):
        mix.sample(rng, prompts)
        rng.shuffle(list(range(prompts)))


def overlap(held, mixes) -> dict:
    """The share of held-out prompts (counted with repeats, as the old evaluation did) whose hash
    one of the training mixes drew."""
    seen = set().union(*(m.seen for m in mixes))
    hits = sum(prompt_hash(t) in seen for t in held)
    return {"held_out": len(held), "distinct": len(hashes_of(held)), "in_training": hits,
            "share": round(hits / len(held), 4)}


def streams(make_mix, args) -> dict:
    """{experiment: its training mixes after drawing every documented stream}."""
    moe, abl, smol = make_mix(MOE), make_mix(ABLATION), make_mix(SMOLLM2)
    sft_stream(moe, args.moe_sft_steps, 64)
    for seed in args.moe_seeds:
        rl_stream(moe, 64, args.moe_steps, seed)
    rl_stream(abl, 16, args.ablation_steps, 0)
    sft_stream(smol, args.smollm2_sft_steps, 32)
    rl_stream(smol, 32, args.smollm2_steps, 0)
    return {"moe": [moe], "ablation": [moe, abl], "smollm2": [smol]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/split_overlap")
    ap.add_argument("--n", type=int, default=128, help="held-out prompts per set")
    ap.add_argument("--moe-sft-steps", type=int, default=400)
    ap.add_argument("--moe-steps", type=int, default=56)
    ap.add_argument("--moe-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--ablation-steps", type=int, default=65)
    ap.add_argument("--smollm2-sft-steps", type=int, default=100)
    ap.add_argument("--smollm2-steps", type=int, default=102)
    args = ap.parse_args()
    # old: the held-out prompts drawn by mix.sample(random.Random(12345), n), nothing excluded
    old_held = {name: TaskMix(d).sample(random.Random(12345), args.n)
                for name, d in (("moe", MOE), ("ablation", ABLATION), ("smollm2", SMOLLM2))}
    old_mixes = streams(lambda d: TaskMix(d), args)
    result = {"old": {name: overlap(old_held[name], old_mixes[name]) for name in old_held}}
    # the old MoE held-out share on its arithmetic domain alone (what docs/rl.md's table reports)
    arith = [t for t in old_held["moe"] if t.domain == "arithmetic"]
    result["old"]["moe (arithmetic domain)"] = overlap(arith, old_mixes["moe"])
    # new: clean_splits as rl_arithmetic makes them, every training mix excluding their hashes
    new = {"moe": clean_splits({"main": TaskMix(MOE), "ablation": TaskMix(ABLATION)}, args.n, 64),
           "smollm2": clean_splits({"smollm2": TaskMix(SMOLLM2)}, args.n, 64)}
    ex = {k: set().union(*map(hashes_of, v.values())) for k, v in new.items()}
    new_mixes = streams(lambda d: TaskMix(d, exclude=ex["smollm2" if d is SMOLLM2 else "moe"]), args)
    result["new"] = {"moe": overlap(new["moe"]["main"], new_mixes["moe"]),
                     "ablation": overlap(new["moe"]["ablation"], new_mixes["ablation"]),
                     "smollm2": overlap(new["smollm2"]["smollm2"], new_mixes["smollm2"]),
                     "moe ood": overlap(new["moe"]["ood"], new_mixes["ablation"]),
                     "smollm2 ood": overlap(new["smollm2"]["ood"], new_mixes["smollm2"])}
    result["config"] = vars(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
