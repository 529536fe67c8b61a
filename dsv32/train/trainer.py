"""The trainer: pretraining, SFT and DeepSeek's two DSA stages with one loop.

Stages (spec §1.3-1.4):
  pretrain / sft  LM (+ MTP) loss, dense attention by default (`--attention dsa` to train with DSA)
  dsa-warmup      stage 1: dense attention, every parameter but the indexers frozen, loss = KL of
                  the indexer to the head-summed main attention over all causal keys
  dsa-sparse      stage 2: top-k selection on, all parameters train; the indexer sees detached
                  inputs and learns only from the KL on its selected set, the rest only from LM;
                  the two groups' gradients are clipped separately
The MTP layers run in every stage, so their indexers train in stages 1 and 2 like the others.
MoE balance as in DeepSeek-V3: the auxiliary-loss-free bias update plus a small sequence-wise
balance loss. Runs on CPU, one GPU, or many with `torchrun` (FSDP2 over each block).

Checkpoints are safetensors (model and optimizer) + JSON, written to a temporary directory and
renamed into place, so a run killed at any moment resumes from its last complete checkpoint and
continues bit for bit (batches are a function of the step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dsv32.config import ModelConfig
from dsv32.model import Transformer
from dsv32.model.moe import MoE
from dsv32.train import losses
from dsv32.train.plots import can_plot, plot_metrics
from dsv32.train.resume import flatten_state, interrupted, prepare, unflatten_state, unshared, write_checkpoint

log = logging.getLogger(__name__)
STAGES = ("pretrain", "sft", "dsa-warmup", "dsa-sparse")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "H800": 989e12}


@dataclass
class TrainConfig:
    stage: str = "pretrain"               # pretrain, sft, dsa-warmup or dsa-sparse
    # text files, or directories of .txt / .md / .py / .jsonl files (JSONL: `text`, or `messages` for sft)
    data: list[str] = field(default_factory=list)
    tokenizer: str | None = None          # tokenizer.json or its directory
    model: str | None = None              # start from this checkpoint directory
    preset: str = "tiny"                  # else build this preset (random init)
    out: str = "runs/train"               # run directory: checkpoint/, metrics.jsonl, metrics.png, model/
    attention: str = "dense"              # pretrain/sft: "dense" or "dsa"
    index_topk: int | None = None         # override the model's top-k (e.g. DSA on a small context)
    seq_len: int = 256                    # tokens per training window
    batch_size: int = 8                   # windows per micro-batch (per rank under torchrun)
    grad_accum: int = 1                   # micro-batches per optimizer step
    steps: int = 100                      # optimizer steps in the whole run (a resumed run counts on)
    lr: float | None = None               # default per stage: 3e-4; 1e-3 warm-up; 7.3e-6 sparse
    warmup: int = 10                      # steps of linear learning-rate warm-up
    min_lr_ratio: float = 0.1             # the cosine decay ends at this fraction of lr
    weight_decay: float = 0.1             # AdamW weight decay (matrices only)
    grad_clip: float = 1.0                # gradient-norm clipping (per group in dsa-sparse)
    mtp_weight: float = 0.3               # weight of the multi-token-prediction loss
    balance_alpha: float = 1e-4           # weight of the sequence-wise MoE balance loss
    bias_update_rate: float = 1e-3        # the auxiliary-loss-free expert bias update's step
    indexer_weight: float = 1.0           # weight of the indexer KL loss (DSA stages)
    dtype: str = "bfloat16"               # autocast dtype on CUDA (fp32 on CPU)
    device: str | None = None             # cpu, cuda or cuda:N; default cuda if available
    activation_checkpointing: bool = False  # recompute each block in backward (less memory)
    checkpoint_every: int = 50            # steps between checkpoints (and the last step)
    seed: int = 0                         # model init and batch order
    ep: int = 1                           # under torchrun: split the routed experts over all ranks (1 or world)
    # held-out text (files or directories, as --data): its loss is logged every eval_every steps
    eval_data: list[str] = field(default_factory=list)
    eval_every: int = 50                  # steps between held-out losses (with eval_data)
    eval_batches: int = 4                 # batches of batch_size windows per held-out loss
    plot_every: int = 10                  # steps between refreshes of metrics.png (needs matplotlib)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.attention not in ("dense", "dsa"):
            raise ValueError(f"attention must be 'dense' or 'dsa', got {self.attention!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "checkpoint_every", "eval_every",
                     "eval_batches", "plot_every", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.index_topk is not None and self.index_topk < 1:
            raise ValueError(f"index_topk must be at least 1 (or unset: the model's own), got {self.index_topk}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr is None:
            self.lr = {"dsa-warmup": 1e-3, "dsa-sparse": 7.3e-6}.get(self.stage, 3e-4)

    @property
    def sparse(self) -> bool:
        return self.stage == "dsa-sparse" or (self.stage in ("pretrain", "sft") and self.attention == "dsa")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def trainable(model: Transformer, stage: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Stage 1 trains only the indexers; the other stages train everything."""
    named = list(model.named_parameters())
    if stage == "dsa-warmup":
        named = [(n, p) for n, p in named if ".indexer." in n]
    keep = {id(p) for _, p in named}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return named


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x active parameters + attention scores and values (forward + backward)."""
    if hasattr(cfg, "flops_per_token"):  # another model family counts its own (dsv32.model.llama)
        return cfg.flops_per_token(seq_len)
    d = cfg.hidden_size
    attn = d * cfg.q_lora_rank + cfg.q_lora_rank * cfg.num_attention_heads * cfg.qk_head_dim \
        + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) \
        + cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
        + cfg.num_attention_heads * cfg.v_head_dim * d
    moe = 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    dense = 3 * d * cfg.intermediate_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    params = cfg.num_hidden_layers * attn + n_moe * moe + (cfg.num_hidden_layers - n_moe) * dense + d * cfg.vocab_size
    ctx = min(seq_len, cfg.index_topk)
    scores = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * ctx
    return 6 * params + scores


class Trainer:
    def __init__(self, cfg: TrainConfig, model: Transformer | None = None, data=None, eval_data=None):
        self.cfg = cfg
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and self.distributed:
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = torch.device(dev)
        torch.manual_seed(cfg.seed)
        self.model = model if model is not None else self._build_model()
        self.model.to(self.device)
        if cfg.index_topk:
            self.model.cfg.index_topk = cfg.index_topk
        self.named = trainable(self.model, cfg.stage)
        if cfg.activation_checkpointing:
            self._checkpoint_blocks()
        if self.distributed:  # sharding replaces the parameters: look them up again by name
            names = {n for n, _ in self.named}
            self._shard()
            self.named = [(n, p) for n, p in self.model.named_parameters() if n in names]
        params = [p for _, p in self.named]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        self.data, self.eval_data = data, eval_data
        self.step = 0
        self.out = Path(cfg.out)
        self.autocast = (torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
                         if self.device.type == "cuda" and cfg.dtype != "float32" else nullcontext())

    def _build_model(self) -> torch.nn.Module:
        from dsv32.loader import load

        return load(self.cfg.model or self.cfg.preset, dtype=torch.float32, device="cpu", seed=None)[0]

    def _checkpoint_blocks(self):
        from torch.utils.checkpoint import checkpoint

        for block in self.model.layers:
            fwd = block.forward
            block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)

    def _shard(self):
        from dsv32.parallel import make_parallel
        from dsv32.parallel.fsdp import shard_for_training

        shard_for_training(self.model, make_parallel(ep=self.cfg.ep) if self.cfg.ep > 1 else None)

    # ---- one optimisation step ----
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg, mcfg = self.cfg, self.model.cfg
        stage = cfg.stage
        kl_stage = stage in ("dsa-warmup", "dsa-sparse")
        with self.autocast:  # the MTP layers run in every stage: their indexers train with the others
            out = self.model(x, sparse=cfg.sparse, mode="mha", mtp=bool(getattr(self.model, "mtp", None)),
                             return_aux=kl_stage, return_attn_probs=kl_stage, detach_indexer=stage == "dsa-sparse",
                             return_router_scores=stage != "dsa-warmup" and cfg.balance_alpha > 0)
        metrics = {}
        total = torch.zeros((), device=self.device)
        if stage != "dsa-warmup":
            lm = losses.lm_loss(out.logits, y)
            total = total + lm
            metrics["lm"] = lm.item()
            if out.mtp_logits:
                mtp = losses.mtp_loss(out.mtp_logits, y)
                total = total + cfg.mtp_weight * mtp
                metrics["mtp"] = mtp.item()
            if out.router_scores:
                bal = torch.stack([losses.sequence_balance_loss(s, i, x.shape[0], mcfg.num_experts_per_tok)
                                   for s, i in zip(out.router_scores, out.expert_ids)]).mean()
                total = total + cfg.balance_alpha * bal
                metrics["balance"] = bal.item()
        if kl_stage:  # every layer's indexer, the MTP layers' included
            if stage == "dsa-warmup":
                kls = [losses.indexer_kl_dense(s, p) for s, p in zip(out.index_scores, out.attn_probs)]
            else:
                kls = [losses.indexer_kl_sparse(s, p, i) for s, p, i in
                       zip(out.index_scores, out.attn_probs, out.topk_indices)]
            kl = torch.stack(kls).mean()
            total = total + cfg.indexer_weight * kl
            metrics["indexer_kl"] = kl.item()
            recalls = [r for r in (losses.topk_recall(p.detach(), i, mcfg.index_topk)
                                   for p, i in zip(out.attn_probs, out.topk_indices)) if r is not None]
            if recalls:  # only once some query sees more than index_topk keys
                metrics["topk_recall"] = sum(recalls) / len(recalls)
        return total, metrics, out

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        sums: dict[str, float] = {}
        expert_ids, positions, width = None, 0, 0
        for micro in range(cfg.grad_accum):
            # every rank and micro-step gets its own slice of the step's global batch
            x, y = self.data.batch(self.step * cfg.grad_accum * self.world + micro * self.world + self.rank,
                                   cfg.batch_size)
            x, y = x.to(self.device), y.to(self.device)                          # [B, L], L <= seq_len
            positions, width = positions + x.numel(), max(width, x.shape[1])
            loss, metrics, out = self.loss(x, y)
            (loss / cfg.grad_accum).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            if out.expert_ids:
                ids = [e.detach() for e in out.expert_ids[:len(self._moe_gates())]]
                expert_ids = ids if expert_ids is None else [torch.cat([a, b]) for a, b in zip(expert_ids, ids)]
        if self.distributed:  # log the mean over ranks, as one process with more micro-batches would
            keys = sorted(sums)
            vals = torch.tensor([sums[k] for k in keys] + [positions], dtype=torch.float64, device=self.device)
            dist.all_reduce(vals)
            sums, positions = dict(zip(keys, (vals[:-1] / self.world).tolist())), int(vals[-1])
        norms = self.clip_gradients()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cfg.stage != "dsa-warmup" and cfg.bias_update_rate > 0 and expert_ids:
            for gate, ids in zip(self._moe_gates(), expert_ids):
                if self.distributed:  # the load counts of every rank decide one shared update
                    counts = torch.bincount(ids.flatten(), minlength=gate.e_score_correction_bias.numel())
                    dist.all_reduce(counts)
                    ids = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
                losses.update_expert_bias(gate.e_score_correction_bias, ids, cfg.bias_update_rate)
        self.step += 1
        # the positions computed (every rank), and this rank's widest batch: SFT batches are as wide
        # as their longest row (SFTData.batch), so cfg.seq_len would overstate tokens/s and MFU
        return {"step": self.step, "lr": lr, **norms, **sums, "batch_tokens": positions, "width": width}

    def clip_groups(self) -> dict[str, list]:
        """Parameters clipped together, by the name of their norm in the metrics. Stage 2 clips the
        indexers apart from the rest: they learn from the KL alone, the rest from the LM loss alone,
        and one joint norm would let either loss shrink the other's update (spec §1.4)."""
        if self.cfg.stage != "dsa-sparse":
            return {"grad_norm": self.named}
        return {"grad_norm": [(n, p) for n, p in self.named if ".indexer." not in n],
                "indexer_grad_norm": [(n, p) for n, p in self.named if ".indexer." in n]}

    def clip_gradients(self) -> dict[str, float]:
        """Clip each group of clip_groups() to grad_clip; return each group's norm before clipping."""
        norms = {}
        for name, group in self.clip_groups().items():
            params = [p for _, p in group]
            if not params:
                continue
            if self.distributed:  # FSDP shards and experts: each rank holds a distinct part
                from dsv32.parallel.fsdp import clip_grad_norm

                norms[name] = float(clip_grad_norm(params, self.cfg.grad_clip))
            else:
                norms[name] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        return norms

    def _moe_gates(self):
        return [b.mlp.gate for b in self.model.layers if isinstance(b.mlp, MoE)]

    # ---- checkpoints ----
    def _full_state(self):
        if self.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model_sd, opt_sd = get_state_dict(self.model, self.opt,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.cfg.ep > 1:
                from dsv32.parallel.fsdp import gather_experts

                model_sd, opt_sd = gather_experts(self.model, self.opt, model_sd, opt_sd)
            return model_sd, opt_sd
        return self.model.state_dict(), self.opt.state_dict()

    def save_checkpoint(self) -> Path:
        model_sd, opt_sd = self._full_state()
        if self.rank == 0:
            tensors, meta = flatten_state(opt_sd)
            write_checkpoint(self.out, {"model": unshared(model_sd), "optimizer": tensors},
                             {"step": self.step, "optimizer": meta, "config": asdict(self.cfg),
                              "model_config": self.model.cfg.to_hf()})
        if self.distributed:
            dist.barrier()
        return self.out / "checkpoint"

    def load_checkpoint(self) -> bool:
        path = self.out / "checkpoint"
        if not path.exists():
            return False
        state = json.loads((path / "state.json").read_text())
        model_sd = load_file(str(path / "model.safetensors"))
        opt_sd = unflatten_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        if self.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            if self.cfg.ep > 1:
                from dsv32.parallel.fsdp import own_experts

                model_sd, opt_sd = own_experts(model_sd, opt_sd, self.model)
            set_model_state_dict(self.model, model_sd, options=StateDictOptions(full_state_dict=True))
            # a parameter that never had a gradient (e.g. an unused indexer) has no Adam state yet
            set_optimizer_state_dict(self.model, self.opt, opt_sd,
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.model.load_state_dict(model_sd)
            self.opt.load_state_dict(opt_sd)
        self.step = state["step"]
        return True

    # ---- the loop ----
    def fit(self, resume: bool | str = True) -> list[dict]:
        """Train to cfg.steps. resume: "auto"/True continues from out/checkpoint (a changed config
        is refused), "no"/False starts fresh, "overwrite" deletes the old run first
        (dsv32.train.resume). Ctrl-C raises `Interrupted`, saying where the run stopped."""
        cfg = self.cfg
        ours = prepare(self.out, asdict(cfg), resume, ("metrics.jsonl",) if self.rank == 0 else ())
        if ours and self.load_checkpoint():
            log.info("resumed from step %d", self.step)
        self.saved_step = self.step if ours else None
        metrics_path = self.out / "metrics.jsonl"
        history = []
        seen = self.step * cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world  # resumed: at most this
        peak = next((v for k, v in PEAK_BF16.items() if self.device.type == "cuda" and k in torch.cuda.get_device_name(self.device)), None)
        bar = None
        if self.rank == 0:
            from tqdm import tqdm

            if not can_plot():
                log.warning("matplotlib is not installed: no metrics.png (pip install matplotlib); "
                            "metrics.jsonl has every number")
            bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.stage, dynamic_ncols=True)
        self.model.train()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                m = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                seen += m["batch_tokens"]
                m.update(tokens_per_s=m["batch_tokens"] / dt, tokens=seen)
                if peak:
                    m["mfu"] = flops_per_token(self.model.cfg, m["width"]) * m["batch_tokens"] / dt / (peak * self.world)
                if self.eval_data is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    m["eval_lm"] = self.evaluate()
                history.append(m)
                if self.rank == 0:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(m) + "\n")
                    bar.update(1)
                    bar.set_postfix({k: f"{m[k]:.4g}" for k in ("lm", "indexer_kl", "topk_recall", "tokens_per_s", "mfu")
                                     if k in m})
                    if self.step % cfg.plot_every == 0:
                        plot_metrics(metrics_path, self.out / "metrics.png")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                    self.saved_step = self.step
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            raise interrupted(self.step, cfg.steps, self.saved_step, self.out) from None
        if bar is not None:
            bar.close()
            plot_metrics(metrics_path, self.out / "metrics.png")
        return history

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss on the held-out data's first eval_batches batches; with DSA where the stage
        trains for it (the DSA stages included: their point is the sparse model's loss)."""
        cfg = self.cfg
        sparse = cfg.sparse or cfg.stage in ("dsa-warmup", "dsa-sparse")
        total = 0.0
        for i in range(cfg.eval_batches):
            x, y = self.eval_data.batch(i, cfg.batch_size)
            with self.autocast:
                logits = self.model(x.to(self.device), sparse=sparse, mode="mha").logits
            total += losses.lm_loss(logits, y.to(self.device)).item() / cfg.eval_batches
        return total


def run(cfg: TrainConfig, resume: bool | str = True) -> Path | None:
    """The `dsv32 train` job: tokenizer, data, model, fit, then export the model in Hugging Face
    format (config.json + safetensors + tokenizer.json) to `out/model` (returned on rank 0).
    `--model` is anything `dsv32.load` reads (ours, a converted Llama-family model, a GGUF);
    without it, `--preset` sized to `--tokenizer`'s vocabulary. `resume` as in `Trainer.fit`."""
    from dsv32.loader import load, save
    from dsv32.train.data import PackedData, SFTData, read_documents

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # under torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    if cfg.model is None and cfg.tokenizer is None:
        raise ValueError("training needs a tokenizer: --tokenizer DIR (make one with `dsv32 tokenizer train`)")
    model, tok = load(cfg.model or cfg.preset, dtype=torch.float32, device="cpu", tokenizer=cfg.tokenizer,
                      seed=cfg.seed)
    if tok is None:
        raise ValueError(f"{cfg.model} has no tokenizer.json: pass --tokenizer DIR")
    if not cfg.data:
        raise ValueError("training needs data: --data FILES or DIRS (text, or JSONL with `text` / `messages`)")

    def dataset(paths, seed):
        docs = read_documents(paths)
        return (SFTData.from_documents(docs, tok, cfg.seq_len, seed=seed) if cfg.stage == "sft"
                else PackedData.from_documents(docs, tok, cfg.seq_len, seed=seed))

    data = dataset(cfg.data, cfg.seed)
    eval_data = dataset(cfg.eval_data, cfg.seed + 1) if cfg.eval_data else None
    trainer = Trainer(cfg, model, data, eval_data)
    trainer.fit(resume)
    out = Path(cfg.out) / "model"
    full = trainer.model
    if trainer.distributed:  # gathering the shards is a collective: every rank takes part
        state = trainer._full_state()[0]
        if trainer.rank == 0:
            full = type(trainer.model)(trainer.model.cfg)
            full.load_state_dict(state)
    if trainer.rank == 0:
        save(full, out, tokenizer=tok)
        return out
    return None
