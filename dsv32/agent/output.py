"""CappedOutput: a tool's output, kept to a character budget as it streams in.

A command that prints gigabytes must not reach the model's context (or this process's memory), but
the end of an output is often what matters (the exception under a long log), so the head and the
tail are kept and the middle is replaced by one marker that says how much was dropped.
"""

from __future__ import annotations

import codecs


class CappedOutput:
    """Text appended piece by piece; `text()` is at most `limit` characters plus the marker.

    Two thirds of the budget go to the head, one third to the tail. Bytes are decoded as UTF-8
    incrementally, so a character split across two reads is not garbled."""

    def __init__(self, limit: int):
        self.limit = limit
        self.head_limit = limit - limit // 3
        self.tail_limit = limit // 3
        self.head = ""
        self.tail = ""
        self.dropped = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, text: str) -> None:
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += text[:room]
            text = text[room:]
        if not text:
            return
        self.tail += text
        if len(self.tail) > self.tail_limit:
            cut = len(self.tail) - self.tail_limit
            self.dropped += cut
            self.tail = self.tail[cut:]

    def add_bytes(self, data: bytes, final: bool = False) -> None:
        self.add(self._decoder.decode(data, final))

    def text(self) -> str:
        if not self.dropped:
            return self.head + self.tail
        return f"{self.head}\n... [truncated: {self.dropped:,} more characters] ...\n{self.tail}"
