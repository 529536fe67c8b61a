"""Rollouts through the dsv32 engine, and their replay in the trainer.

A rollout records, per sampled token, the engine's log-prob under the processed distribution
(pi_old) and the kept top-p/top-k set, per position the expert ids every MoE layer used, and per
position past index_topk the keys every layer's DSA selected (packed, 2 bytes a key).
Multi-turn tool use runs in the token space: a turn's sampled tokens stay as they are, the tool
results are appended as the chat format renders them, and the next turn continues the same
token stream, so reasoning survives tool calls (the V3.2 rule until a new user message).

Each turn is a new engine request, which prefills the whole context again. The routes a
trajectory keeps are the ones the engine used when it first computed each position, i.e. when it
sampled from there; a re-prefill's routes for earlier positions are compared to them
(`route_drift`) but never replace them, so no turn's routes are dropped. Key selections follow
the same rule (`selection_drift`).

The pieces are reusable one turn at a time (the agent loop's in-process policy runs on them):
`new_trajectory` starts from a prompt, `complete` runs engine requests to their end,
`Trajectory.add_sampled` appends a reply as sampled, `Trajectory.add_forced` what the
environment wrote, `parse_turn` reads a reply, `tool_suffix` renders tool results.

`pack` turns trajectories into padded tensors; `replay_logprobs` runs the model over them as the
trainer sees them: forced to the recorded routes (Keep Routing) and key selections (Keep
Selection: the trainer's indexer may rank keys differently, as its router may pick other experts)
and masked to the recorded kept sets (Keep Sampling Mask), giving pi_theta at each sampled token.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from dsv32.chat import ChatFormatError, encode_messages, parse_completion
from dsv32.engine import Engine, RequestOutput, SamplingParams
from dsv32.model.batch_invariant import batch_invariant as bi_mode
from dsv32.model.indexer import all_keys_selection, packed_dtype
from dsv32.rl.objective import KeptSets, kept_sets, token_logprobs, token_logprobs_as_sampled
from dsv32.rl.tasks import Task, run_tool


@dataclass
class Trajectory:
    task: Task
    tokens: list[int]                       # prompt, then every turn's samples and tool results
    prompt_len: int
    action: list[bool]                      # per token: sampled by the policy (carries the loss)
    logprobs: list[float]                   # per token: the engine's log-prob (0 where not sampled)
    kept: list                              # per token: kept ids [n] int32, or None (whole vocab / not sampled)
    experts: torch.Tensor | None = None     # [len(tokens) - 1, n_moe_layers, k]: routes of each fed position
    selection: torch.Tensor | None = None   # [len(tokens) - 1 - index_topk, layers, index_topk]: packed
                                            # key sets of fed positions index_topk.. (pack_selection)
    messages: list[dict] = field(default_factory=list)  # the conversation so far (prompt + turns)
    turns: int = 0
    turn_spans: list = field(default_factory=list)      # (start, end) token range each turn sampled
    finish_reason: str | None = None
    answer: str = ""                        # the final message's content ("" if it does not parse)
    text: str = ""                          # all the policy wrote, every turn
    route_drift: list = field(default_factory=list)     # per later turn: share of re-prefilled routes that changed
    selection_drift: list = field(default_factory=list) # per later turn: share of re-prefilled key sets that changed

    @property
    def n_sampled(self) -> int:
        return sum(self.action)

    def add_sampled(self, out: RequestOutput) -> None:
        """Append one engine request's reply as the policy sampled it: its tokens, log-probs and
        kept sets, and the routes and key selections of the positions it computed first."""
        start, n = len(self.tokens), len(out.token_ids)
        self.experts = _merged(self.experts, out.experts, self.route_drift)
        self.selection = _merged(self.selection, out.selection, self.selection_drift)
        self.tokens += out.token_ids
        self.action += [True] * n
        self.logprobs += out.logprobs
        self.kept += out.kept or [None] * n       # no kept sets without return_rl_data
        self.turns, self.finish_reason = self.turns + 1, out.finish_reason
        self.turn_spans.append((start, len(self.tokens)))

    def add_forced(self, ids: list[int]) -> None:
        """Append tokens the environment wrote (tool results and what the format puts around
        them): no log-prob, no loss."""
        self.tokens += ids
        self.action += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.kept += [None] * len(ids)


def new_trajectory(task: Task, prompt: list[int]) -> Trajectory:
    """A trajectory holding only its prompt (forced tokens)."""
    n = len(prompt)
    return Trajectory(task, list(prompt), n, [False] * n, [0.0] * n, [None] * n, messages=list(task.messages))


def speaks_v32(tokenizer) -> bool:
    """Whether rollouts use the V3.2 chat format (tools, thinking); a converted Llama-family model
    (ChatML or no chat tokens) gets the plain prompt format instead."""
    return getattr(tokenizer, "chat_format", None) == "v32"


def encode_prompt(tokenizer, task: Task) -> list[int]:
    """The V3.2 chat format when the vocabulary has its tokens; else (a converted Llama-family
    model) BOS + "Question: {user text}\\nAnswer: " (single turn, no tools)."""
    if speaks_v32(tokenizer):
        return tokenizer.apply_chat_template(task.messages, thinking_mode=task.thinking_mode)
    if task.tools:
        raise ValueError(f"domain {task.domain!r} uses tools, which need the V3.2 chat tokens in the vocabulary")
    user = next(m["content"] for m in reversed(task.messages) if m["role"] == "user")
    return [tokenizer.bos_id] + tokenizer.encode(f"Question: {user}\nAnswer: ")


def tool_suffix(messages: list[dict], assistant: dict, results: list[str], thinking_mode: str) -> str:
    """The text the chat format puts after an assistant turn's tool calls: the results block and
    the opening of the model's next stretch (`<think>` in thinking mode)."""
    convo = messages + [assistant]
    before = encode_messages(convo, thinking_mode)
    full = encode_messages(convo + [{"role": "tool", "content": r} for r in results], thinking_mode)
    if not full.startswith(before):
        raise ChatFormatError("tool results changed the rendering of the turns before them")
    return full[len(before):]


def tool_env(task: Task, message: dict | None) -> tuple[dict, list[str]] | None:
    """The default environment: a parsed turn that calls tools gets their results; any other
    turn (no calls, or text that does not parse, e.g. cut off) is final."""
    if message is None or not task.tools or not message["tool_calls"]:
        return None
    return message, [run_tool(call) for call in message["tool_calls"]]


class PerTrajectory:
    """What a stateful environment (a browser's page stack, an environment's submission) keeps
    for each trajectory, keyed by the trajectory's own task object: RLTrainer copies each task per
    trajectory, so G copies of one prompt keep G states. A trajectory cut off by max_turns never
    says it ended, so past `limit` states all are dropped (they belong to finished batches)."""

    def __init__(self, limit: int = 8192):
        self.limit, self.states = limit, {}

    def get(self, task, make=None):
        """The state of `task`'s trajectory; `make()` starts one where there is none (None: look only)."""
        held = self.states.get(id(task))
        if held is not None and held[0] is task:
            return held[1]
        if make is None:
            return None
        if len(self.states) >= self.limit:
            self.states.clear()
        state = make()
        self.states[id(task)] = (task, state)
        return state

    def pop(self, task) -> None:
        held = self.states.get(id(task))
        if held is not None and held[0] is task:
            del self.states[id(task)]

    def clear(self) -> None:
        self.states.clear()

    def __len__(self) -> int:
        return len(self.states)


def parse_turn(tokenizer, ids: list[int], finish: str | None, thinking_mode: str) -> tuple[dict | None, str]:
    """(parsed assistant message or None, text) of one turn's sampled ids."""
    text = tokenizer.decode(ids)
    if not speaks_v32(tokenizer):
        return ({"role": "assistant", "content": text.removesuffix(tokenizer.decode([tokenizer.eos_id])),
                 "reasoning_content": "", "tool_calls": []} if finish == "stop" else None), text
    try:
        return parse_completion(text, thinking_mode), text
    except ChatFormatError:
        return None, text


def complete(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestOutput]:
    """Run (prompt ids, params) requests to their end, batched, and return their outputs, each taken
    at the step its request finishes (its records are final then)."""
    seqs = [engine.add_request(ids, params) for ids, params in requests]
    mine, outs = {seq.request_id: seq for seq in seqs}, {}
    while engine.has_work():
        for o in engine.step():
            if o.finish_reason is not None and o.request_id in mine:
                outs[o.request_id] = engine.output(mine[o.request_id])
    return [outs[seq.request_id] for seq in seqs]


def _merged(first: torch.Tensor | None, new: torch.Tensor | None, drift: list) -> torch.Tensor | None:
    """Per-position records [positions, layers, k] of a trajectory and of its newest turn: keep the
    first record of every position, append the positions this turn computed first, and log the
    share of re-computed positions whose record changed."""
    if new is None or first is None:
        return first if new is None else new
    if new.dtype != first.dtype:  # packed key sets: uint16, or int32 where a gap is wider
        dtype = packed_dtype([first, new])
        first, new = first.to(dtype), new.to(dtype)
    old = len(first)
    drift.append(float((new[:old] != first).flatten(1).any(-1).float().mean()) if old else 0.0)
    return torch.cat([first, new[old:]])


def rollout(engine: Engine, tokenizer, tasks: list[Task], params: SamplingParams, max_turns: int = 1,
            env=tool_env) -> list[Trajectory]:
    """Sample one trajectory per task (repeat a task G times for a group), all turns batched.

    env(task, parsed message or None) -> (the assistant message with its tool calls, their results)
    to continue, or None when the turn is final. A final turn that does not parse has no answer."""
    params = replace(params, return_rl_data=True)
    trajs = [new_trajectory(task, encode_prompt(tokenizer, task)) for task in tasks]
    active = list(range(len(trajs)))
    limit = engine.max_model_len
    for turn in range(max_turns):
        reqs = []
        for i in active:
            t = trajs[i]
            room = limit - len(t.tokens)
            if room < 1:
                t.finish_reason = "length"
                continue
            reqs.append((i, (t.tokens, replace(params, max_tokens=min(params.max_tokens, room)))))
        outs = complete(engine, [r for _, r in reqs])
        active = []
        for (i, _), out in zip(reqs, outs):
            t = trajs[i]
            t.add_sampled(out)
            message, text = parse_turn(tokenizer, out.token_ids, out.finish_reason, t.task.thinking_mode)
            t.text += text
            step = env(t.task, message)
            if step is None or turn + 1 == max_turns:
                t.answer = message["content"] if message is not None and not message["tool_calls"] else ""
                continue
            message, results = step
            suffix = tokenizer.encode(tool_suffix(t.messages, message, results, t.task.thinking_mode))
            if len(t.tokens) + len(suffix) >= limit:  # no room to sample after the results: the
                t.finish_reason = "length"            # trajectory ends here, within the context
                continue
            t.messages += [message] + [{"role": "tool", "content": r} for r in results]
            t.add_forced(suffix)
            active.append(i)
    return trajs


# ---- replay in the trainer ----


@dataclass
class Batch:
    """Trajectories padded to one length: inputs [B, S] predict targets [B, S] (tokens shifted)."""
    inputs: torch.Tensor          # [B, S]
    targets: torch.Tensor         # [B, S]
    action: torch.Tensor          # [B, S] bool: the target was sampled by the policy
    logp_old: torch.Tensor        # [B, S] fp32: the engine's log-prob of the target
    keep: KeptSets                # kept sets of the N_action sampled targets (row-major order)
    experts: list | None          # per MoE layer [B*S, k]: the recorded routes of each input position
    selection: torch.Tensor | None = None  # [B, S, layers, index_topk] packed key sets of each input position


def pack(trajs: list[Trajectory], pad_id: int = 0, device=None) -> Batch:
    """Pad right (causal attention and per-token routing keep padding out of every real position)."""
    s = max(len(t.tokens) for t in trajs) - 1
    b = len(trajs)
    tok = torch.full((b, s + 1), pad_id, dtype=torch.long)
    action = torch.zeros(b, s + 1, dtype=torch.bool)
    logp_old = torch.zeros(b, s + 1)
    kept = []
    for i, t in enumerate(trajs):
        n = len(t.tokens)
        tok[i, :n] = torch.tensor(t.tokens)
        action[i, :n] = torch.tensor(t.action)
        logp_old[i, :n] = torch.tensor(t.logprobs)
        kept += [k for k, a in zip(t.kept, t.action) if a]
    experts = None
    # a trajectory that sampled nothing (its prompt filled the context) carries no loss and needs no routes
    recorded = [t.experts is not None or not any(t.action) for t in trajs]
    if not all(recorded) and any(t.experts is not None for t in trajs):  # never drop Keep Routing silently
        raise ValueError(f"trajectory {recorded.index(False)} has no recorded expert routes while others do")
    routed = [t for t in trajs if t.experts is not None]
    if routed and all(recorded):
        layers, k = routed[0].experts.shape[1:]
        # padding positions route to experts 0..k-1: their outputs are never read
        e = torch.arange(k, dtype=torch.long).expand(b, s, layers, k).clone()
        for i, t in enumerate(trajs):
            if t.experts is not None:
                n = min(len(t.experts), s)
                e[i, :n] = t.experts[:n].long()
        experts = [e[:, :, layer].reshape(b * s, k).to(device) for layer in range(layers)]
    return Batch(tok[:, :-1].to(device), tok[:, 1:].to(device), action[:, 1:].to(device),
                 logp_old[:, 1:].to(device), kept_sets(kept, device), experts, _pack_selection(trajs, s, device))


def _pack_selection(trajs: list[Trajectory], s: int, device) -> torch.Tensor | None:
    """[B, S, layers, k] packed key sets of every input position: the recorded ones from position
    k on, all causal keys before it (what any top-k of fewer than k keys selects) and at padding."""
    recorded = [t.selection for t in trajs if t.selection is not None]
    if not recorded:  # no position of any trajectory had more than index_topk keys
        return None
    layers, k = recorded[0].shape[1:]
    for i, t in enumerate(trajs):
        need = min(len(t.tokens) - 1, s) - k
        have = 0 if t.selection is None else len(t.selection)
        if any(t.action) and have < need:  # never drop Keep Selection silently
            raise ValueError(f"trajectory {i} has recorded key selections for {have} of its {need} "
                             f"positions past index_topk={k}")
    sel = all_keys_selection(torch.arange(s), k)[:, None].expand(s, layers, k)          # [S, layers, k]
    sel = sel.to(packed_dtype(recorded)).expand(len(trajs), s, layers, k).clone()
    for i, t in enumerate(trajs):
        if t.selection is not None:
            n = max(0, min(len(t.selection), s - k))
            sel[i, k:k + n] = t.selection[:n].to(sel.dtype)
    return sel.to(device)


def replay_logprobs(model, batch: Batch, temperature: float, keep_routing: bool = True,
                    keep_sampling_mask: bool = True, keep_selection: bool = True, autocast=None,
                    batch_invariant: bool = False) -> torch.Tensor:
    """log pi_theta of every target [B, S] (0 where not sampled), as the trainer computes it:
    the same model code as the engine, DSA on, routes forced to the rollout's (Keep Routing, gate
    weights recomputed over them), each layer attending to the keys the engine's indexer selected
    (Keep Selection) and logits outside the kept sets at -inf (Keep Sampling Mask).
    batch_invariant: the engine's batch-invariant arithmetic (EngineConfig.batch_invariant:
    absorbed MQA, fixed key sets, tiled GEMMs, the sampler's log-softmax), so that its log-probs
    come back bit for bit."""
    forced = batch.experts if keep_routing else None
    keys = batch.selection if keep_selection else None
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False), \
            bi_mode() if batch_invariant else nullcontext():
        logits = model(batch.inputs, sparse=True, mode="mqa" if batch_invariant else "mha", forced_experts=forced,
                       forced_topk=keys, batch_invariant=batch_invariant).logits                 # [B, S, V]
    sel = logits[batch.action]                                                                 # [N, V]
    lp = (token_logprobs_as_sampled if batch_invariant else token_logprobs)(
        sel, batch.targets[batch.action], temperature, batch.keep if keep_sampling_mask else None)
    out = torch.zeros(batch.action.shape, dtype=lp.dtype, device=lp.device)
    return out.masked_scatter(batch.action, lp)
