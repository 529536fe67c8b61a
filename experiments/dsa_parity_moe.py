"""DSA parity on a small V3.2-architecture MoE of ours: V3.1-Terminus in miniature.

1. pretrain with dense attention on Python standard-library sources (the train split);
2. held-out perplexity (disjoint stdlib files): dense vs DSA with no training, at two top-k;
3. stage 1 (dense warm-up: indexer only, KL to the main attention);
4. stage 2 (sparse training: top-k on, everything trains, indexer on detached inputs);
5. a control: the stage-1 model trained on densely for as many steps as stage 2 took, since
   stage 2 is also more training (the dense perplexity it should be compared with);
6. after each stage: held-out perplexity and the recall of the dense attention mass inside the
   selected set, per layer; the tokens each stage spent.

    python experiments/dsa_parity_moe.py --out runs/dsa_parity [--budget-s 480]

Writes results.json and plots into --out; docs/dsa-parity.md reports a GPU run.
"""

import argparse
import copy
import json
import sysconfig
import time
import zlib
from pathlib import Path

import torch

from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.tokenizer import train_tokenizer
from dsv32.train import TrainConfig, Trainer
from dsv32.train.data import PackedData


def stdlib_split():
    """Standard-library .py files, split by a hash of their path: 1 in 10 is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    held = [f for f in files if zlib.crc32(str(f.relative_to(root)).encode()) % 10 == 0]
    train = [f for f in files if f not in set(held)]
    return train, held


def model_config(vocab, tok):
    return preset("small").replace(
        vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, hidden_size=512,
        intermediate_size=1536, moe_intermediate_size=384, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
        index_n_heads=8, index_head_dim=64, max_position_embeddings=8192)


@torch.no_grad()
def evaluate(model, data: PackedData, topks, n_windows=16, batch=4):
    """Held-out perplexity with dense attention and with DSA at each k, plus per-layer recall of
    the dense attention mass inside each k's selected set."""
    model.eval()
    dev = model.embed_tokens.weight.device
    nll = {"dense": 0.0, **{f"dsa_k{k}": 0.0 for k in topks}}
    recall = {k: torch.zeros(model.cfg.num_hidden_layers) for k in topks}
    n_tok = 0
    saved_k = model.cfg.index_topk
    for i in range(0, n_windows, batch):
        x, y = (t.to(dev) for t in data.batch(10_000 + i, batch))
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
                    recall[k][layer] += p.gather(-1, idx).sum(-1).mean().item() * batch
            model.cfg.index_topk = saved_k
        n_tok += y.numel()
    model.train()
    res = {f"ppl_{name}": round(float(torch.exp(torch.tensor(v / n_tok))), 3) for name, v in nll.items()}
    res.update({f"recall_k{k}": [round(v / n_windows, 4) for v in recall[k].tolist()] for k in topks})
    return res


def run_stage(model, data, stage, out, budget_s, **kw):
    """Train until the step budget or the time budget runs out (whichever first)."""
    cfg = TrainConfig(stage=stage, out=str(out / stage), checkpoint_every=10_000, **kw)
    tr = Trainer(cfg, model, data)
    t0, hist = time.time(), []
    while tr.step < cfg.steps and time.time() - t0 < budget_s:
        m = tr.train_step()
        hist.append(m)
        if tr.step % 20 == 0:
            print(stage, {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}, flush=True)
    tokens = tr.step * cfg.batch_size * cfg.seq_len
    return hist, tokens, time.time() - t0


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = results["evals"]
    names = list(evals)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in [k for k in evals[names[0]] if k.startswith("ppl_")]:
        axes[0].plot(names, [evals[n][key] for n in names], "o-", label=key[4:])
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
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dsa_parity.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for stage, hist in results["history"].items():
        key = "indexer_kl" if stage == "dsa-warmup" else "lm"
        start = offset if stage != "dense control" else offset - len(results["history"]["dsa-sparse"])
        ax.plot([start + h["step"] for h in hist], [h[key] for h in hist], label=f"{stage} {key}")
        offset = start + len(hist)
    ax.set_xlabel("step (stages back to back)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/dsa_parity")
    ap.add_argument("--budget-s", type=float, default=480, help="wall-clock budget for all training")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--topk", type=int, nargs=2, default=[128, 256], help="k = 1/16 and 1/8 of the context")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    train_files, held_files = stdlib_split()
    tok = train_tokenizer(train_files[::3], args.vocab, out / "tokenizer")
    read = lambda fs: [f.read_text(encoding="utf-8", errors="replace") for f in fs]  # noqa: E731
    train = PackedData.from_documents(read(train_files), tok, args.seq_len, seed=0)
    held = PackedData.from_documents(read(held_files), tok, args.seq_len, seed=1)
    k_main, k_other = args.topk
    torch.manual_seed(0)
    model = Transformer(model_config(tok.vocab_size, tok).replace(index_topk=k_main)).to(dev)
    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "seq_len": args.seq_len,
               "topk": args.topk, "train_tokens_available": len(train.ids), "held_out_tokens": len(held.ids),
               "params": sum(p.numel() for p in model.parameters()), "evals": {}, "tokens": {}, "seconds": {},
               "history": {}}
    common = dict(seq_len=args.seq_len, batch_size=8, device=dev, warmup=20, index_topk=k_main)
    plan = [("pretrain", 0.6, dict(steps=100_000, lr=1e-3, attention="dense")),
            ("dsa-warmup", 0.15, dict(steps=100_000, lr=1e-3)),
            ("dsa-sparse", 0.25, dict(steps=100_000, lr=1e-4))]
    for stage, share, kw in plan:
        if stage == "dsa-sparse":
            control = copy.deepcopy(model)
        hist, tokens, secs = run_stage(model, train, stage, out, args.budget_s * share, **common, **kw)
        results["history"][stage] = hist
        results["tokens"][stage], results["seconds"][stage] = tokens, round(secs, 1)
        results["evals"]["after " + stage] = evaluate(model, held, args.topk)
        print(stage, results["evals"]["after " + stage], flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    # the control: as many dense steps as stage 2 took, same learning rate
    hist, tokens, secs = run_stage(control, train, "pretrain", out, 1e9, **common,
                                   steps=len(results["history"]["dsa-sparse"]), lr=1e-4, attention="dense", mtp_weight=0.0)
    results["history"]["dense control"] = hist
    results["tokens"]["dense control"], results["seconds"]["dense control"] = tokens, round(secs, 1)
    results["evals"]["dense control"] = evaluate(control, held, args.topk)
    print("dense control", results["evals"]["dense control"], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    print(json.dumps({k: v for k, v in results.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
