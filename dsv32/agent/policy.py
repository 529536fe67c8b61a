"""The policy behind the agent loop: the model that writes the next assistant message.

Two kinds with one interface (`Policy`): given the messages the model sees, the tools and the
sampling settings, return the next assistant message as a `Reply`; `count` says how many prompt
tokens a call with those messages would take, and `context_window` how many fit.

`EnginePolicy` runs our engine in this process and works in token space, as RL rollouts do
(`dsv32.rl.rollout`, whose pieces it uses): a reply's tokens stay as they were sampled, and when
the next messages are the last call's plus its reply and that reply's tool results, the context
grows by the tool results as the chat format renders them, so the reasoning the model wrote is
kept token for token (spec §3.1: reasoning survives tool results). Any other messages (a new user
message, which drops the reasoning; a view that context management cut) start a new segment
from the messages' rendering. Each segment is a `dsv32.rl.Trajectory`: per token, sampled by the
model or forced by the environment, with the engine's log-probs, kept sets, expert ids and key
selections (`return_rl_data`), ready for `pack` and `replay_logprobs`. That record is one
episode's state, so an `EnginePolicy` serves one episode at a time; `fork()` makes another for
an episode beside it. Over a `SharedEngine` forks in different threads batch their calls into
the running batch; over a plain `Engine` their calls take turns (one lock per engine and its forks).

`OpenAIPolicy` talks to any OpenAI-compatible endpoint (`dsv32 serve`, vLLM, DeepSeek's API):
messages in, a message with `reasoning_content` and `tool_calls` out.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from dsv32.chat import ChatFormatError, encode_messages, parse_completion
from dsv32.engine import Engine, RequestOutput, SamplingParams, SharedEngine
from dsv32.rl.rollout import Trajectory, complete, new_trajectory, speaks_v32, tool_suffix
from dsv32.rl.tasks import Task


class PolicyError(RuntimeError):
    """The policy could not produce a reply (the loop records it as the run's end)."""


@dataclass
class Reply:
    message: dict | None                # {"role": "assistant", "content", "reasoning_content", "tool_calls"};
                                        # None when the reply does not parse
    text: str                           # what the model wrote (the engine's tokens decoded; an
                                        # endpoint's reasoning and content)
    finish_reason: str | None           # "stop", "length", ...
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None            # why message is None
    segment: Trajectory | None = None   # EnginePolicy: the token record this reply extended


class Policy(Protocol):
    """A policy that can serve episodes side by side also has `fork() -> Policy`: one more policy
    on the same model, with no episode state, safe to call from another thread."""
    context_window: int

    def count(self, messages: list[dict], tools: list[dict]) -> int: ...

    def __call__(self, messages: list[dict], tools: list[dict], sampling: SamplingParams) -> Reply: ...


def _turn(message: dict) -> tuple:
    """What identifies an assistant turn whatever extra fields a log adds (tool-call ids)."""
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    return message.get("content") or "", message.get("reasoning_content") or "", calls


class EnginePolicy:
    """Our engine in this process, in token space (see the module docstring): an `Engine`, or a
    `SharedEngine` to batch with other threads. One episode at a time; `fork()` for another.
    `record=False` skips the RL data (kept sets, expert ids, key selections) that replay needs."""

    def __init__(self, engine: Engine | SharedEngine, tokenizer, thinking_mode: str = "thinking",
                 record: bool = True):
        if not speaks_v32(tokenizer):
            raise ValueError("the agent loop needs a model with the V3.2 chat format (tools, thinking); this "
                             f"tokenizer's format is {getattr(tokenizer, 'chat_format', None)!r}")
        self.engine, self.tokenizer, self.thinking_mode, self.record = engine, tokenizer, thinking_mode, record
        self.context_window = engine.max_model_len
        self._turns = threading.Lock()           # a plain Engine serves one thread at a time (forks share it)
        self.segment: Trajectory | None = None   # the token context of the latest call
        self.reply: dict | None = None           # the message sampled there

    def fork(self) -> EnginePolicy:
        """A policy on the same engine and tokenizer with no episode state, for an episode that
        runs beside this one's (in another thread)."""
        other = copy.copy(self)
        other.segment = other.reply = None
        return other

    def _complete(self, request: tuple[list[int], SamplingParams]) -> RequestOutput:
        if isinstance(self.engine, SharedEngine):
            return self.engine.complete([request])[0]
        with self._turns:
            return complete(self.engine, [request])[0]

    def _context(self, messages: list[dict], tools: list[dict]) -> tuple[Trajectory | None, list[int]]:
        """(the segment that `messages` continue, the forced tokens that continue it) when they are
        the latest call's messages, its reply and the reply's tool results; else (None, the
        tokens of the messages' rendering)."""
        seg, reply = self.segment, self.reply
        if seg is not None and reply is not None and reply["tool_calls"]:
            n, rest = len(seg.messages), messages[len(seg.messages):]
            if (messages[:n] == seg.messages and len(rest) == 1 + len(reply["tool_calls"])
                    and _turn(rest[0]) == _turn(reply) and all(m["role"] == "tool" for m in rest[1:])):
                suffix = tool_suffix(seg.messages, reply, [m["content"] for m in rest[1:]], self.thinking_mode)
                return seg, self.tokenizer.encode(suffix)
        return None, self.tokenizer.apply_chat_template(messages, thinking_mode=self.thinking_mode, tools=tools)

    def count(self, messages: list[dict], tools: list[dict]) -> int:
        seg, ids = self._context(messages, tools)
        return len(ids) + (len(seg.tokens) if seg is not None else 0)

    def __call__(self, messages: list[dict], tools: list[dict], sampling: SamplingParams) -> Reply:
        seg, ids = self._context(messages, tools)
        context = seg.tokens + ids if seg is not None else ids
        room = self.context_window - len(context)
        if room < 1:
            raise PolicyError(f"the prompt has {len(context)} tokens; the context window is {self.context_window}")
        params = replace(sampling, max_tokens=min(sampling.max_tokens, room), return_rl_data=self.record)
        out = self._complete((context, params))
        if out.error is not None:
            raise PolicyError(f"the engine failed: {out.error}")
        if seg is None:
            seg = new_trajectory(Task("agent", list(messages), tools=tools, thinking_mode=self.thinking_mode), ids)
        else:
            seg.add_forced(ids)
            seg.messages += messages[len(seg.messages):]
        seg.add_sampled(out)
        text = self.tokenizer.decode(out.token_ids)
        seg.text += text
        message, error = None, None
        try:
            message = parse_completion(text, self.thinking_mode)
        except ChatFormatError as e:
            error = f"the reply does not parse: {e}"
        self.segment, self.reply = seg, message
        return Reply(message, text, out.finish_reason, len(context), len(out.token_ids), error, seg)


def _wire(message: dict) -> dict:
    """A message as OpenAI's API takes it: no empty tool-call list (rejected), no empty fields."""
    return {k: v for k, v in message.items() if v not in (None, []) and not (k == "reasoning_content" and not v)}


DEFAULT_WINDOW = 131072   # the paper's search-agent setting: 128K (spec §4)


class OpenAIPolicy:
    """An OpenAI-compatible endpoint. The model and its context window come from /v1/models when
    not given (`max_model_len`, as vLLM and `dsv32 serve` publish it; else 128K). Prompt tokens are
    counted by `count(messages, tools)` when given (e.g. a local tokenizer), else estimated as a
    quarter of the characters of the V3.2 rendering. Thinking is asked for with
    `chat_template_kwargs` (vLLM, SGLang, `dsv32 serve`); `extra_body` replaces that."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str = "none",
                 thinking_mode: str = "thinking", context_window: int | None = None,
                 count: Callable[[list[dict], list[dict]], int] | None = None, extra_body: dict | None = None,
                 timeout: float = 600.0, client=None):
        import openai  # the agent extra (and dev); only this policy needs it

        self.client = client or openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2)
        self.thinking_mode, self._count = thinking_mode, count
        self.extra_body = extra_body if extra_body is not None else {
            "chat_template_kwargs": {"thinking": thinking_mode == "thinking"}}
        if model is None or context_window is None:
            try:
                cards = self.client.models.list().data
            except openai.OpenAIError as e:
                raise PolicyError(f"cannot list the models at {base_url}: {e}") from None
            card = next((c for c in cards if model is None or c.id == model), None)
            if card is None:
                raise PolicyError(f"{base_url} serves no model {model!r}" if model else f"{base_url} serves no model")
            model = card.id
            context_window = context_window or (card.model_extra or {}).get("max_model_len") or DEFAULT_WINDOW
        self.model, self.context_window = model, context_window

    def fork(self) -> OpenAIPolicy:
        """This policy itself: it keeps no episode state, and its HTTP client serves many threads."""
        return self

    def count(self, messages: list[dict], tools: list[dict]) -> int:
        if self._count is not None:
            return self._count(messages, tools)
        try:
            text = encode_messages(messages, self.thinking_mode, tools=tools or None)
        except ChatFormatError:  # e.g. tool-call arguments that are not JSON: count their characters
            text = json.dumps([messages, tools], ensure_ascii=False)
        return -(-len(text) // 4)

    def __call__(self, messages: list[dict], tools: list[dict], sampling: SamplingParams) -> Reply:
        import openai  # see __init__

        kwargs = {"model": self.model, "messages": [_wire(m) for m in messages], "max_tokens": sampling.max_tokens,
                  "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.seed is not None:
            kwargs["seed"] = sampling.seed
        if tools:
            kwargs["tools"] = tools
        try:
            resp = self.client.chat.completions.create(**kwargs, extra_body=self.extra_body)
        except openai.OpenAIError as e:
            raise PolicyError(f"the endpoint failed: {e}") from None
        choice = resp.choices[0]
        m = choice.message
        reasoning = getattr(m, "reasoning_content", None) or (m.model_extra or {}).get("reasoning_content") or ""
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                              "arguments": c.function.arguments}}
                 for c in m.tool_calls or []]
        message = {"role": "assistant", "content": m.content or "", "reasoning_content": reasoning, "tool_calls": calls}
        finish = "stop" if choice.finish_reason == "tool_calls" else choice.finish_reason
        usage = resp.usage
        prompt = usage.prompt_tokens if usage else self.count(messages, tools)
        return Reply(message, reasoning + (m.content or ""), finish, prompt, usage.completion_tokens if usage else 0)
