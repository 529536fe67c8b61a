"""The RL trainer: GRPO with DeepSeek-V3.2's stabilisers, rollouts from our engine.

One step: draw prompts from the domain mix, sample G trajectories each through the engine (its own
copy of the weights), reward them, centre the rewards per group, then take `minibatches` optimizer
steps over the rollout batch, a slice of whole groups each. Only the first slice is on-policy
(up to engine/trainer numerics, which the `mismatch` metric measures there); the later ones are
increasingly off-policy, which is what the off-policy sequence mask is for. Then the new weights
are copied into the engine (in process), optionally perturbed or in a lower precision to make the
sampler deliberately mismatched (ablations).

`warm_start` runs a short SFT on the tasks' reference solutions with `dsv32.train.Trainer`, so
a small model starts RL with non-zero rewards.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.rl import objective
from dsv32.rl.rewards import GenerativeRM, RewardConfig, reward
from dsv32.rl.rollout import encode_prompt, pack, replay_logprobs, rollout, speaks_v32, tool_env, tool_suffix
from dsv32.rl.tasks import Domain, Task, TaskMix, load_tasks
from dsv32.train.plots import can_plot, plot_metrics
from dsv32.train.resume import (
    checkpoint_state,
    flatten_state,
    interrupted,
    prepare,
    unflatten_state,
    unshared,
    write_checkpoint,
)

log = logging.getLogger(__name__)
STABILISERS = ("keep_routing", "keep_sampling_mask", "keep_selection", "off_policy_masking", "unbiased_kl")


@dataclass
class RLConfig:
    model: str | None = None              # checkpoint directory (ours or a converted Llama-family model)
    tokenizer: str | None = None          # default: the model's; with a preset, one trained on the tasks
    preset: str = "tiny"                  # random init of this preset when no --model
    out: str = "runs/rl"                  # run directory: checkpoint/, metrics.jsonl, rollouts.jsonl, model/
    # task domains, each name[:beta[:weight]] (beta: the KL weight; weight: its share of prompts)
    domains: list[str] = field(default_factory=lambda: ["arithmetic"])
    tasks_file: str | None = None         # JSONL tasks for domains without a generator
    steps: int = 20                       # rollout batches
    prompts_per_step: int = 8             # prompts per rollout batch, each sampled group_size times
    group_size: int = 8                   # G: trajectories per prompt (advantages are relative to the group)
    minibatches: int = 2                  # optimizer steps per rollout batch
    max_new_tokens: int = 96              # per turn (a V3.2 tool call alone takes ~60 tokens)
    max_turns: int = 3                    # tool round trips + 1
    max_len: int = 512                    # context of a trajectory in the engine
    temperature: float = 1.0              # sampling temperature of the rollouts (> 0)
    top_p: float = 0.95                   # nucleus sampling of the rollouts (Keep Sampling Mask replays it)
    top_k: int = 0                        # top-k sampling of the rollouts; 0 = off
    lr: float = 1e-5                      # AdamW learning rate of the policy
    weight_decay: float = 0.0             # AdamW weight decay (matrices only)
    grad_clip: float = 1.0                # gradient-norm clipping
    clip_eps: float = 0.2                 # PPO ratio clip epsilon
    mask_delta: float = 0.1               # off-policy masking threshold delta (not published)
    keep_routing: bool = True             # replay the engine's MoE routes in the trainer (Keep Routing)
    keep_sampling_mask: bool = True       # replay the engine's top-p/top-k kept sets (Keep Sampling Mask)
    keep_selection: bool = True           # replay the engine's DSA key sets (positions past index_topk)
    batch_invariant: bool = False         # engine and replay in the batch-invariant mode: log-probs equal
                                          # bit for bit where both run the same weights dtype (docs/rl.md)
    off_policy_masking: bool = True       # drop negative-advantage sequences that drifted past mask_delta
    unbiased_kl: bool = True              # False: plain K3, no importance weight
    length_buffer: int = 0                # soft overlong penalty ramp (tokens; 0 = off)
    language_weight: float = 0.0          # weight of the language-consistency reward
    rm_url: str | None = None             # OpenAI-compatible endpoint of a generative reward model
    rm_model: str = "judge"               # the reward model's name at rm_url
    sft_steps: int = 0                    # warm start on the tasks' reference solutions
    sft_lr: float = 2e-3                  # learning rate of the warm start
    sft_batch_size: int = 32              # batch size of the warm start
    tokenizer_vocab: int = 512            # the task tokenizer trained for a preset model
    engine_dtype: str = "float32"         # the sampler's weights: float32 or bfloat16
    sampler_noise: float = 0.0            # relative Gaussian noise on the sampler's weights at each sync
    dtype: str = "float32"                # trainer autocast dtype on CUDA (fp32 = none)
    device: str | None = None             # cpu, cuda or cuda:N; default cuda if available
    seed: int = 0                         # model init, task draws and sampling
    checkpoint_every: int = 10            # steps between checkpoints (and the last step); a rerun resumes
    rollouts_per_step: int = 8            # trajectories saved per step to out/rollouts.jsonl (0 = none)
    plot_every: int = 5                   # steps between refreshes of metrics.png (needs matplotlib)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.minibatches < 1 or self.prompts_per_step % self.minibatches:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} must split into minibatches="
                             f"{self.minibatches} slices of whole groups")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "max_turns", "max_len", "checkpoint_every",
                     "plot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sft_steps < 0 or self.rollouts_per_step < 0 or self.top_k < 0:
            raise ValueError("sft_steps, rollouts_per_step and top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        for name in ("engine_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")
        self.domain_specs = [Domain.parse(d) for d in self.domains]


@torch.no_grad()
def sync_weights(src: torch.nn.Module, dst: torch.nn.Module, noise: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
    """Copy the trainer's weights (and buffers: the gate's selection bias) into the engine's model,
    casting to its dtype; `noise` > 0 multiplies each weight by (1 + noise * N(0, 1))."""
    dst_state, weights = dst.state_dict(), dict(src.named_parameters())
    for name, p in src.state_dict().items():
        q = dst_state[name]
        if noise and name in weights:
            p = p * (1 + noise * torch.randn(p.shape, generator=generator, device="cpu").to(p.device))
        q.copy_(p)


def task_examples(tokenizer, tasks) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each task's reference solution in the token layout rollouts produce:
    the policy's turns carry labels, prompts and tool results do not."""
    from dsv32.chat import encode_completion
    from dsv32.train.losses import IGNORE

    chat = speaks_v32(tokenizer)
    out = []
    for task in tasks:
        ids = encode_prompt(tokenizer, task)
        labels = [IGNORE] * len(ids)
        messages = list(task.messages)
        for i, msg in enumerate(task.solution or []):
            if msg["role"] == "assistant":
                text = (encode_completion(msg, task.thinking_mode) if chat
                        else msg["content"] + tokenizer.decode([tokenizer.eos_id]))
                new = tokenizer.encode(text)
                ids, labels = ids + new, labels + new
                if msg.get("tool_calls"):
                    results = [m["content"] for m in task.solution[i + 1:] if m["role"] == "tool"][:len(msg["tool_calls"])]
                    new = tokenizer.encode(tool_suffix(messages, msg, results, task.thinking_mode))
                    ids, labels = ids + new, labels + [IGNORE] * len(new)
            messages.append(msg)
        out.append((ids, labels))
    return out


def turns_over_budget(tasks, examples, max_new_tokens: int) -> dict[str, int]:
    """{domain: its longest reference turn} for domains whose reference turns (the labelled runs
    of task_examples) exceed max_new_tokens: rollouts imitating them are cut off, reward 0."""
    from dsv32.train.losses import IGNORE

    over = {}
    for task, (_, labels) in zip(tasks, examples):
        run = longest = 0
        for label in labels:
            run = run + 1 if label != IGNORE else 0
            longest = max(longest, run)
        if longest > max_new_tokens:
            over[task.domain] = max(longest, over.get(task.domain, 0))
    return over


def warm_start(model, tokenizer, mix: TaskMix, cfg: RLConfig) -> dict:
    """Short SFT on reference solutions (dsv32.train.Trainer, DSA on); returns its last metrics."""
    from dsv32.train import TrainConfig, Trainer
    from dsv32.train.data import SFTData

    rng = random.Random(cfg.seed + 1)
    tasks = mix.sample(rng, max(256, cfg.sft_steps * cfg.sft_batch_size // 4))
    examples = task_examples(tokenizer, tasks)
    for domain, n in turns_over_budget(tasks, examples, cfg.max_new_tokens).items():
        log.warning(f"domain {domain!r}: reference turns of up to {n} tokens, but max_new_tokens="
                    f"{cfg.max_new_tokens}; rollouts that follow them are cut off and score 0")
    seq_len = max(len(ids) for ids, _ in examples) - 1
    data = SFTData(examples, seq_len, tokenizer.eos_id, seed=cfg.seed)
    tcfg = TrainConfig(stage="sft", attention="dsa", steps=cfg.sft_steps, lr=cfg.sft_lr, warmup=min(20, cfg.sft_steps),
                       batch_size=cfg.sft_batch_size, seq_len=seq_len, out=str(Path(cfg.out) / "sft"),
                       checkpoint_every=10**9, device=cfg.device, seed=cfg.seed, dtype=cfg.dtype)
    trainer = Trainer(tcfg, model, data)
    history = trainer.fit(resume=False)
    return history[-1] if history else {}


class RLTrainer:
    def __init__(self, cfg: RLConfig, model, tokenizer, mix: TaskMix, rm: GenerativeRM | None = None,
                 env=tool_env):
        """`env(task, message)` runs a turn's tool calls (`dsv32.rl.rollout.rollout`); each
        trajectory gets its own copy of its task, so a stateful environment (a browser's page
        stack) can keep its state per trajectory, keyed by the task object."""
        self.cfg, self.tokenizer, self.mix, self.rm, self.env = cfg, tokenizer, mix, rm, env
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.policy = model.to(self.device, torch.float32).train()
        for p in self.policy.parameters():
            p.requires_grad_(True)
        self.ref = self._frozen_copy(torch.float32)
        self.engine_model = self._frozen_copy(getattr(torch, cfg.engine_dtype))
        n_seqs = cfg.prompts_per_step * cfg.group_size
        blocks = n_seqs * -(-cfg.max_len // 64) + 1
        self.engine = Engine(self.engine_model, EngineConfig(max_num_seqs=n_seqs, num_blocks=blocks,
                                                             max_model_len=cfg.max_len,
                                                             max_num_batched_tokens=max(8192, 4 * cfg.max_len),
                                                             batch_invariant=cfg.batch_invariant))
        decay = [p for p in self.policy.parameters() if p.dim() >= 2]
        rest = [p for p in self.policy.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and cfg.dtype == "bfloat16" else nullcontext())
        self.rng = random.Random(cfg.seed)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed)
        self.params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                     max_tokens=cfg.max_new_tokens)
        self.rcfg = RewardConfig(length_buffer=cfg.length_buffer, language_weight=cfg.language_weight)
        self.step = 0
        self.last_varied, self.last_rollouts = 0, []
        self.sync()

    def _frozen_copy(self, dtype):
        m = copy.deepcopy(self.policy).to(dtype).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def sync(self) -> None:
        sync_weights(self.policy, self.engine_model, self.cfg.sampler_noise, self.noise_gen)

    # ---- one RL step ----
    def collect(self):
        """Sample the rollout batch and score it: (trajectories, reward dicts, advantages [N])."""
        cfg = self.cfg
        tasks = self.mix.sample(self.rng, cfg.prompts_per_step)
        trajs = rollout(self.engine, self.tokenizer, [replace(t) for t in tasks for _ in range(cfg.group_size)],
                        self.params, max_turns=cfg.max_turns, env=self.env)
        scores = [reward(t.task, t.answer, t.text, t.n_sampled, cfg.max_new_tokens * cfg.max_turns, self.rcfg, self.rm)
                  for t in trajs]
        too_long = sum(t.turns == 0 for t in trajs)
        if too_long:
            log.warning("%d of %d prompts do not fit max_len=%d: they sample nothing and score as failures",
                        too_long, len(trajs), cfg.max_len)
        rewards = torch.tensor([s["reward"] for s in scores])
        groups = torch.arange(cfg.prompts_per_step).repeat_interleave(cfg.group_size)
        self.last_varied = groups_with_variance(rewards, cfg.group_size)
        if self.last_varied == 0:
            log.warning(no_variance_warning(self.step + 1, rewards, cfg))
        return trajs, scores, objective.group_advantages(rewards, groups)

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        trajs, scores, adv = self.collect()
        t1 = time.perf_counter()
        beta = torch.tensor([self.mix.beta(t.task.domain) for t in trajs])
        order = list(range(cfg.prompts_per_step))
        self.rng.shuffle(order)
        per = cfg.prompts_per_step // cfg.minibatches
        sums: dict[str, float] = {}
        m: dict[str, float] = {}
        for k in range(cfg.minibatches):
            idx = [g * cfg.group_size + j for g in order[k * per:(k + 1) * per] for j in range(cfg.group_size)]
            stats = self.minibatch_step([trajs[i] for i in idx], adv[idx], beta[idx])
            if k == 0:
                m["mismatch"] = stats.get("mismatch", float("nan"))  # before any update: engine vs trainer only
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v / cfg.minibatches
        self.sync()
        self.step += 1
        m.update({f"{k}_mean" if k == "mismatch" else k: v for k, v in sums.items()})
        m.update(self._rollout_metrics(trajs, scores))
        m.update(step=self.step, rollout_s=t1 - t0, train_s=time.perf_counter() - t1,
                 groups_with_variance=self.last_varied / cfg.prompts_per_step)
        self.last_rollouts = [rollout_record(self.step, t, s) for t, s in
                              zip(trajs[:cfg.rollouts_per_step], scores[:cfg.rollouts_per_step])]
        return m

    def minibatch_step(self, trajs, adv: torch.Tensor, beta: torch.Tensor) -> dict:
        cfg = self.cfg
        # a trajectory that sampled nothing (its prompt filled the context) scores and counts in its
        # group, but has no token to replay: keep it out of the forward, and its zero in the mean
        live = [i for i, t in enumerate(trajs) if t.n_sampled]
        if not live:
            return {"loss": 0.0, "skipped": 1.0}
        share = len(live) / len(trajs)
        trajs, adv, beta = [trajs[i] for i in live], adv[live], beta[live]
        batch = pack(trajs, self.tokenizer.eos_id, self.device)
        replay = dict(temperature=cfg.temperature, keep_routing=cfg.keep_routing,
                      keep_sampling_mask=cfg.keep_sampling_mask, keep_selection=cfg.keep_selection,
                      batch_invariant=cfg.batch_invariant,
                      autocast=self.autocast)
        logp = replay_logprobs(self.policy, batch, **replay)
        with torch.no_grad():
            logp_ref = replay_logprobs(self.ref, batch, **replay)
        loss, stats = objective.grpo_loss(logp, batch.logp_old, adv.to(self.device), batch.action, logp_ref,
                                          beta.to(self.device), cfg.clip_eps,
                                          cfg.mask_delta if cfg.off_policy_masking else None, cfg.unbiased_kl)
        loss = loss * share
        self.opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            if torch.isfinite(norm):
                self.opt.step()
        else:
            norm = torch.tensor(float("nan"))
        return {"loss": float(loss.detach()), "grad_norm": float(norm), "skipped": float(not torch.isfinite(norm)), **stats}

    @staticmethod
    def _rollout_metrics(trajs, scores) -> dict:
        n = len(trajs)
        m = {"reward": sum(s["reward"] for s in scores) / n, "accuracy": sum(s["outcome"] for s in scores) / n,
             "response_len": sum(t.n_sampled for t in trajs) / n, "turns": sum(t.turns for t in trajs) / n,
             "truncated": sum(t.finish_reason == "length" for t in trajs) / n}
        for name in ("route_drift", "selection_drift"):
            drift = [d for t in trajs for d in getattr(t, name)]
            if drift:
                m[name] = sum(drift) / len(drift)
        for dom in sorted({t.task.domain for t in trajs}):
            rows = [s for t, s in zip(trajs, scores) if t.task.domain == dom]
            m[f"reward/{dom}"] = sum(s["reward"] for s in rows) / len(rows)
            m[f"accuracy/{dom}"] = sum(s["outcome"] for s in rows) / len(rows)
        return m

    # ---- checkpoints ----
    def save_checkpoint(self) -> Path:
        """Policy, reference, optimizer, step and the random streams: what a rerun resumes from."""
        tensors, meta = flatten_state(self.opt.state_dict())
        return write_checkpoint(Path(self.cfg.out), {"policy": unshared(self.policy.state_dict()),
                                                     "ref": unshared(self.ref.state_dict()), "optimizer": tensors,
                                                     "noise": {"state": self.noise_gen.get_state()}},
                                {"step": self.step, "optimizer": meta, "config": asdict(self.cfg),
                                 "rng": _jsonable(self.rng.getstate())})

    def load_checkpoint(self) -> None:
        path = Path(self.cfg.out) / "checkpoint"
        state = json.loads((path / "state.json").read_text())
        self.policy.load_state_dict(load_file(str(path / "policy.safetensors")))
        self.ref.load_state_dict(load_file(str(path / "ref.safetensors")))
        self.opt.load_state_dict(unflatten_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
        self.noise_gen.set_state(load_file(str(path / "noise.safetensors"))["state"])
        self.rng.setstate(_tupled(state["rng"]))
        self.step = state["step"]
        self.sync()

    # ---- the loop ----
    def fit(self, resume: bool | str = True) -> list[dict]:
        """RL to cfg.steps, resuming from out/checkpoint as `dsv32.train.resume.prepare` decides
        (a changed config is refused); metrics.jsonl and rollouts.jsonl get one step per row
        block, metrics.png is redrawn every plot_every steps. Ctrl-C raises `Interrupted`."""
        from tqdm import tqdm

        cfg = self.cfg
        out = Path(cfg.out)
        if prepare(out, asdict(cfg), resume, ("metrics.jsonl", "rollouts.jsonl")):
            self.load_checkpoint()
            log.info("resumed from step %d", self.step)
        saved = self.step or None
        path = out / "metrics.jsonl"
        if not can_plot():
            log.warning("matplotlib is not installed: no metrics.png (pip install matplotlib); "
                        "metrics.jsonl has every number")
        history = []
        with tqdm(total=cfg.steps, initial=self.step, desc="rl", dynamic_ncols=True) as bar:
            try:
                while self.step < cfg.steps:
                    m = self.train_step()
                    history.append(m)
                    with path.open("a") as f:
                        f.write(json.dumps(m) + "\n")
                    with (out / "rollouts.jsonl").open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in self.last_rollouts)
                    bar.update(1)
                    bar.set_postfix({k: f"{m[k]:.3g}" for k in ("reward", "accuracy", "kl", "mismatch") if k in m})
                    if self.step % cfg.plot_every == 0:
                        plot_rl(path, out / "metrics.png")
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save_checkpoint()
                        saved = self.step
            except KeyboardInterrupt:
                raise interrupted(self.step, cfg.steps, saved, out) from None
        plot_rl(path, out / "metrics.png")
        return history


def groups_with_variance(rewards: torch.Tensor, group_size: int) -> int:
    """How many groups (consecutive runs of group_size rewards) hold at least two different
    rewards: only those give non-zero advantages, so only those teach the policy anything."""
    g = rewards.view(-1, group_size)
    return int((g.max(1).values > g.min(1).values).sum())


def no_variance_warning(step: int, rewards: torch.Tensor, cfg: RLConfig) -> str:
    scores = sorted({round(float(r), 4) for r in rewards})
    return (f"RL step {step}: no group's rewards differ (every sample of each of the {cfg.prompts_per_step} "
            f"prompts scored alike: {', '.join(map(str, scores[:4]))}), so every advantage is 0 and this step "
            "teaches nothing. Try an SFT warm start (--sft-steps 200, on the tasks' reference solutions), "
            f"more samples per group (--group-size {2 * cfg.group_size}), or an easier task (--domains)")


def rollout_record(step: int, traj, score: dict) -> dict:
    """One saved rollout: what was asked, what the policy wrote, and what it scored."""
    prompt = next((m["content"] for m in reversed(traj.task.messages) if m["role"] == "user"), "")
    return {"step": step, "domain": traj.task.domain, "prompt": prompt, "completion": traj.text,
            "answer": traj.answer, "expected": traj.task.answer, "reward": score["reward"],
            "outcome": score["outcome"], "turns": traj.turns, "tokens": traj.n_sampled,
            "finish_reason": traj.finish_reason}


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


PLOTTED = ("reward", "accuracy", "groups_with_variance", "response_len", "kl", "clip_frac", "masked_frac",
           "mismatch", "grad_norm")


def plot_rl(jsonl: Path | list, png: Path, labels: list[str] | None = None) -> None:
    """One panel per metric; several runs (a list of metrics files) are overlaid (ablations)."""
    plot_metrics(jsonl, png, [((k,), k) for k in PLOTTED], labels=labels, xlabel="RL step")


def build(cfg: RLConfig, tasks: list[Task] = ()):
    """(model, tokenizer, task mix, reward model) from a config: a checkpoint with its tokenizer,
    or a preset with a byte-level BPE trained on samples of the task mix. `tasks` join the pools
    of cfg.tasks_file (tasks made above this layer, e.g. synthesized environments)."""
    from dsv32.chat import encode_messages
    from dsv32.loader import load
    from dsv32.tokenizer import Tokenizer, train_tokenizer

    pools: dict = {}
    for t in [*(load_tasks(cfg.tasks_file) if cfg.tasks_file else []), *tasks]:
        pools.setdefault(t.domain, []).append(t)
    mix = TaskMix(cfg.domain_specs, pools)
    if cfg.model:
        model, tok = load(cfg.model, dtype=torch.float32, device="cpu", tokenizer=cfg.tokenizer)
        if tok is None:
            raise ValueError(f"{cfg.model} has no tokenizer.json: pass --tokenizer DIR")
    else:
        if cfg.tokenizer:
            tok = Tokenizer.from_file(cfg.tokenizer)
        else:
            corpus = Path(cfg.out) / "tokenizer" / "corpus.txt"
            corpus.parent.mkdir(parents=True, exist_ok=True)
            sample = mix.sample(random.Random(cfg.seed + 2), 2000)
            corpus.write_text("\n".join(encode_messages(t.messages + (t.solution or []), t.thinking_mode)
                                        for t in sample), encoding="utf-8")
            tok = train_tokenizer([corpus], cfg.tokenizer_vocab, corpus.parent)
        model, tok = load(cfg.preset, dtype=torch.float32, device="cpu", tokenizer=tok, seed=cfg.seed)
    rm = GenerativeRM(cfg.rm_model, cfg.rm_url) if cfg.rm_url else None
    return model, tok, mix, rm


def run(cfg: RLConfig, tasks: list[Task] = (), env=tool_env, resume: bool | str = True) -> Path:
    """The `dsv32 rl` job: build, optional SFT warm start, RL, export to out/model. `tasks` and
    `env` as in `build` and `RLTrainer` (the CLI passes synthesized environments and their runner);
    `resume` as in `RLTrainer.fit` (a resumed run skips the warm start: its checkpoint has both
    the policy and the reference it started from)."""
    from dsv32.loader import save

    model, tok, mix, rm = build(cfg, tasks)
    resuming = resume in (True, "auto") and checkpoint_state(Path(cfg.out)) is not None
    if cfg.sft_steps and not resuming:
        m = warm_start(model, tok, mix, cfg)
        log.info("warm start: %d SFT steps, loss %.3f", cfg.sft_steps, m.get("lm", float("nan")))
    trainer = RLTrainer(cfg, model, tok, mix, rm, env=env)
    trainer.fit(resume)
    out = Path(cfg.out) / "model"
    save(trainer.policy, out, tokenizer=tok)
    (Path(cfg.out) / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return out
