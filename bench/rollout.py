"""RL rollout benchmark: one GRPO rollout batch (P prompts x G samples, top-p sampling, kept sets
and expert ids recorded) through the engine, on the small MoE of experiments/rl_arithmetic.py
(random weights, so every sample runs to max_tokens).

    python bench/rollout.py [--label NAME] [--prompts 32 64] [--group 8]

Appends one row per batch shape to bench/results/rollout-<device>.json and rewrites the .md; run
it twice with different code on PYTHONPATH to compare versions on the same machine.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv32.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from dsv32.model import Transformer  # noqa: E402
from dsv32.rl.rollout import rollout  # noqa: E402
from dsv32.rl.trainer import RLConfig, build  # noqa: E402
from experiments.rl_arithmetic import moe_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="current")
    ap.add_argument("--prompts", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=40)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    _, tok, mix, _ = build(RLConfig(domains=["arithmetic"], tokenizer_vocab=1024, out=tempfile.mkdtemp()))
    torch.manual_seed(0)
    model = Transformer(moe_config(tok, quick=False)).to(device).eval()
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.max_tokens, ignore_eos=True,
                            return_rl_data=True)
    out = Path(__file__).parent / "results" / f"rollout-{name.replace(' ', '_')}.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for p in args.prompts:
        n = p * args.group
        tasks = [t for t in mix.sample(random.Random(0), p) for _ in range(args.group)]
        eng = Engine(model, EngineConfig(max_num_seqs=n, num_blocks=n * 8 + 1, max_model_len=512,
                                         max_num_batched_tokens=8192), tok)
        rollout(eng, tok, tasks[: args.group], params)              # warm-up
        times = []
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trajs = rollout(eng, tok, tasks, params)
            times.append(time.perf_counter() - t0)
        tokens = sum(t.n_sampled for t in trajs)
        row = {"label": args.label, "device": name, "prompts": p, "group": args.group, "sequences": n,
               "sampled_tokens": tokens, "seconds": min(times), "tokens_per_s": tokens / min(times)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out.write_text(json.dumps(rows, indent=1))
    md = [f"# RL rollout batch, {name}", "", "Small MoE of experiments/rl_arithmetic.py, top-p 0.95, "
          f"{args.max_tokens} tokens per sample, kept sets and expert ids recorded; best of 3.", "",
          "| code | prompts x G | sequences | seconds | sampled tokens/s |", "|---|---|---|---|---|"]
    md += [f"| {r['label']} | {r['prompts']} x {r['group']} | {r['sequences']} | {r['seconds']:.2f} | "
           f"{r['tokens_per_s']:,.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
