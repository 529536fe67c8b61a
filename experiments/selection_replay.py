"""Keep Selection: how far the trainer's log-probs are from the engine's when DSA is active, with
and without replaying the engine's key selection.

A random `tiny` V3.2 model (fp32, index_topk 16) samples 60-token answers to arithmetic prompts
through the engine (chunked prefill, cached decode); the trainer replays them with one forward
over each whole trajectory, routes forced (Keep Routing) and kept sets applied (Keep Sampling
Mask), with its own top-k (off) or the engine's recorded key sets (on). A third row gives every
query all of its keys (index_topk above the length), where the selection cannot differ.

    python experiments/selection_replay.py --out runs/selection_replay [--device cuda]

Writes results.json (and prints a table); docs/rl.md reports it.
"""

import argparse
import json
import random
from pathlib import Path

import torch

from dsv32.chat import encode_messages
from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.model import Transformer
from dsv32.rl.rollout import pack, replay_logprobs, rollout
from dsv32.rl.tasks import arithmetic_task
from dsv32.tokenizer import train_tokenizer


def stats(diff: torch.Tensor) -> dict:
    d = diff.abs().double()
    return {"mean": float(d.mean()), "max": float(d.max()), "share_above_1e-4": float((d > 1e-4).double().mean()),
            "tokens": d.numel()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/selection_replay")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(args.seed)
    corpus = out / "corpus.txt"
    tasks = [arithmetic_task(rng) for _ in range(200)]
    corpus.write_text("\n".join(encode_messages(t.messages + t.solution, t.thinking_mode) for t in tasks))
    tok = train_tokenizer([corpus], 1024, out)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=args.new_tokens, ignore_eos=True, seed=None)
    prompts = [arithmetic_task(rng) for _ in range(args.samples)]
    results = {}
    for name, topk in (("dsa_k16", 16), ("all_keys", 4096)):
        torch.manual_seed(args.seed)
        cfg = preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     index_topk=topk, max_position_embeddings=4096)
        model = Transformer(cfg).to(args.device).eval()
        eng = Engine(model, EngineConfig(num_blocks=256, prefill_chunk=24, max_num_seqs=args.samples))
        torch.manual_seed(args.seed)
        trajs = rollout(eng, tok, prompts, params)
        batch = pack(trajs, 0, device=args.device)
        old = batch.logp_old[batch.action]
        row = {"lengths": [len(t.tokens) for t in trajs]}
        for switch in (False, True):
            with torch.no_grad():
                lp = replay_logprobs(model, batch, params.temperature, keep_selection=switch)[batch.action]
            row["keep_selection_on" if switch else "keep_selection_off"] = stats(lp - old)
        if batch.selection is not None:
            row["selection_bytes"] = sum(t.selection.numel() * t.selection.element_size() for t in trajs)
            row["selection_positions"] = sum(len(t.selection) for t in trajs)
        results[name] = row
        print(f"{name}: off {row['keep_selection_off']}\n{' ' * len(name)}  on  {row['keep_selection_on']}")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
