"""The agent's sandboxed tools behind the chat server (`dsv32 serve --agent-tools python,bash,search`).

Off by default. When on, each browser conversation (an id the page makes up and sends) gets its own
set of tools: for python and bash, one bubblewrap sandbox with its own work directory, as one
`dsv32 agent` episode does (the tools are built by the agent CLI's `tool_factory`). A conversation's
tools are closed, and its directory removed, after `idle_s` without a call, when a new conversation
needs its place (at most `max_conversations` live; the least recently used one that is not running
goes), and at shutdown. Calls of one conversation run one at a time (the python kernel is stateful),
in a worker thread.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsv32.agent.cli import tool_factory
from dsv32.agent.corpus import Corpus
from dsv32.agent.sandbox import Sandbox
from dsv32.agent.tool import Tool

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolsFull(Exception):
    """Every conversation slot holds a conversation whose tool is running."""


@dataclass
class Conversation:
    tools: dict[str, Tool]
    sandboxes: list[Sandbox]
    lock: threading.Lock = field(default_factory=threading.Lock)
    last: float = field(default_factory=time.monotonic)
    running: int = 0

    def close(self) -> None:
        for tool in self.tools.values():
            try:
                tool.close()
            except Exception:  # closing one must not keep the others open
                pass
        for box in self.sandboxes:
            box.remove()


class AgentTools:
    """The tools `names` (checked beforehand with `dsv32.agent.cli.check_tools`), one set per
    conversation, under a temporary root of their own."""

    def __init__(self, names: list[str], corpus: Corpus | None = None, *, unsafe: bool = False,
                 idle_s: float = 1800.0, max_conversations: int = 16):
        self.names, self.corpus, self.unsafe = list(names), corpus, unsafe
        self.idle_s, self.max_conversations = idle_s, max_conversations
        self.root = Path(tempfile.mkdtemp(prefix="dsv32-web-tools-"))
        self.conversations: dict[str, Conversation] = {}
        self.lock = threading.Lock()
        conv = self._make()  # a first set, for the schemas (a python kernel starts on its first call only)
        try:
            self._schemas = [t.schema() for t in conv.tools.values()]
        finally:
            conv.close()

    def schemas(self) -> list[dict]:
        return self._schemas

    def _make(self) -> Conversation:
        sandboxes: list[Sandbox] = []
        tools = tool_factory(self.names, self.root, self.corpus, self.unsafe, sandboxes)()
        return Conversation({t.name: t for t in tools}, sandboxes)

    def has(self, name: str) -> bool:
        return any(s["function"]["name"] == name for s in self.schemas())

    def _sweep(self, now: float) -> list[Conversation]:
        """Take out the conversations idle too long (under self.lock); the caller closes them."""
        old = [k for k, c in self.conversations.items() if not c.running and now - c.last > self.idle_s]
        return [self.conversations.pop(k) for k in old]

    def conversation(self, cid: str) -> Conversation:
        """The conversation's tools, made on first use; it counts as running until `release`."""
        now = time.monotonic()
        closing: list[Conversation] = []
        with self.lock:
            closing += self._sweep(now)
            conv = self.conversations.get(cid)
            if conv is None:
                if len(self.conversations) >= self.max_conversations:
                    idle = [k for k, c in self.conversations.items() if not c.running]
                    if not idle:
                        raise ToolsFull(f"all {self.max_conversations} tool conversations are running a tool")
                    closing.append(self.conversations.pop(min(idle, key=lambda k: self.conversations[k].last)))
                conv = self.conversations[cid] = self._make()
            conv.running += 1
            conv.last = now
        for c in closing:
            c.close()
        return conv

    def release(self, conv: Conversation) -> None:
        with self.lock:
            conv.running -= 1
            conv.last = time.monotonic()

    def call(self, cid: str, name: str, arguments: dict | str) -> str:
        """Run one tool call of conversation `cid` (blocking: call it from a worker thread)."""
        conv = self.conversation(cid)
        try:
            with conv.lock:
                return conv.tools[name](arguments)
        finally:
            self.release(conv)

    def close(self) -> None:
        with self.lock:
            convs, self.conversations = list(self.conversations.values()), {}
        for c in convs:
            c.close()
        shutil.rmtree(self.root, ignore_errors=True)
