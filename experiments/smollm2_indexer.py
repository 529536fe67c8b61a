"""Train the lightning indexer that dsv32 ships for SmolLM2-135M-Instruct (stage 1 only).

Stage 1 of DeepSeek's recipe (the main model frozen, the indexers learn the head-summed dense
attention by KL) on the standard library's source files, for a fixed number of steps with a cosine
schedule; then held-out perplexity at 8K tokens: dense, DSA with the trained indexer, and DSA with
the indexer read back from the FP8 file that `dsv32.checkpoint.save_indexer` writes (the form the
project commits as dsv32/assets/smollm2_indexer.safetensors, 11 MB).

    python -m experiments.smollm2_indexer --out runs/indexer [--steps 600] [--gguf PATH]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from dsv32.checkpoint import load_indexer, save_indexer
from dsv32.llama.gguf import SMOLLM2_GGUF, load_gguf
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.train.data import PackedData
from dsv32.train.retrieval_mix import RetrievalMix
from experiments.dsa_parity_moe import Windows, evaluate, run_stage, stage_config
from experiments.dsa_parity_smollm2 import split_files


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/indexer")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train-len", type=int, default=4096)
    ap.add_argument("--eval-len", type=int, default=8192)
    ap.add_argument("--n-eval", type=int, default=3)
    ap.add_argument("--topk", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20, help="learning-rate warm-up steps")
    ap.add_argument("--retrieval-share", type=float, default=0.0,
                    help="share of stage-1 windows with a long-range repeat (0: the packed source files alone)")
    ap.add_argument("--init-indexer", default=None, help="start from this saved indexer (save_indexer's file)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="the training windows' seed (and the trainer's)")
    args = ap.parse_args()
    if not 0.0 <= args.retrieval_share <= 1.0:
        ap.error(f"--retrieval-share is a fraction in [0, 1], got {args.retrieval_share}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf_tok = load_gguf(args.gguf)
    tok = PlainTokenizer(hf_tok, model.cfg.bos_token_id, model.cfg.eos_token_id)
    held, train_docs = split_files(tok, args.eval_len, args.n_eval)
    held_data, held_names = Windows([w for _, w in held]), [n for n, _ in held]
    if args.retrieval_share > 0:
        train = RetrievalMix.from_documents(train_docs, tok, args.train_len, args.retrieval_share, seed=args.seed)
    else:
        train = PackedData.from_documents(train_docs, tok, args.train_len, seed=args.seed)
    if args.init_indexer:
        load_indexer(model, args.init_indexer)
    model.cfg.index_topk = args.topk[0]
    model.to(dev)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "steps": args.steps,
           "train_len": args.train_len, "lr": args.lr, "retrieval_share": args.retrieval_share, "seed": args.seed,
           "init_indexer": args.init_indexer and Path(args.init_indexer).name, "held_out_files": held_names, "evals": {}}
    t0 = time.time()
    if args.init_indexer:
        res["evals"]["initial indexer"] = evaluate(model, held_data, args.topk, batch=1)
    hist, tokens, secs = run_stage(model, train, stage_config("dsa-warmup", args.steps, args.lr, out / "dsa-warmup",
                                                             seq_len=args.train_len, batch_size=1, device=dev, warmup=args.warmup,
                                                             index_topk=args.topk[0], mtp_weight=0.0, balance_alpha=0.0,
                                                             bias_update_rate=0.0, seed=args.seed))
    res.update(tokens=tokens, train_seconds=round(secs, 1),
               kl_first=hist[0].get("indexer_kl"), kl_last=hist[-1].get("indexer_kl"))
    res["evals"]["stage 1"] = evaluate(model, held_data, args.topk, batch=1)
    print("stage 1", res["evals"]["stage 1"], flush=True)
    path = out / "smollm2_indexer.safetensors"
    save_indexer(model, path, {"base": Path(SMOLLM2_GGUF.member).name, "stage": "dsa-warmup", "tokens": str(tokens),
                                "retrieval_share": str(args.retrieval_share), "init": str(res["init_indexer"])})
    load_indexer(model, path)  # evaluate what ships
    res["evals"]["stage 1, FP8 indexer weights"] = evaluate(model, held_data, args.topk, batch=1)
    print("fp8", res["evals"]["stage 1, FP8 indexer weights"], flush=True)
    res["total_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
