"""The agent loop: the model thinks, calls tools, reads their results and answers (spec §3-§4).

One step is one model call. A reply with tool calls has them run in order (parallel calls in one
block each get their result, in the order they were written), the results are appended in the
V3.2 format, and the model continues its turn with its reasoning still in view: reasoning is
dropped only at a new user message (spec §3.1; `encode_messages` renders that rule, and the
in-process policy keeps the sampled tokens themselves). A reply without tool calls is the answer.

Nothing raises out of the loop: an unknown tool, bad arguments or a failing tool become "error:"
results the model reads; a reply that does not parse, a budget spent, a context that no longer
fits or a policy that fails end the run with that reason recorded (`Episode.end`, `.error`).

The log (`Episode.log`) is everything that happened and is never edited; context management
(`dsv32.agent.context`, spec §4) adds events to it, and the model's view is derived from it.

Episodes can run side by side (`run_many`, and parallel-fewest-step's attempts): each in a worker
thread with its own fork of the policy and its own tools. With an `EnginePolicy` over a
`dsv32.engine.SharedEngine` their model calls join one running batch; a seeded episode samples
the same tokens as it would alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial

from dsv32.agent.context import STRATEGIES, SUMMARY_REQUEST, TRIGGER, apply, fewest_steps, split, triggered, view
from dsv32.agent.policy import Policy, Reply
from dsv32.agent.tool import Tool
from dsv32.engine import SamplingParams
from dsv32.rl.rollout import Trajectory

log = logging.getLogger(__name__)

END_REASONS = ("answer", "max_steps", "max_tokens", "max_tool_calls", "context", "length", "bad_reply", "policy_error",
               "tool_setup")
MANAGED = ("summary", "discard-75", "discard-all")   # strategies that act at the trigger
LIMITS = {"length": "max_tokens per call", "context": "the end of the context window", "max_tokens": "the token budget"}


@dataclass
class AgentConfig:
    max_steps: int = 100                 # model calls, Summary calls included
    max_tokens: int | None = None        # tokens the model may write over the whole run (None: no limit)
    max_tool_calls: int | None = None    # tool calls run over the whole run (None: no limit)
    context_strategy: str = "none"       # one of context.STRATEGIES
    trigger: float = TRIGGER             # share of the context window that triggers management (§4: 80%)
    attempts: int = 4                    # parallel-fewest-step's N (the paper does not give it)

    def __post_init__(self):
        if self.context_strategy not in STRATEGIES:
            raise ValueError(f"context_strategy must be one of {', '.join(STRATEGIES)}, got {self.context_strategy!r}")
        if self.max_steps < 1 or self.attempts < 1 or not 0 < self.trigger <= 1:
            raise ValueError("max_steps and attempts must be >= 1 and trigger in (0, 1]")


@dataclass
class Step:
    kind: str                   # "model", or "summary" (the call that writes a Summary)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    text: str                   # what the model wrote
    error: str | None = None    # why it does not parse


@dataclass
class Episode:
    log: list[dict]                                   # messages and context events, never edited
    steps: list[Step] = field(default_factory=list)
    end: str | None = None                            # one of END_REASONS
    answer: str | None = None
    error: str | None = None
    tool_calls: int = 0
    segments: list[Trajectory] = field(default_factory=list)  # EnginePolicy: the token record, one
                                                      # trajectory per contiguous token context
    attempts: list[Episode] = field(default_factory=list)     # parallel-fewest-step: all, this one included
    sampling: SamplingParams | None = None            # what it sampled with (a seed: call k uses seed + k)

    def view(self) -> list[dict]:
        """What the model sees next: the log with its context events applied."""
        return view(self.log)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.steps)

    @property
    def total_steps(self) -> int:
        """Every model call the run made, over all attempts (what Figure 6 counts as real steps)."""
        return sum(len(a.steps) for a in self.attempts) if self.attempts else len(self.steps)

    def to_json(self) -> dict:
        """Everything but the token record (`segments`, tensors), as JSON-ready values."""
        out = {"end": self.end, "answer": self.answer, "error": self.error, "tool_calls": self.tool_calls,
               "steps": [asdict(s) for s in self.steps], "log": self.log,
               "sampling": asdict(self.sampling) if self.sampling else None}
        if self.attempts:  # the kept one stands for itself in the list
            out["attempts"] = [{"kept": True} if a is self else a.to_json() for a in self.attempts]
        return out


class AgentLoop:
    """Run tasks with a policy and tools. `tools` is a list, or a function making a fresh list per
    episode (independent attempts need their own sandbox and browser; those are closed after).
    `on_event(kind, data)` sees each "step", "tool_call", "tool_result", "context", "attempt" and
    "end" as it happens, with the episode's "task" (its index in run_many) and "attempt" in data;
    when episodes run side by side it is called from their worker threads."""

    def __init__(self, policy: Policy, tools: list[Tool] | Callable[[], list[Tool]],
                 sampling: SamplingParams | None = None, config: AgentConfig | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
        self.policy, self.tools = policy, tools
        self.sampling, self.config = sampling or SamplingParams(max_tokens=4096), config or AgentConfig()
        self.on_event = on_event or (lambda kind, data: None)

    def run(self, task: str | list[dict], workers: int = 1) -> Episode:
        """One task (a user message, or a conversation ending in one) to its end; with
        parallel-fewest-step, `workers` of its attempts run at once (see run_many)."""
        return self.run_many([task], workers)[0]

    def run_many(self, tasks: list[str | list[dict]], workers: int = 1) -> list[Episode]:
        """Tasks to their ends, the episodes in task order. Up to `workers` episodes run at once
        (each attempt of parallel-fewest-step is one), each in a worker thread with its own
        `policy.fork()` (so workers > 1 needs a policy that has one) and, when `tools` is a
        factory, its own tools; a list of tools is shared by the episodes running at once. Seeds
        are per task and attempt as in `run`, so a seeded episode samples what it would alone."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if workers > 1 and not callable(getattr(self.policy, "fork", None)):
            raise ValueError(f"running episodes side by side (workers > 1) needs a policy with fork(); "
                             f"{type(self.policy).__name__} has none")
        attempts = self._samplings()
        jobs = [(t, k) for t in range(len(tasks)) for k in range(len(attempts))]
        messages = [[{"role": "user", "content": task}] if isinstance(task, str) else list(task) for task in tasks]

        def one(job: tuple[int, int]) -> Episode:
            t, k = job
            policy = self.policy if workers == 1 else self.policy.fork()
            emit = partial(self._emit, t, k)
            if self.config.context_strategy == "parallel-fewest-step":
                emit("attempt", {"index": k})
            return self._episode(messages[t], attempts[k], policy, emit)

        if workers == 1:
            episodes = [one(job) for job in jobs]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="dsv32-agent") as pool:
                episodes = list(pool.map(one, jobs))
        if self.config.context_strategy != "parallel-fewest-step":
            return episodes
        return [self._fewest(episodes[i:i + len(attempts)]) for i in range(0, len(episodes), len(attempts))]

    def _emit(self, task: int, attempt: int, kind: str, data: dict) -> None:
        self.on_event(kind, {**data, "task": task, "attempt": attempt})

    def _samplings(self) -> list[SamplingParams]:
        """What each episode of a task samples with: one, or one per independent attempt."""
        if self.config.context_strategy != "parallel-fewest-step":
            return [self.sampling]
        seed = self.sampling.seed
        return [replace(self.sampling, seed=None if seed is None else seed + 100_003 * i)
                for i in range(self.config.attempts)]

    @staticmethod
    def _fewest(attempts: list[Episode]) -> Episode:
        """§4 Parallel-fewest-step: the answered attempt with the fewest steps (else the first),
        holding all of them."""
        best = fewest_steps([len(a.steps) for a in attempts], [a.end == "answer" for a in attempts])
        chosen = attempts[best if best is not None else 0]
        chosen.attempts = attempts
        return chosen

    def _episode(self, messages: list[dict], sampling: SamplingParams, policy: Policy,
                 emit: Callable[[str, dict], None]) -> Episode:
        ep = Episode(list(messages), sampling=sampling)
        try:
            tools = self.tools() if callable(self.tools) else self.tools
        except Exception as e:  # e.g. a sandbox that cannot start
            self._end(ep, "tool_setup", f"{type(e).__name__}: {e}")
            tools = []
        try:
            if ep.end is None:
                self._loop(ep, {t.name: t for t in tools}, policy, emit)
        finally:
            if callable(self.tools):
                for t in tools:
                    try:
                        t.close()
                    except Exception:  # the episode is over; its result stands
                        log.exception("closing tool %s failed", t.name)
        emit("end", {"episode": ep})
        return ep

    def _loop(self, ep: Episode, tools: dict[str, Tool], policy: Policy, emit: Callable[[str, dict], None]) -> None:
        schemas = [t.schema() for t in tools.values()]
        while ep.end is None:
            messages = ep.view()
            if self.config.context_strategy in MANAGED:
                messages = self._manage(ep, messages, schemas, policy, emit)
                if ep.end is not None:
                    return
            reply = self._call(ep, messages, schemas, "model", policy, emit)
            if reply is None:
                return
            n = len(ep.steps)
            calls = [{**c, "id": c.get("id") or f"call_{n}_{i}"} for i, c in enumerate(reply.message["tool_calls"])]
            ep.log.append({**reply.message, "tool_calls": calls})
            if not calls:
                ep.end, ep.answer = "answer", reply.message["content"]
                return
            self._run_tools(ep, calls, tools, emit)

    def _call(self, ep: Episode, messages: list[dict], schemas: list[dict], kind: str, policy: Policy,
              emit: Callable[[str, dict], None]) -> Reply | None:
        """One model call within the budgets; None when the run ends instead (reason recorded)."""
        cfg, window = self.config, policy.context_window
        if len(ep.steps) >= cfg.max_steps:
            return self._end(ep, "max_steps")
        left = None if cfg.max_tokens is None else cfg.max_tokens - ep.completion_tokens
        if left is not None and left <= 0:
            return self._end(ep, "max_tokens")
        try:
            prompt = policy.count(messages, schemas)
            limits = {"length": ep.sampling.max_tokens, "context": window - prompt}
            if left is not None:
                limits["max_tokens"] = left
            cut = min(limits, key=limits.get)   # the limit that ends a reply cut short
            if limits["context"] < 1:
                return self._end(ep, "context", f"the prompt has {prompt} tokens; the context window is {window}")
            seed = None if ep.sampling.seed is None else ep.sampling.seed + len(ep.steps)  # no call repeats another
            reply = policy(messages, schemas, replace(ep.sampling, max_tokens=limits[cut], seed=seed))
        except Exception as e:  # a policy failure ends the run, recorded
            return self._end(ep, "policy_error", f"{type(e).__name__}: {e}")
        step = Step(kind, reply.prompt_tokens, reply.completion_tokens, reply.finish_reason, reply.text, reply.error)
        ep.steps.append(step)
        if reply.segment is not None and all(s is not reply.segment for s in ep.segments):
            ep.segments.append(reply.segment)
        emit("step", {"index": len(ep.steps), "step": step, "message": reply.message})
        if reply.finish_reason == "length":
            return self._end(ep, cut, f"the reply was cut at {limits[cut]} tokens ({LIMITS[cut]})")
        if reply.message is None:
            return self._end(ep, "bad_reply", reply.error)
        return reply

    def _manage(self, ep: Episode, messages: list[dict], schemas: list[dict], policy: Policy,
                emit: Callable[[str, dict], None]) -> list[dict]:
        """Apply the context strategy when the next call would pass the trigger; the new view."""
        strategy, window = self.config.context_strategy, policy.context_window
        try:
            prompt = policy.count(messages, schemas)
        except Exception as e:
            self._end(ep, "policy_error", f"{type(e).__name__}: {e}")
            return messages
        if not triggered(prompt, ep.sampling.max_tokens, window, self.config.trigger) or not split(messages)[1]:
            return messages  # under the trigger, or no tool history to manage
        event = {"role": "context", "strategy": strategy, "step": len(ep.steps),
                 "tokens": prompt + ep.sampling.max_tokens}
        if strategy == "summary":  # a model call, so a step
            reply = self._call(ep, messages + [{"role": "user", "content": SUMMARY_REQUEST}], schemas, "summary",
                               policy, emit)
            if reply is None:
                return messages
            event["summary"] = reply.message["content"].strip() or reply.message["reasoning_content"].strip()
        ep.log.append(event)
        emit("context", {"event": event, "window": window})
        return apply(event, messages)

    def _run_tools(self, ep: Episode, calls: list[dict], tools: dict[str, Tool],
                   emit: Callable[[str, dict], None]) -> None:
        """Each call in order, each result appended; past the tool-call budget the rest get an
        error result and the run ends."""
        limit, over = self.config.max_tool_calls, False
        for call in calls:
            emit("tool_call", {"call": call})
            if limit is not None and ep.tool_calls >= limit:
                result, over = f"error: the budget of {limit} tool calls is spent", True
            else:
                result = run_tool(tools, call)
                ep.tool_calls += 1
            ep.log.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            emit("tool_result", {"call": call, "result": result})
        if over:
            self._end(ep, "max_tool_calls")

    def _end(self, ep: Episode, reason: str, error: str | None = None) -> None:
        ep.end, ep.error = reason, error


def run_tool(tools: dict[str, Tool], call: dict) -> str:
    """The result of one parsed tool call; every failure is an "error:" result."""
    name = call["function"]["name"]
    tool = tools.get(name)
    if tool is None:
        return f"error: there is no tool {name!r}; the tools are: {', '.join(tools) or 'none'}"
    try:
        return str(tool(call["function"]["arguments"]))
    except Exception as e:  # Tool.__call__ returns its failures; this is a tool outside that contract
        return f"error: {name} failed: {type(e).__name__}: {e}"
