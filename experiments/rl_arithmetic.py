"""GRPO with DeepSeek-V3.2's stabilisers on multi-step arithmetic, with a small MoE of ours.

1. a byte-level BPE trained on the task format, and a small V3.2-architecture MoE (MLA, DSA,
   DeepSeekMoE) built from scratch;
2. SFT warm start on reference solutions (dsv32.train.Trainer), so that rewards start non-zero;
3. main run: mixed RL in one stage: arithmetic (beta 0) and arithmetic with a calculator tool
   (multi-turn, thinking kept across the call; beta 0.01), all stabilisers on; greedy accuracy
   every few steps on fixed held-out prompts, which every SFT and RL prompt excludes by hash, and
   on an out-of-distribution split (longer expressions, two-digit operands); results.json:
   splits counts the held-out prompts the training streams drew (0);
4. the train-rollout mismatch with a bfloat16 sampler, replayed in fp32 and in bf16 autocast;
5. ablation under deliberately off-policy conditions (4 optimizer steps per rollout batch, a
   bfloat16 sampler with perturbed weights, a larger learning rate, beta > 0): all stabilisers on,
   then each one off, from the same warm-started model, with the same number of steps each;
6. optional: the same RL on SmolLM2-135M converted to DSA (`dsv32 convert smollm2 --out DIR`).

    python experiments/rl_arithmetic.py --out runs/rl_arithmetic            # one H100, <= 8 min
    python experiments/rl_arithmetic.py --out runs/rl_quick --quick         # CPU, about a minute

Writes results.json, each run's metrics.jsonl + metrics.png, ablation.png and the held-out
accuracy curves (main_eval.png, ablation_eval.png) into --out;
docs/rl.md reports a GPU run.
"""

import argparse
import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dsv32.checkpoint import load_model
from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.loader import save
from dsv32.model import Transformer
from dsv32.rl.agreement import bitwise_agreement, kept_sizes
from dsv32.rl.rewards import RewardConfig, reward
from dsv32.rl.rollout import rollout
from dsv32.rl.tasks import OOD_DOMAINS, Domain, Task, TaskMix, held_out_split, prompt_hash
from dsv32.rl.trainer import (
    STABILISERS,
    RLConfig,
    RLTrainer,
    build,
    plot_rl,
    warm_start,
)
from dsv32.tokenizer import Tokenizer

EVAL_SAMPLES = 4  # sampled draws per held-out prompt
ABLATIONS = [("all-on", {})] + [(f"no-{s.replace('_', '-')}", {s: False}) for s in STABILISERS]


def moe_config(tok, quick: bool):
    if quick:
        return preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    # ~12M total parameters, 16 experts of which 2 active per token
    return preset("small").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, hidden_size=256,
        intermediate_size=768, moe_intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
        index_n_heads=4, index_head_dim=32, index_topk=256, max_position_embeddings=1024,
        torch_dtype="float32")


def clean_splits(eval_mixes: dict[str, TaskMix], n: int, n_ood: int) -> dict[str, list[Task]]:
    """{name: n held-out prompts of that mix} and {"ood": n_ood prompts of the out-of-distribution
    domains (longer expressions, two-digit operands)}, the OOD ones sharing no hash with the others.
    Every training mix then excludes all their hashes (TaskMix.excluding)."""
    out, hashes = {}, set()
    for name, mix in eval_mixes.items():
        out[name] = held_out_split(mix, n)
        hashes |= {prompt_hash(t) for t in out[name]}
    out["ood"] = held_out_split(TaskMix([Domain(d) for d in OOD_DOMAINS]), n_ood, seed=54321, exclude=hashes)
    return out


def hashes_of(tasks) -> set[str]:
    return {prompt_hash(t) for t in tasks}


def split_report(splits: dict[str, list[Task]], training: list[TaskMix], sft_checked: bool = True) -> dict:
    """How many held-out and OOD prompts (by hash) the training mixes drew (SFT and RL prompts):
    0 by construction, counted here from what the mixes actually drew."""
    seen = set().union(*(m.seen for m in training))
    held = set().union(*(hashes_of(v) for k, v in splits.items() if k != "ood"))
    ood = hashes_of(splits["ood"])
    return {"held_out_prompts": len(held), "ood_prompts": len(ood), "training_prompts_drawn": len(seen),
            "held_out_in_training": len(held & seen), "ood_in_training": len(ood & seen),
            "held_out_in_ood": len(held & ood), "sft_prompts_checked": sft_checked}


@torch.no_grad()
def held_out(model, tok, tasks: list[Task], cfg: RLConfig, samples: int) -> dict:
    """On fixed held-out prompts (excluded by hash from every training prompt), per domain (the
    OOD domains among them): the greedy accuracy, and the policy's expected reward as RL samples
    it (cfg's temperature and top-p, `samples` draws per prompt, a fixed seed). The training
    reward changes prompts every step; this curve does not."""
    rows = len(tasks) * (1 + samples)
    eng = Engine(model, EngineConfig(max_num_seqs=rows, num_blocks=rows * 8 + 1, max_model_len=512,
                                     max_num_batched_tokens=8192))
    greedy = rollout(eng, tok, tasks, SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens),
                     max_turns=cfg.max_turns)
    cuda = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else []
    with torch.random.fork_rng(devices=cuda):  # the same draws at every evaluation, training's RNG untouched
        torch.manual_seed(0)
        sampled = rollout(eng, tok, [t for t in tasks for _ in range(samples)],
                          SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens),
                          max_turns=cfg.max_turns)
    model.train()
    out = {}
    for name, trajs in (("greedy", greedy), ("sampled", sampled)):
        for dom in sorted({t.domain for t in tasks}):
            hits = [reward(t.task, t.answer, t.text, t.n_sampled, 10**6, RewardConfig())["outcome"]
                    for t in trajs if t.task.domain == dom]
            out[f"{name}/{dom}"] = sum(hits) / len(hits)
    return out


def summarise(history: list[dict], k: int = 5) -> dict:
    def mean(key, rows):
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None
    return {"steps": len(history), "reward_first": mean("reward", history[:k]), "reward_last": mean("reward", history[-k:]),
            "accuracy_first": mean("accuracy", history[:k]), "accuracy_last": mean("accuracy", history[-k:]),
            "kl_last": mean("kl", history[-k:]), "kl_max": max((r["kl"] for r in history), default=None),
            "mismatch_mean": mean("mismatch", history), "masked_frac_mean": mean("masked_frac", history),
            "clip_frac_mean": mean("clip_frac", history), "skipped_steps": sum(r.get("skipped", 0) for r in history),
            "step_s": mean("rollout_s", history) + mean("train_s", history) if history else None}


def rl_run(name, model, tok, mix, cfg: RLConfig, out: Path, eval_tasks: list[Task], eval_every: int, results: dict,
           deadline: float = float("inf"), keep_model: bool = False) -> list[dict]:
    """RL steps with a held-out evaluation (greedy accuracy and sampled reward) every `eval_every`
    steps and after the last; past `deadline` (time.time()) no new step starts. keep_model: the trained
    policy and tokenizer to OUT/name/model (a dsv32.load directory, for `dsv32 eval`)."""
    from tqdm import tqdm

    t0 = time.time()
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    tr = RLTrainer(replace(cfg, out=str(run_dir)), copy.deepcopy(model), tok, mix)
    evals = [(0, held_out(tr.policy, tok, eval_tasks, cfg, EVAL_SAMPLES))]
    history = []
    with (run_dir / "metrics.jsonl").open("w") as f:
        for _ in tqdm(range(cfg.steps), desc=name, dynamic_ncols=True):
            m = tr.train_step()
            last = tr.step == cfg.steps or time.time() > deadline
            if tr.step % eval_every == 0 or last:
                evals.append((tr.step, held_out(tr.policy, tok, eval_tasks, cfg, EVAL_SAMPLES)))
                m.update({f"eval/{k}": v for k, v in evals[-1][1].items()})
            history.append(m)
            f.write(json.dumps(m) + "\n")
            f.flush()  # a run cut short keeps every finished step
            if last:
                break
    plot_rl(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    if keep_model:
        save(tr.policy, run_dir / "model", tokenizer=tok)
    r = results["runs"][name] = {**summarise(history), "held_out": evals, "wall_s": time.time() - t0,
                                 "config": {k: v for k, v in asdict(cfg).items() if k != "out"}}
    print(f"[{name}] held-out {evals[0][1]} -> {evals[-1][1]}; training reward "
          f"{r['reward_first']:.3f} -> {r['reward_last']:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return history


def plot_eval(results: dict, names: list[str], png: Path) -> None:
    """Held-out sampled reward and greedy accuracy over RL steps, one line per run and domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("sampled", "greedy")):
        for name in names:
            evals = results["runs"][name]["held_out"]
            for key in (k for k in evals[0][1] if k.startswith(kind)):
                ax.plot([s for s, _ in evals], [e[key] for _, e in evals], marker="o",
                        label=f"{name} {key.split('/', 1)[1]}")
        ax.set_xlabel("RL step")
        ax.set_ylabel(f"held-out {'reward, sampled as in RL' if kind == 'sampled' else 'greedy accuracy'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


@torch.no_grad()
def bf16_mismatch(model, tok, mix, base: RLConfig) -> dict:
    """The train-rollout mismatch with a bfloat16 sampler (no noise), the trainer in fp32 or in
    bf16 autocast: mean and max |log pi_theta - log pi_old| over one rollout batch's sampled
    tokens, with each replay stabiliser on and off."""
    from dsv32.rl.rollout import pack, replay_logprobs

    out = {}
    for trainer_dtype in ("float32", "bfloat16"):
        cfg = replace(base, engine_dtype="bfloat16", dtype=trainer_dtype, sampler_noise=0.0, steps=1)
        tr = RLTrainer(cfg, copy.deepcopy(model), tok, mix)
        trajs, _, _ = tr.collect()
        batch = pack(trajs, tok.eos_id, tr.device)
        for routing in (True, False):
            for mask in (True, False):
                lp = replay_logprobs(tr.policy, batch, cfg.temperature, routing, mask, tr.autocast)
                out[f"trainer_{trainer_dtype}/routing_{routing}/mask_{mask}"] = replay_agreement(lp, batch)
    # the batch-invariant mode: engine and replay with its arithmetic, the replay on bf16 weights as
    # the engine's (bit-equality needs the same dtype on both sides)
    cfg = replace(base, engine_dtype="bfloat16", dtype="bfloat16", sampler_noise=0.0, steps=1, batch_invariant=True)
    tr = RLTrainer(cfg, copy.deepcopy(model), tok, mix)
    trajs, _, _ = tr.collect()
    batch = pack(trajs, tok.eos_id, tr.device)
    t0 = time.time()
    lp = replay_logprobs(copy.deepcopy(tr.policy).to(torch.bfloat16), batch, cfg.temperature, batch_invariant=True)
    out["batch_invariant/trainer_bfloat16_weights"] = {**replay_agreement(lp, batch), "replay_s": round(time.time() - t0, 1)}
    return out


def replay_agreement(lp: torch.Tensor, batch) -> dict:
    """lp: [B, S] replayed log-probs of a packed rollout batch -> mean and max |lp - logp_old| over
    its sampled tokens, and the bit-equal shares: `bitwise_equal_multi` (the headline) among tokens
    whose kept set held more than one candidate, `bitwise_equal_all` over every sampled token (a
    lone kept token has log-prob 0 on both sides whatever the arithmetic)."""
    d = (lp - batch.logp_old)[batch.action].abs()
    agree = bitwise_agreement(lp[batch.action], batch.logp_old[batch.action], kept_sizes(batch.keep))
    return {"bitwise_equal_multi": agree["bit_equal_share_multi"], "multi_candidate_tokens": agree["multi_candidate_tokens"],
            "sampled_tokens": agree["sampled_tokens"], "bitwise_equal_all": agree["bit_equal_share"],
            "mean_multi": agree["mean_abs_diff_multi"], "mean": float(d.mean()), "max": float(d.max())}


def moe_stages(args, base: RLConfig, out: Path, results: dict, device: str, t_start: float) -> None:
    """The small MoE of ours: warm start, mixed-domain main run, bf16 mismatch, ablation."""
    q = args.quick
    # held-out prompts of the main mix and of the ablation's, and an OOD split: every training
    # mix (SFT and RL) excludes their hashes
    eval_n = 8 if q else 128
    abl_domains = [Domain("arithmetic", beta=0.02)]
    splits = clean_splits({"main": TaskMix(base.domain_specs), "ablation": TaskMix(abl_domains)}, eval_n,
                          4 if q else 64)
    exclude = set().union(*map(hashes_of, splits.values()))
    # 1-2: tokenizer, model, warm start (or a warm-started model from an earlier run)
    if args.from_sft:
        model, tok = load_model(args.from_sft, dtype=torch.float32), Tokenizer.from_file(args.from_sft)
        mix = TaskMix(base.domain_specs, exclude=exclude)
        results["sft"] = {"from": Path(args.from_sft).name}
    else:
        _, tok, mix, _ = build(base)
        mix = mix.excluding(exclude)
        torch.manual_seed(0)
        model = Transformer(moe_config(tok, q))
        t0 = time.time()
        sft = warm_start(model, tok, mix, base)
        results["sft"] = {"steps": base.sft_steps, "lm_last": sft.get("lm"), "wall_s": time.time() - t0}
        save(model, out / "sft_model", tokenizer=tok)
    results["model"] = {"params": sum(p.numel() for p in model.parameters()), **model.cfg.to_hf()}
    results["sft"]["held_out"] = held_out(model.to(device), tok, splits["main"] + splits["ood"], base, EVAL_SAMPLES)
    print(f"[sft] {json.dumps(results['sft'])}", flush=True)

    # 3: main run, mixed domains, all stabilisers on
    steps = args.steps or (4 if q else 40)
    eval_every = args.eval_every or (2 if q else 10)
    if "main" in args.stages:
        torch.manual_seed(args.seed)
        rl_run(args.run_name, model, tok, mix, replace(base, steps=steps, seed=args.seed), out,
               splits["main"] + splits["ood"], eval_every, results, args.deadline, keep_model=True)
        plot_eval(results, [args.run_name], out / "main_eval.png")
    if "mismatch" in args.stages:
        results["bf16_mismatch"] = bf16_mismatch(model, tok, mix, base)
        print(f"[bf16 mismatch] {json.dumps(results['bf16_mismatch'])}", flush=True)
    abl_mix = TaskMix(abl_domains, exclude=exclude)
    results["splits"] = split_report(splits, [mix, abl_mix], sft_checked=not args.from_sft)
    if "ablation" not in args.stages:
        return

    # 4: ablation under off-policy conditions, arithmetic only with a KL term
    abl = replace(base, domains=["arithmetic:0.02"], max_turns=1, minibatches=args.ablation_minibatches,
                  engine_dtype="bfloat16", sampler_noise=args.ablation_noise or (0.01 if q else 0.005), lr=base.lr * 3)
    variants = [(n, sw) for n, sw in ABLATIONS if not args.variants or n in args.variants]
    step_s = (results["runs"][args.run_name]["wall_s"] / max(1, steps)) if args.run_name in results["runs"] else 10.0
    left = args.budget_s - (time.time() - t_start)
    abl_steps = args.ablation_steps or (3 if q else max(5, min(60, int(left / (len(variants) * step_s * 1.1)))))
    results["ablation"] = {"max_steps": abl_steps, "conditions": {
        "minibatches": abl.minibatches, "engine_dtype": "bfloat16", "sampler_noise": abl.sampler_noise, "lr": abl.lr,
        "beta": 0.02, "mask_delta": abl.mask_delta}}
    for name, switch in variants:
        rl_run(f"ablation/{name}", model, tok, abl_mix, replace(abl, steps=abl_steps, **switch), out,
               splits["ablation"] + splits["ood"], args.eval_every or max(1, abl_steps // 3), results, args.deadline)
    results["splits"] = split_report(splits, [mix, abl_mix], sft_checked=not args.from_sft)
    plot_ablation(results, out)


def plot_ablation(results: dict, out: Path) -> None:
    names = [n for n, _ in ABLATIONS if f"ablation/{n}" in results["runs"]]
    plot_rl([out / "ablation" / n / "metrics.jsonl" for n in names], out / "ablation.png", labels=names)
    plot_eval(results, [f"ablation/{n}" for n in names], out / "ablation_eval.png")


def merge(out: Path, parts: list[str]) -> None:
    """Runs made in parallel (one process per run, each with its own --out) -> one results.json,
    the runs' directories and the plots in `out`."""
    import shutil

    results = {"runs": {}}
    for part in map(Path, parts):
        if not (part / "results.json").exists():
            print(f"skipped {part}: no results.json (cut off before its run ended)")
            continue
        r = json.loads((part / "results.json").read_text())
        results.update({k: v for k, v in r.items() if k != "runs"})
        results["runs"].update(r["runs"])
        for name in r["runs"]:
            shutil.copytree(part / name, out / name, dirs_exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if main := [n for n in results["runs"] if not n.startswith("ablation/")]:
        plot_eval(results, main, out / "main_eval.png")
    if any(n.startswith("ablation/") for n in results["runs"]):
        plot_ablation(results, out)


def smollm2_stage(args, base: RLConfig, out: Path, results: dict, device: str) -> None:
    """SmolLM2-135M-Instruct converted to DSA (plain prompt format: its vocabulary has no V3.2 chat
    tokens, so arithmetic without tools), a short SFT on the reference solutions, then RL."""
    q = args.quick
    steps, eval_n, eval_every = args.steps or (4 if q else 40), 8 if q else 128, args.eval_every or (2 if q else 10)
    sm_cfg = replace(base, model=args.smollm2, domains=["arithmetic:0"], max_turns=1, lr=args.smollm2_lr,
                     sft_steps=0 if q else args.smollm2_sft_steps, sft_lr=5e-5, sft_batch_size=32,
                     prompts_per_step=args.prompts or 8, out=str(out / "smollm2"))
    sm_model, sm_tok, sm_mix, _ = build(sm_cfg)
    splits = clean_splits({"smollm2": TaskMix(sm_cfg.domain_specs)}, eval_n, 4 if q else 64)
    sm_mix = sm_mix.excluding(set().union(*map(hashes_of, splits.values())))
    if sm_cfg.sft_steps:
        warm_start(sm_model, sm_tok, sm_mix, sm_cfg)
    name = f"smollm2-lr{args.smollm2_lr:g}"
    results["splits_smollm2"] = split_report(splits, [sm_mix])
    rl_run(name, sm_model.to(device), sm_tok, sm_mix, replace(sm_cfg, steps=steps), out,
           splits["smollm2"] + splits["ood"], eval_every, results, args.deadline)
    results["splits_smollm2"] = split_report(splits, [sm_mix])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/rl_arithmetic")
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps: CPU in about a minute")
    ap.add_argument("--budget-s", type=float, default=450, help="wall clock for everything (ablation steps adapt)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="wall clock after which every run takes its last step, evaluates and writes its results")
    ap.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every this many RL steps")
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="main run RL steps")
    ap.add_argument("--ablation-steps", type=int, default=None, help="default: what the remaining budget allows")
    ap.add_argument("--smollm2", default=None, help="a converted SmolLM2 directory (`dsv32 convert smollm2`), "
                    "for the smollm2 stage")
    ap.add_argument("--smollm2-lr", type=float, default=2e-6)
    ap.add_argument("--smollm2-sft-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=None, help="RL learning rate (default 5e-5; quick 3e-4)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per RL step (default 16; quick 4)")
    ap.add_argument("--stages", nargs="+", default=["main", "mismatch", "ablation"],
                    choices=["main", "mismatch", "ablation", "smollm2"],
                    help="main, mismatch, ablation: the small MoE of ours; smollm2: SmolLM2-135M (needs --smollm2)")
    ap.add_argument("--from-sft", default=None,
                    help="a warm-started model directory (written by an earlier run as OUT/sft_model): skip the SFT")
    ap.add_argument("--ablation-minibatches", type=int, default=4, help="optimizer steps per rollout batch")
    ap.add_argument("--ablation-noise", type=float, default=None, help="relative noise on the bf16 sampler's "
                    "weights at each sync (default 0.005)")
    ap.add_argument("--mask-delta", type=float, default=0.1, help="off-policy masking threshold delta")
    ap.add_argument("--variants", nargs="+", default=None, choices=[n for n, _ in ABLATIONS],
                    help="ablation variants to run (default: all); one per process runs them in parallel")
    ap.add_argument("--run-name", default="main", help="name of the main run (e.g. main-seed1)")
    ap.add_argument("--seed", type=int, default=0, help="RL seed: prompts drawn and sampling")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="only merge these runs' --out directories into --out (results.json, plots)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    if args.merge:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return merge(Path(args.out), args.merge)
    if "smollm2" in args.stages and not args.smollm2:
        ap.error("the smollm2 stage needs --smollm2 DIR (a converted SmolLM2: dsv32 convert smollm2 --out DIR)")
    t_start = time.time()
    args.deadline = t_start + (args.deadline_s or float("inf"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = args.quick
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)  # the per-expert loop's small ops are slower threaded
    base = RLConfig(out=str(out), device=device, domains=["arithmetic:0:3", "arithmetic-tool:0.01:1"],
                    prompts_per_step=args.prompts or (4 if q else 16), group_size=4 if q else 8, minibatches=2,
                    max_new_tokens=24 if q else 64, max_turns=2, max_len=512, temperature=1.0, top_p=0.95,
                    lr=args.lr or (3e-4 if q else 5e-5), clip_eps=0.2, mask_delta=args.mask_delta, sft_steps=args.sft_steps or (10 if q else 800),
                    sft_batch_size=8 if q else 64, sft_lr=3e-3 if q else 2e-3, tokenizer_vocab=1024)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "quick": q, "runs": {}}

    if set(args.stages) - {"smollm2"}:
        moe_stages(args, base, out, results, device, t_start)
    if "smollm2" in args.stages:
        smollm2_stage(args, base, out, results, device)

    results["wall_s"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"done in {results['wall_s']:.0f}s: {out / 'results.json'}")


if __name__ == "__main__":
    main()
