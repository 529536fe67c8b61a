"""Train the lightning indexer that dsv32 ships for SmolLM2-135M-Instruct (stage 1 only).

Stage 1 of DeepSeek's recipe (the main model frozen, the indexers learn the head-summed dense
attention by KL) on the standard library's source files, then held-out perplexity at 8K tokens:
dense, DSA with the trained indexer, and DSA with the indexer weights rounded to FP8 blocks (the
form the project commits). The indexer tensors are written in bf16, split in two files so that
each stays small; `dsv32.gguf_import.save_indexer` turns them into the committed FP8 asset.

    python -m experiments.smollm2_indexer --out runs/indexer [--steps 600] [--gguf PATH]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv32.gguf_import import load_gguf
from dsv32.model.fp8 import weight_dequant, weight_quant
from dsv32.tokenizer import PlainTokenizer
from dsv32.train.data import PackedData
from experiments.dsa_parity_moe import evaluate, run_stage
from experiments.dsa_parity_smollm2 import Windows, split_files


def fp8_round_trip(model) -> None:
    """Round every 2-D indexer weight through 128x128-block FP8, in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".indexer." in name and p.dim() == 2:
                q, s = weight_quant(p.float())
                p.copy_(weight_dequant(q, s, dtype=torch.float32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/indexer")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train-len", type=int, default=4096)
    ap.add_argument("--eval-len", type=int, default=8192)
    ap.add_argument("--n-eval", type=int, default=3)
    ap.add_argument("--topk", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--gguf", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf_tok = load_gguf(args.gguf)
    tok = PlainTokenizer(hf_tok, model.cfg.bos_token_id, model.cfg.eos_token_id)
    held, train_docs = split_files(tok, args.eval_len, args.n_eval)
    held_data = Windows([w for _, w in held])
    train = PackedData.from_documents(train_docs, tok, args.train_len, seed=0)
    model.cfg.index_topk = args.topk[0]
    model.to(dev)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "steps": args.steps,
           "train_len": args.train_len, "held_out_files": [n for n, _ in held], "evals": {}}
    t0 = time.time()
    hist, tokens, secs = run_stage(model, train, "dsa-warmup", out, 1e9, seq_len=args.train_len, batch_size=1,
                                   device=dev, warmup=20, steps=args.steps, lr=1e-3, index_topk=args.topk[0],
                                   mtp_weight=0.0, balance_alpha=0.0, bias_update_rate=0.0)
    res.update(tokens=tokens, train_seconds=round(secs, 1),
               kl_first=hist[0].get("indexer_kl"), kl_last=hist[-1].get("indexer_kl"))
    ix = {n: p.detach().to(torch.bfloat16).cpu().contiguous() for n, p in model.named_parameters() if ".indexer." in n}
    half = model.cfg.num_hidden_layers // 2
    save_file({n: t for n, t in ix.items() if int(n.split(".")[1]) < half}, str(out / "indexer-a.safetensors"))
    save_file({n: t for n, t in ix.items() if int(n.split(".")[1]) >= half}, str(out / "indexer-b.safetensors"))
    res["evals"]["stage 1"] = evaluate(model, held_data, args.topk, n_windows=len(held), batch=1)
    print("stage 1", res["evals"]["stage 1"], flush=True)
    fp8_round_trip(model)
    res["evals"]["stage 1, FP8 indexer weights"] = evaluate(model, held_data, args.topk, n_windows=len(held), batch=1)
    print("fp8", res["evals"]["stage 1, FP8 indexer weights"], flush=True)
    res["total_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
