"""Scripted agents for the search-QA tests: Policies that return chosen replies (tool calls run
against the real browser over a multihop World corpus), and the replies a careful constructor and
verifier would write, built from the World's own mentor chain (the oracle)."""

import copy
import json

from dsv32.agent.corpus import Corpus
from dsv32.agent.multihop import QUESTION, World, mentor_line
from dsv32.agent.policy import Reply
from dsv32.chat import encode_completion, encode_messages


def tool(name: str, **arguments) -> dict:
    return {"role": "assistant", "reasoning_content": f"I call {name}.", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def final(content) -> dict:
    text = content if isinstance(content, str) else json.dumps(content)
    return {"role": "assistant", "reasoning_content": "Done.", "content": text, "tool_calls": []}


class Script:
    """Returns `replies` in order (a message, or an exception to raise, e.g. KeyboardInterrupt for
    a killed run); records every call's messages. One token per character of the rendering."""

    def __init__(self, replies: list, context_window: int = 1_000_000):
        self.replies, self.context_window, self.seen = list(replies), context_window, []

    def count(self, messages, tools) -> int:
        return len(encode_messages(messages, "thinking", tools=tools or None))

    def __call__(self, messages, tools, sampling) -> Reply:
        self.seen.append(copy.deepcopy(messages))
        if not self.replies:
            raise AssertionError("the script has no reply left for this call")
        r = self.replies.pop(0)
        if isinstance(r, BaseException):
            raise r
        text = encode_completion(r)
        return Reply(r, text, "stop", self.count(messages, tools), len(text))


class Dispatch:
    """One endpoint serving every role: the call goes to the script whose key opens the system
    prompt, else to `default` (the solvability attempts have no system prompt)."""

    def __init__(self, scripts: dict[str, Script], default: Script | None = None):
        self.scripts, self.default, self.context_window = scripts, default, 1_000_000

    def count(self, messages, tools) -> int:
        return 1

    def fork(self):
        return self

    def __call__(self, messages, tools, sampling) -> Reply:
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        script = next((s for key, s in self.scripts.items() if system.startswith(key)), self.default)
        return script(messages, tools, sampling)


def world_corpus(n_people: int = 30, seed: int = 3) -> tuple[World, Corpus]:
    world = World(n_people, seed=seed)
    return world, Corpus.build(world.documents, progress=False)


def url(person: str) -> str:
    return f"https://people.local/{person.replace(' ', '_')}"


def two_hops(world: World, start: str) -> tuple[str, str, list[dict]]:
    """(question, answer, evidence) of the two-hop question from start, from the World's chain."""
    a, b, c = world.chain(start, 2)
    evidence = [{"url": url(a), "quote": mentor_line(a, b)}, {"url": url(b), "quote": mentor_line(b, c)}]
    return QUESTION.format(start=a, hops=2), c, evidence


def constructor_replies(world: World, start: str, **override) -> list[dict]:
    """Search the entity, open its page, write the two-hop question (fields replaced by override)."""
    question, answer, evidence = two_hops(world, start)
    qa = {"question": question, "answer": answer, "evidence": evidence, **override}
    return [tool("search", query=start), tool("open", id=url(start)), final(qa)]


def verdict(label: str, evidence: list[dict], reason: str = "checked") -> list[dict]:
    """The verifier opens the first cited page, then gives its verdict."""
    opened = [tool("open", id=evidence[0]["url"])] if evidence else []
    return opened + [final({"verdict": label, "evidence": evidence, "reason": reason})]


def wrong_answer(world: World, start: str) -> str:
    """A name that is not the two-hop answer: the one-hop mentor."""
    return world.mentor[start]
