"""A policy that returns chosen replies, and small pure tools, for the loop and context tests."""

import copy
import json

from dsv32.agent.policy import Reply
from dsv32.agent.tool import Tool, ToolError
from dsv32.chat import encode_completion, encode_messages
from dsv32.rl.tasks import CALCULATOR, calculate


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def turn(reasoning: str = "", content: str = "", calls: list[dict] | None = None) -> dict:
    return {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": calls or []}


def rendered(messages: list[dict], tools: list[dict]) -> str:
    """The prompt text of a call: the oracle the loop's views are checked against."""
    return encode_messages(messages, "thinking", tools=tools or None)


class ScriptedPolicy:
    """Returns `replies` in order (a message dict, a Reply, or an exception to raise); counts one
    token per character of the V3.2 rendering; keeps every call's (messages, tools, sampling)."""

    def __init__(self, replies: list, context_window: int = 1_000_000):
        self.replies, self.context_window, self.seen = list(replies), context_window, []

    def count(self, messages, tools) -> int:
        return len(rendered(messages, tools))

    def __call__(self, messages, tools, sampling) -> Reply:
        self.seen.append((copy.deepcopy(messages), tools, sampling))
        r = self.replies.pop(0)
        if isinstance(r, Exception):
            raise r
        if isinstance(r, Reply):
            return r
        text = encode_completion(r)
        if len(text) > sampling.max_tokens:  # cut short, as a model would be
            return Reply(None, text[:sampling.max_tokens], "length", self.count(messages, tools), sampling.max_tokens)
        return Reply(r, text, "stop", self.count(messages, tools), len(text))

    def prompt(self, i: int) -> str:
        """The text the model saw at call i."""
        messages, tools, _ = self.seen[i]
        return rendered(messages, tools)


class Add(Tool):
    name = "add"
    description = "Add two integers."
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"]}

    def run(self, a: int, b: int) -> str:
        return str(a + b)


class Echo(Tool):
    name = "echo"
    description = "Return the text."
    parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    closed = 0

    def run(self, text: str) -> str:
        return text

    def close(self) -> None:
        Echo.closed += 1


class Fail(Tool):
    name = "fail"
    description = "Always fails."

    def run(self) -> str:
        raise ToolError("the disk is on fire")


class Calculator(Tool):
    name = "calculator"
    description = CALCULATOR["function"]["description"]
    parameters = CALCULATOR["function"]["parameters"]

    def run(self, expression: str) -> str:
        return calculate(expression)


def calc(expression: str) -> dict:
    return {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
