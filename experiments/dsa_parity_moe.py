"""DSA parity on a small V3.2-architecture MoE of ours: V3.1-Terminus in miniature.

1. pretrain with dense attention on Python standard-library sources (the train split);
2. held-out perplexity (disjoint stdlib files, at least --held-out-tokens of them in disjoint
   windows): dense vs DSA with no training, at k = 1/16 and 1/64 of the context;
3. stage 1 (dense warm-up: indexer only, KL to the main attention);
4. stage 2 (sparse training: top-k on, everything trains, indexer on detached inputs), once for
   each k, each from the stage-1 model;
5. a dense control: the stage-1 model trained densely with the same step count, learning rate and
   schedule as stage 2 (stage 2 is also more training: the dense perplexity it is compared with);
6. after each stage: held-out perplexity and the recall of the dense attention mass inside the
   selected set, per layer; the tokens each stage spent.

Every stage runs a fixed number of steps (--steps-*), and its learning-rate schedule (warm-up,
cosine decay to 0.1 of the peak) spans exactly those steps: no time budget cuts a stage short
with its learning rate still near the peak. The whole pipeline runs once per seed (--seeds; model
init and batch order), and results.json has each seed's numbers and their mean and standard error.

    python experiments/dsa_parity_moe.py --out runs/dsa_parity                # one GPU, 3 seeds
    python experiments/dsa_parity_moe.py --out runs/dsa_parity_q --quick      # CPU pipeline check
    # seeds as separate processes or calls, then one results.json:
    python experiments/dsa_parity_moe.py --out runs/s0 --seeds 1 --first-seed 0   (and s1, s2 ...)
    python experiments/dsa_parity_moe.py --out runs/dsa_parity --merge runs/s0 runs/s1 runs/s2

Writes results.json and plots into --out; docs/dsa-parity.md reports a GPU run.
"""

import argparse
import copy
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.tokenizer import train_tokenizer
from dsv32.train import TrainConfig, Trainer
from dsv32.train.data import PackedData

EVAL_STEP = 10_000  # evaluate() asks windows for "steps" from here on: Windows counts from it


def stdlib_split():
    """Standard-library .py files, split by a hash of their path: 1 in 10 is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    held = [f for f in files if zlib.crc32(str(f.relative_to(root)).encode()) % 10 == 0]
    train = [f for f in files if f not in set(held)]
    return train, held


def model_config(vocab, tok, quick: bool = False):
    if quick:
        return preset("tiny").replace(vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return preset("small").replace(
        vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, hidden_size=512,
        intermediate_size=1536, moe_intermediate_size=384, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
        index_n_heads=8, index_head_dim=64, max_position_embeddings=8192)


class Windows:
    """Fixed evaluation windows of seq_len + 1 tokens; batch(EVAL_STEP + i, b) gives windows i..i+b-1."""

    def __init__(self, windows: list[np.ndarray]):
        self.windows = windows

    @classmethod
    def disjoint(cls, ids: np.ndarray, seq_len: int, tokens: int) -> "Windows":
        """ceil(tokens / seq_len) windows of a token stream whose targets do not overlap: at least
        `tokens` held-out tokens are predicted, each once. Too short a stream is an error."""
        n = math.ceil(tokens / seq_len)
        if len(ids) < n * seq_len + 1:
            raise ValueError(f"the held-out data has {len(ids)} tokens, fewer than the {n * seq_len + 1} that "
                             f"{n} windows of {seq_len} (--held-out-tokens {tokens}) need")
        return cls([np.asarray(ids[i * seq_len:(i + 1) * seq_len + 1], dtype=np.int64) for i in range(n)])

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, step: int, batch_size: int):
        w = torch.from_numpy(np.stack([self.windows[(step - EVAL_STEP + i) % len(self.windows)]
                                       for i in range(batch_size)]))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


@torch.no_grad()
def evaluate(model, data: Windows, topks, batch=4):
    """Held-out perplexity over every window of `data` with dense attention and with DSA at each
    k, plus per-layer recall of the dense attention mass inside each k's selected set."""
    model.eval()
    dev = model.embed_tokens.weight.device
    n_windows = len(data)
    nll = {"dense": 0.0, **{f"dsa_k{k}": 0.0 for k in topks}}
    recall = {k: torch.zeros(model.cfg.num_hidden_layers) for k in topks}
    n_tok = 0
    saved_k = model.cfg.index_topk
    for i in range(0, n_windows, batch):
        b = min(batch, n_windows - i)
        x, y = (t.to(dev) for t in data.batch(EVAL_STEP + i, b))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            dense = model(x, sparse=False, return_aux=True, return_attn_probs=True)
            nll["dense"] += torch.nn.functional.cross_entropy(dense.logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            for k in topks:
                model.cfg.index_topk = k
                out = model(x, sparse=True)
                nll[f"dsa_k{k}"] += torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
                for layer, (scores, probs) in enumerate(zip(dense.index_scores, dense.attn_probs)):
                    idx = scores.float().topk(min(k, scores.shape[-1]), -1).indices
                    p = probs / probs.sum(-1, keepdim=True)
                    recall[k][layer] += p.gather(-1, idx).sum(-1).mean().item() * b
            model.cfg.index_topk = saved_k
        n_tok += y.numel()
    model.train()
    res = {f"ppl_{name}": round(float(torch.exp(torch.tensor(v / n_tok))), 3) for name, v in nll.items()}
    res.update({f"recall_k{k}": [round(v / n_windows, 4) for v in recall[k].tolist()] for k in topks})
    res["tokens"] = n_tok
    return res


def stage_config(stage: str, steps: int, lr: float, out: Path, **kw) -> TrainConfig:
    """One stage's TrainConfig: its schedule spans exactly `steps` (run_stage runs them all)."""
    return TrainConfig(stage=stage, steps=steps, lr=lr, out=str(out), checkpoint_every=10**9, **kw)


def plan(args, k: int, seed: int, out: Path, common: dict) -> dict[str, TrainConfig]:
    """{stage name: TrainConfig} of one seed's pipeline, stage 2 at top-k k. The dense control is
    stage 2's config with dense attention: the same steps, learning rate, warm-up and decay."""
    kw = dict(common, seed=seed)
    sparse = stage_config("dsa-sparse", args.steps_sparse, args.lr_sparse, out / f"dsa-sparse-k{k}", **kw, index_topk=k)
    return {"pretrain": stage_config("pretrain", args.steps_pretrain, args.lr_pretrain, out / "pretrain",
                                     **kw, attention="dense"),
            "dsa-warmup": stage_config("dsa-warmup", args.steps_warmup, args.lr_warmup, out / "dsa-warmup", **kw),
            f"dsa-sparse k{k}": sparse,
            "dense control": stage_config("pretrain", sparse.steps, sparse.lr, out / "dense-control",
                                          **{**kw, "index_topk": k}, attention="dense")}


def run_stage(model, data, cfg: TrainConfig, log_every: int = 20, budget_s: float = math.inf):
    """cfg.steps optimizer steps -> (per-step metrics, tokens spent, seconds). The parity stages
    run them all; `budget_s` lets a benchmark stop early (its schedule then ends undecayed)."""
    tr = Trainer(cfg, model, data)
    t0, hist = time.time(), []
    while tr.step < cfg.steps and time.time() - t0 < budget_s:
        m = tr.train_step()
        hist.append(m)
        if tr.step % log_every == 0 or tr.step == cfg.steps:
            print(cfg.stage, {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}, flush=True)
    return hist, tr.step * cfg.batch_size * cfg.seq_len, time.time() - t0


def run_seed(args, seed: int, tok, train_ids, held: Windows, topks, out: Path, dev: str, save) -> dict:
    """The whole pipeline for one seed -> {"evals", "tokens", "seconds", "history"}."""
    res = {"evals": {}, "tokens": {}, "seconds": {}, "history": {}}
    train = PackedData(train_ids, args.seq_len, seed=seed)
    torch.manual_seed(seed)
    model = Transformer(model_config(tok.vocab_size, tok, args.quick).replace(index_topk=topks[0])).to(dev)
    res["params"] = sum(p.numel() for p in model.parameters())
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, device=dev, warmup=args.warmup)

    def stage(name, m, cfg):
        hist, tokens, secs = run_stage(m, train, cfg)
        res["history"][name], res["tokens"][name], res["seconds"][name] = hist, tokens, round(secs, 1)
        key = name if name == "dense control" else f"after {name}"
        res["evals"][key] = evaluate(m, held, topks)
        print(f"[seed {seed}] {key}", res["evals"][key], flush=True)
        save()

    cfgs = {k: plan(args, k, seed, out / f"seed{seed}", common) for k in topks}
    first = cfgs[topks[0]]
    stage("pretrain", model, first["pretrain"])
    stage("dsa-warmup", model, first["dsa-warmup"])
    for k in topks:
        stage(f"dsa-sparse k{k}", copy.deepcopy(model), cfgs[k][f"dsa-sparse k{k}"])
    stage("dense control", model, first["dense control"])
    return res


def mean_se(values: list[float]) -> dict:
    """Mean and standard error (sample std / sqrt(n); None for one value) of a list."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return {"mean": round(mean, 4), "se": None if se is None else round(se, 4), "n": n}


def summarise(seeds: dict, topks) -> dict:
    """Across seeds: mean ± s.e. of every stage's perplexities, and of the paired gap between
    stage 2 at each k (DSA at that k) and the dense control (dense), in percent."""
    runs = list(seeds.values())
    out = {}
    for name in runs[0]["evals"]:
        keys = [k for k in runs[0]["evals"][name] if k.startswith("ppl_")]
        out[name] = {key: mean_se([r["evals"][name][key] for r in runs]) for key in keys}
    for k in topks:
        gaps = [100 * (r["evals"][f"after dsa-sparse k{k}"][f"ppl_dsa_k{k}"] / r["evals"]["dense control"]["ppl_dense"] - 1)
                for r in runs]
        out[f"gap % (stage 2 DSA k{k} vs dense control)"] = mean_se(gaps)
    return out


def plot(evals: dict, history: dict, out: Path) -> None:
    """Perplexity by stage and recall per layer (one seed's evals); training curves back to back,
    every stage 2 and the dense control starting where stage 1 ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evals)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in [k for k in evals[names[0]] if k.startswith("ppl_")]:
        axes[0].plot(range(len(names)), [evals[n][key] for n in names], "o-", label=key[4:])
    axes[0].set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    axes[0].set_ylabel("held-out perplexity")
    axes[0].set_title("perplexity by stage")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    for n in names:
        for key in [k for k in evals[n] if k.startswith("recall_")]:
            axes[1].plot(range(len(evals[n][key])), evals[n][key], "o-", label=f"{n} {key[7:]}")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("dense attention mass inside the selected set")
    axes[1].set_title("recall per layer")
    axes[1].legend(fontsize=6)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dsa_parity.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for stage, hist in history.items():
        key = "indexer_kl" if stage == "dsa-warmup" else "lm"
        branch = stage.startswith("dsa-sparse") or stage == "dense control"
        ax.plot([offset + h["step"] for h in hist], [h[key] for h in hist], label=f"{stage} {key}")
        if not branch:
            offset += len(hist)
    ax.set_xlabel("step (stages back to back; stage 2 runs and the control from the end of stage 1)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)


def merge(out: Path, parts: list[str]) -> dict:
    """Seeds run as separate processes (each its own --out) -> one results.json with the summary."""
    results = None
    for part in map(Path, parts):
        r = json.loads((part / "results.json").read_text())
        if results is None:
            results = r
        else:
            if r["topk"] != results["topk"] or r["steps"] != results["steps"]:
                raise ValueError(f"{part}: topk {r['topk']} / steps {r['steps']} differ from the first part's")
            results["seeds"].update(r["seeds"])
    results["summary"] = summarise(results["seeds"], results["topk"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/dsa_parity")
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps on a few files: CPU, minutes")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (quick 256)")
    ap.add_argument("--topk", type=int, nargs="+", default=None,
                    help="stage 2 runs and DSA evaluations at each k; default 1/16 and 1/64 of the context")
    ap.add_argument("--steps-pretrain", type=int, default=None, help="default 500 (quick 4)")
    ap.add_argument("--steps-warmup", type=int, default=None, help="stage 1; default 300 (quick 3)")
    ap.add_argument("--steps-sparse", type=int, default=None,
                    help="stage 2, and the dense control (same steps and schedule); default 250 (quick 3)")
    ap.add_argument("--lr-pretrain", type=float, default=1e-3)
    ap.add_argument("--lr-warmup", type=float, default=1e-3)
    ap.add_argument("--lr-sparse", type=float, default=1e-4, help="stage 2 and the dense control")
    ap.add_argument("--warmup", type=int, default=None, help="learning-rate warm-up steps of every stage; default 20 (quick 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (quick 2)")
    ap.add_argument("--seeds", type=int, default=3, help="pipelines with seeds first-seed, first-seed + 1, ...")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--held-out-tokens", type=int, default=None,
                    help="held-out tokens evaluated, in disjoint windows; default 200000 (quick 2048); "
                         "an error if the held-out files have fewer")
    ap.add_argument("--vocab", type=int, default=None, help="default 4096 (quick 512)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="only merge these runs' --out directories (one seed or more each) into --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(out, args.merge)
    q = args.quick
    defaults = dict(seq_len=(2048, 256), steps_pretrain=(500, 4), steps_warmup=(300, 3), steps_sparse=(250, 3),
                    warmup=(20, 1), batch_size=(8, 2), held_out_tokens=(200_000, 2048), vocab=(4096, 512))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    for name in ("steps_pretrain", "steps_warmup", "steps_sparse", "seeds", "held_out_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    topks = args.topk or [args.seq_len // 16, args.seq_len // 64]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    train_files, held_files = stdlib_split()
    if q:  # a few files: the pipeline, not the science
        train_files, held_files = train_files[::40], held_files[::4]
    tok = train_tokenizer(train_files[::3], args.vocab, out / "tokenizer")
    read = lambda fs: [f.read_text(encoding="utf-8", errors="replace") for f in fs]  # noqa: E731
    train_ids = PackedData.from_documents(read(train_files), tok, args.seq_len, seed=0).ids
    held_ids = PackedData.from_documents(read(held_files), tok, args.seq_len, seed=1).ids
    held = Windows.disjoint(held_ids, args.seq_len, args.held_out_tokens)
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "quick": q,
               "seq_len": args.seq_len, "topk": topks,
               "steps": {"pretrain": args.steps_pretrain, "dsa-warmup": args.steps_warmup,
                         "dsa-sparse": args.steps_sparse, "dense control": args.steps_sparse},
               "lr": {"pretrain": args.lr_pretrain, "dsa-warmup": args.lr_warmup, "dsa-sparse": args.lr_sparse,
                      "dense control": args.lr_sparse},
               "train_tokens_available": len(train_ids), "held_out_tokens_available": len(held_ids),
               "held_out_windows": len(held), "held_out_tokens": len(held) * args.seq_len, "seeds": {}}
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=1))  # noqa: E731
    t0 = time.time()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        results["seeds"][str(seed)] = run_seed(args, seed, tok, train_ids, held, topks, out, dev, save)
        results["summary"] = summarise(results["seeds"], topks)
        save()
    results["wall_s"] = round(time.time() - t0, 1)
    save()
    first = results["seeds"][str(args.first_seed)]
    plot(first["evals"], first["history"], out)
    print(json.dumps(results["summary"], indent=1))
    return results


if __name__ == "__main__":
    main()
