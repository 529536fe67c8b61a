"""GRPO on synthesized trip-planning environments, the shape of the paper's Figure 5 at small
scale (spec §5): RL on general-agent environments that a program synthesized, then pass@1 on
environments no training saw, at the trained difficulty levels and at harder ones.

1. the environments (dsv32.synth.trip, the programmatic family): an SFT pool and an RL pool at the
   trained levels (--levels), held-out environments at the same levels, and held-out harder levels
   (--harder-levels), each from seeds of its own (new worlds, new names, new rules drawn);
2. the scripted expert (dsv32.synth.trip_expert.TripExpert) plays the SFT pool through the agent
   loop with the environment's tools; its accepted episodes are the SFT data, in the V3.2 chat
   format with tool calls, labels on the assistant turns only; its success on the held-out
   environments is the ceiling;
3. a byte-level BPE trained on the expert's conversations and a small V3.2 MoE of ours
   (experiments.agent_context.model_config), or (--base smollm2) SmolLM2-135M-Instruct given
   V3.2's chat tokens; SFT on the expert's episodes;
4. pass@1 of the SFT model on the held-out environments, sampled at temperature 1 through the
   same rollout and environment runner as GRPO;
5. GRPO with the V3.2 stabilisers (dsv32.rl.RLTrainer), the environment runner
   (dsv32.synth.rl_env.EnvironmentRunner) as the environment, rewards from each environment's
   verifier, on the RL pool;
6. pass@1 again, on the same held-out environments.

To fit the window, the info tools' results are rendered as compact tables (`trip_expert.compact`,
about half the characters of the JSON rows) in the expert's runs, in GRPO and in the evaluation
alike; every tool and every row is still there.

    python -m experiments.trip_rl --out runs/trip-prep --prepare                  # CPU: envs, tokenizer, SFT data
    python -m experiments.trip_rl --out runs/trip --data runs/trip-prep/data      # one H100, about 9 min
    python -m experiments.trip_rl --out runs/trip_quick --quick                   # CPU smoke run, < 2 min

Writes results.json (after every stage, so a cut run keeps what it measured), episodes.jsonl (the
evaluated trajectories' scores), sft/ and rl/ metrics, and trip_rl.png into --out.
"""

import argparse
import json
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from dsv32.agent.loop import AgentConfig, AgentLoop
from dsv32.chat import encode_messages
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.loader import save
from dsv32.rl.rollout import rollout
from dsv32.rl.tasks import Domain, Task, TaskMix
from dsv32.rl.trainer import RLConfig, RLTrainer, task_examples, turns_over_budget
from dsv32.synth.environment import append_index, load_environment, read_index
from dsv32.synth.rl_env import EnvironmentRunner, environment_tasks
from dsv32.synth.runner import LocalTools, local_verify
from dsv32.synth.session import agent_tools
from dsv32.synth.trip import make_trip
from dsv32.synth.trip_expert import TripExpert, compact
from dsv32.tokenizer import Tokenizer, train_tokenizer
from dsv32.train.data import SFTData
from experiments.agent_context import (
    Recorder,
    add_base_arg,
    add_sft_label_args,
    base_model,
    cuda_memory,
    load_examples,
    rl,
    save_examples,
    segments,
    sft,
    sft_rows,
    smollm2_v32,
)

DOMAIN = "trip-planning"
EVAL_SPLITS = ("heldout", "harder")
SEED0 = {"sft": 0, "train": 100_000, "heldout": 200_000, "harder": 300_000}   # disjoint worlds per split


class CompactTools:
    """An environment's tools with the info tools' JSON rows rendered as tables (`compact`)."""

    def __init__(self, tools):
        self.tools = tools

    def call(self, name: str, arguments: dict) -> str:
        return compact(self.tools.call(name, arguments))

    def close(self) -> None:
        self.tools.close()


class CompactRunner(EnvironmentRunner):
    """The environment runner with `CompactTools`: what GRPO and the evaluation run."""

    def load(self, directory: str):
        loaded = super().load(directory)
        if not isinstance(loaded.tools, CompactTools):
            loaded.tools = CompactTools(loaded.tools)
        return loaded


def make_split(root: Path, levels: list[int], per_level: int, seed0: int, desc: str) -> list[Path]:
    """`per_level` environments at each level saved under `root` with an index; their directories."""
    out = []
    for level in levels:
        for k in tqdm(range(per_level), desc=f"{desc} level {level}", leave=False):
            env = make_trip(seed0 + k, level, root / ".work")
            env.save(root / env.name)
            append_index(root, env)
            out.append(root / env.name)
    shutil.rmtree(root / ".work", ignore_errors=True)
    return out


def expert_episode(directory: Path, expert: TripExpert) -> tuple[dict, list]:
    """(a row: level, score, the verifier's reasons, turns; the SFT segments) of the expert in one
    environment, its tools rendered compact as in GRPO."""
    env = load_environment(directory)
    tools = CompactTools(LocalTools(env.tools_code, env.db_path))
    try:
        rec = Recorder(expert)
        parts, submit = agent_tools(env, tools.call)
        ep = AgentLoop(rec, parts, SamplingParams(max_tokens=4096), AgentConfig(max_steps=60)).run(env.task)
    finally:
        tools.close()
    score, reasons = (local_verify(env.verifier_code, submit.submitted, env.params, env.db_path)
                      if submit.submitted is not None else (0.0, ["nothing submitted"]))
    row = {"env": env.name, "level": env.difficulty, "score": score, "reasons": reasons[:3], "turns": len(ep.steps),
           "end": ep.end}
    return row, segments(rec.calls)


def sft_examples(tok, tools: list[dict], segs) -> list[tuple[list[int], list[int]]]:
    """The expert's segments as rollouts lay them out: system (tools) + task, then its turns; the
    closing turn after submit_result is dropped (an episode ends at the submission)."""
    system = {"role": "system", "content": "", "tools": tools}
    tasks = []
    for start, turns in segs:
        if turns and turns[-1]["role"] == "assistant" and not turns[-1].get("tool_calls"):
            turns = turns[:-1]
        tasks.append(Task(DOMAIN, [system] + start, thinking_mode="thinking", solution=turns))
    return task_examples(tok, tasks)


def split_tasks(root: Path, per_level: int) -> list[Task]:
    """The RL tasks of the first `per_level` environments of each level in the split at `root`."""
    taken: dict[int, int] = {}
    out = []
    for row, task in zip(read_index(root), environment_tasks(root), strict=True):
        taken[row["difficulty"]] = taken.get(row["difficulty"], 0) + 1
        if taken[row["difficulty"]] <= per_level:
            out.append(task)
    return out


def table(rows: list[dict], key: str = "score") -> dict:
    """{level: {n, pass@1, stderr, submitted}} of episode rows."""
    out = {}
    for level in sorted({r["level"] for r in rows}):
        mine = [r for r in rows if r["level"] == level]
        p = sum(r[key] for r in mine) / len(mine)
        out[level] = {"n": len(mine), "pass@1": round(p, 4), "stderr": round((p * (1 - p) / len(mine)) ** 0.5, 4),
                      "submitted": round(sum(r.get("submitted", True) for r in mine) / len(mine), 4)}
    return out


def evaluate(model, tok, tasks: list[Task], samples: int, max_new: int, max_turns: int, window: int,
             label: str) -> list[dict]:
    """pass@1 rows: `samples` trajectories per held-out task at temperature 1 (top-p 0.95), all
    batched in one engine, through the compact environment runner as in GRPO."""
    batch = [replace(t) for t in tasks for _ in range(samples)]
    seqs = min(len(batch), 256)
    engine = Engine(model, EngineConfig(max_num_seqs=seqs, max_model_len=window, num_blocks=seqs * -(-window // 64) + 8,
                                        max_num_batched_tokens=max(8192, 2 * window)))
    runner = CompactRunner()
    try:
        trajs = rollout(engine, tok, batch, SamplingParams(temperature=1.0, top_p=0.95, max_tokens=max_new),
                        max_turns=max_turns, env=runner)
        rows = []
        for t in trajs:
            verdict = runner.verdict(t.task)
            env = runner.load(t.task.environment).env
            rows.append({"stage": label, "env": env.name, "level": env.difficulty, "score": t.task.verdict or 0.0,
                         "submitted": verdict is not None, "reasons": verdict[1][:2] if verdict else [],
                         "turns": t.turns, "tokens": t.n_sampled, "finish": t.finish_reason})
    finally:
        runner.close()
        del engine
    return rows


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [("expert", "scripted expert"), ("sft", "SFT only"), ("grpo", "SFT + GRPO")]
    levels = sorted({int(lv) for arm, _ in arms for lv in results.get(arm, {})})
    if not levels:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(arms)
    for j, (arm, name) in enumerate(arms):
        t = {int(k): v for k, v in results.get(arm, {}).items()}
        xs = [i + (j - 1) * width for i, lv in enumerate(levels) if lv in t]
        bars = ax.bar(xs, [t[lv]["pass@1"] for lv in levels if lv in t], width,
                      yerr=[t[lv].get("stderr", 0) for lv in levels if lv in t], capsize=3, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    trained = set(results["args"]["levels"])
    ax.set_xticks(range(len(levels)), [f"level {lv}\n({'trained' if lv in trained else 'held-out level'})"
                                       for lv in levels])
    ax.set(ylabel="pass@1 on held-out environments", ylim=(0, 1.12),
           title="trip planning: before and after GRPO")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "trip_rl.png", dpi=110)
    plt.close(fig)


def prepare(args, data: Path, results: dict, done) -> tuple:
    """The CPU part: environments, the expert's runs, the tokenizer and the SFT token streams."""
    t0 = time.time()
    scratch = data / "sft_envs"   # the SFT pool's databases are not needed on the GPU: removed below
    sft_dirs = make_split(scratch, args.levels, args.sft_per_level, SEED0["sft"], "sft envs")
    make_split(data / "envs" / "train", args.levels, args.train_per_level, SEED0["train"], "train envs")
    make_split(data / "envs" / "heldout", args.levels, args.eval_per_level, SEED0["heldout"], "held-out envs")
    make_split(data / "envs" / "harder", args.harder_levels, args.eval_per_level, SEED0["harder"], "harder envs")
    done("environments", t0, sft=len(sft_dirs), train=len(args.levels) * args.train_per_level,
         heldout=len(args.levels) * args.eval_per_level, harder=len(args.harder_levels) * args.eval_per_level)

    t0 = time.time()
    expert = TripExpert(slip=args.slip)
    rows, segs = [], []
    for d in tqdm(sft_dirs, desc="expert on the sft pool"):
        row, s = expert_episode(d, expert)
        rows.append(row)
        if row["score"] == 1.0:   # only accepted episodes become SFT data
            segs += s
    tools = load_environment(sft_dirs[0]).tool_schemas()
    shutil.rmtree(scratch)
    corpus = data / "corpus.txt"
    sample = random.Random(args.seed).sample(segs, min(len(segs), args.tokenizer_episodes))
    corpus.write_text("\n".join(encode_messages([{"role": "system", "content": "", "tools": tools}] + start + turns,
                                                "thinking") for start, turns in sample), encoding="utf-8")
    if args.base == "smollm2":
        tok = smollm2_v32(args.window)[1]
        tok.tok.save(str(data / "tokenizer.json"))
    else:
        tok = train_tokenizer([corpus], args.vocab, data)
    corpus.unlink()
    examples = sft_examples(tok, tools, segs)
    longest_turn = turns_over_budget([Task(DOMAIN, [])] * len(examples), examples, 0).get(DOMAIN, 0)
    save_examples(examples, data / "sft.npz")
    done("sft data", t0, episodes=len(rows), accepted=len(segs), examples=len(examples), vocab=tok.vocab_size,
         tokens=sum(len(ids) for ids, _ in examples), longest_example=max(len(ids) for ids, _ in examples),
         longest_turn=longest_turn, expert_on_sft_pool=table(rows))

    t0 = time.time()
    ceiling = []
    for split in EVAL_SPLITS:
        for r in read_index(data / "envs" / split):
            row, _ = expert_episode(data / "envs" / split / r["path"], expert)
            ceiling.append({**row, "split": split})
    expert_table = table(ceiling)
    (data / "expert.json").write_text(json.dumps(expert_table, indent=1))
    (data / "expert_episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ceiling))
    done("expert", t0, pass_at_1={lv: t["pass@1"] for lv, t in expert_table.items()})
    return tok, examples, expert_table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a CPU smoke run: tiny model, few environments, few steps")
    p.add_argument("--expert-only", type=int, metavar="N", help="only the expert's success by level (1..--max-level) "
                   "on N fresh environments per level (CPU), to OUT/expert_by_level.json")
    p.add_argument("--max-level", type=int, default=6)
    p.add_argument("--prepare", action="store_true", help="stop after the CPU work (OUT/data), for a run with --data")
    p.add_argument("--data", help="a --prepare'd OUT/data directory: skip the CPU work")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2], help="the trained difficulty levels")
    p.add_argument("--harder-levels", type=int, nargs="+", default=[3, 4], help="held-out difficulty levels")
    p.add_argument("--sft-per-level", type=int, default=1200, help="SFT pool: environments per trained level")
    p.add_argument("--train-per-level", type=int, default=64, help="GRPO pool: environments per trained level")
    p.add_argument("--eval-per-level", type=int, default=32, help="held-out environments per level")
    p.add_argument("--eval-samples", type=int, default=1, help="trajectories per held-out environment")
    p.add_argument("--slip", type=float, default=0.0, help="the expert's slip rate (TripExpert.slip)")
    p.add_argument("--tokenizer-episodes", type=int, default=300)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--window", type=int, default=6144, help="context window (the harder levels run longer)")
    p.add_argument("--max-new", type=int, default=384, help="tokens per model turn (the expert's longest: ~300)")
    p.add_argument("--max-turns", type=int, default=14, help="model turns per episode in the evaluation")
    p.add_argument("--rl-max-turns", type=int, default=10, help="model turns per episode in GRPO")
    p.add_argument("--sft-steps", type=int, default=2000)
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-minutes", type=float, default=2.0, help="cap SFT's step count to fit this (0: no cap)")
    add_sft_label_args(p, "cities and prices")
    p.add_argument("--rl-minutes", type=float, default=3.0, help="stop GRPO after this")
    p.add_argument("--rl-steps", type=int, default=40)
    p.add_argument("--budget-minutes", type=float, default=8.7, help="the whole run: GRPO stops early enough for the "
                   "evaluation after it to finish within this (taken to last as long as the one before it)")
    p.add_argument("--rl-lr", type=float, default=5e-5)
    p.add_argument("--prompts", type=int, default=16, help="GRPO prompts per step (one minibatch each)")
    p.add_argument("--group", type=int, default=8, help="GRPO group size")
    p.add_argument("--save-models", action="store_true", help="write the SFT and GRPO models (sft_model/, model/; "
                   "about 75 MB each) into OUT")
    p.add_argument("--seed", type=int, default=0)
    add_base_arg(p)
    args = p.parse_args()
    if args.quick:
        args.levels, args.harder_levels, args.sft_per_level, args.train_per_level = [1], [2], 4, 1
        args.eval_per_level, args.eval_samples, args.tokenizer_episodes, args.vocab = 1, 1, 4, 1024
        args.max_new, args.max_turns, args.rl_max_turns, args.sft_steps = 32, 2, 2, 1
        args.sft_batch, args.sft_minutes, args.rl_steps, args.prompts, args.group = 1, 0, 1, 1, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"args": vars(args), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "stages": {}}
    t_start = time.time()

    def done(stage: str, t0: float, **extra):
        results["stages"][stage] = {"wall_s": round(time.time() - t0, 1), **extra}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"[{stage}] {json.dumps(results['stages'][stage])}", flush=True)

    if args.expert_only:
        t0, rows = time.time(), []
        levels = list(range(1, args.max_level + 1))
        root = out / "expert_envs"
        shutil.rmtree(root, ignore_errors=True)
        for d in make_split(root, levels, args.expert_only, SEED0["heldout"] + 50_000, "expert envs"):
            rows.append(expert_episode(d, TripExpert(slip=args.slip))[0])
        shutil.rmtree(root)
        (out / "expert_episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results["expert"] = table(rows)
        (out / "expert_by_level.json").write_text(json.dumps(results["expert"], indent=1))
        done("expert only", t0, pass_at_1={lv: t["pass@1"] for lv, t in results["expert"].items()},
             turns={lv: round(sum(r["turns"] for r in rows if r["level"] == lv) / args.expert_only, 1) for lv in levels})
        return

    # 1-2. environments, the expert, tokenizer, SFT data: CPU work, here or from --data
    data = Path(args.data) if args.data else out / "data"
    if args.data:
        t0 = time.time()
        tok = Tokenizer.from_file(data)
        examples = load_examples(data / "sft.npz")
        results["expert"] = json.loads((data / "expert.json").read_text())
        # the levels are the prepared environments' own
        args.levels = sorted({r["difficulty"] for r in read_index(data / "envs" / "train")})
        args.harder_levels = sorted({r["difficulty"] for r in read_index(data / "envs" / "harder")})
        done("load data", t0, examples=len(examples), vocab=tok.vocab_size, levels=args.levels,
             harder_levels=args.harder_levels)
    else:
        data.mkdir(parents=True, exist_ok=True)
        tok, examples, results["expert"] = prepare(args, data, results, done)
        if args.prepare:
            results["total_s"] = round(time.time() - t_start, 1)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            return
    plot(results, out)

    # 3. SFT on the expert's accepted episodes
    t0 = time.time()
    examples = [e for e in examples if len(e[0]) <= args.window]
    seq_len = max(len(ids) for ids, _ in examples) - 1
    examples = sft_rows(examples, args, tok, seq_len + 1)
    torch.manual_seed(args.seed)
    model = base_model(args, tok)
    history, steps = sft(model, SFTData(examples, seq_len, tok.eos_id, seed=args.seed), seq_len, args, out, device)
    if args.save_models:
        save(model, out / "sft_model", tokenizer=tok)
    done("sft", t0, steps=steps, seq_len=seq_len, params=sum(p.numel() for p in model.parameters()),
         loss_first=history[0].get("lm") if history else None, loss_last=history[-1].get("lm") if history else None,
         **cuda_memory())

    # 4-6. pass@1 before GRPO, GRPO on the train pool, pass@1 after; the held-out tasks are fixed
    eval_tasks = [t for split in EVAL_SPLITS for t in split_tasks(data / "envs" / split, args.eval_per_level)]
    pool = environment_tasks(data / "envs" / "train")
    cfg = RLConfig(out=str(out / "rl"), domains=[DOMAIN], steps=args.rl_steps, prompts_per_step=args.prompts,
                   group_size=args.group, minibatches=args.prompts, max_new_tokens=args.max_new,
                   max_turns=args.rl_max_turns, max_len=args.window, lr=args.rl_lr, device=device, seed=args.seed)
    runner = CompactRunner()
    trainer = RLTrainer(cfg, model, tok, TaskMix([Domain(DOMAIN)], {DOMAIN: pool}), env=runner)
    all_rows = []

    def measure(arm: str) -> None:
        t0 = time.time()
        rows = evaluate(trainer.engine_model, tok, eval_tasks, args.eval_samples, args.max_new, args.max_turns,
                        args.window, arm)
        all_rows.extend(rows)
        results[arm] = table(rows)
        (out / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
        plot(results, out)
        done(f"eval {arm}", t0, pass_at_1={lv: t["pass@1"] for lv, t in results[arm].items()}, **cuda_memory())

    t0 = time.time()
    measure("sft")
    eval_s = time.time() - t0
    t0 = time.time()
    # GRPO until --rl-minutes, or earlier where the evaluation after it would pass --budget-minutes
    deadline = min(t0 + 60 * args.rl_minutes, t_start + 60 * args.budget_minutes - 1.15 * eval_s - 20)
    rl_hist, rl_error = rl(trainer, deadline)
    if args.save_models:
        save(trainer.policy, out / "model", tokenizer=tok)
    done("grpo", t0, steps=len(rl_hist), deadline_s=round(deadline - t0, 1),
         reward_first=rl_hist[0]["reward"] if rl_hist else None,
         reward_last5=sum(h["reward"] for h in rl_hist[-5:]) / max(1, len(rl_hist[-5:])), error=rl_error,
         **cuda_memory())
    measure("grpo")
    runner.close()
    results["total_s"] = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({arm: {lv: t["pass@1"] for lv, t in results[arm].items()} for arm in ("expert", "sft", "grpo")}))


if __name__ == "__main__":
    main()
