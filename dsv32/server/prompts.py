"""PromptEncoder: chat prompts rendered and tokenised off the event loop; long ones in a child
process.

A prompt of megabytes takes seconds to tokenise, and the tokenizers library makes millions of
native allocations for it (a string per token). In a worker thread of the server the tokenising
itself releases the GIL, but building and freeing its result do not, which stalls the event loop
(/health, every stream) for up to a second, and glibc keeps the freed memory in that thread's
malloc arena (~200 MB left behind per 5 MB prompt). So a prompt past `min_chars` is rendered and
tokenised in one child process, which hands back at most `limit` ids, or only the count of a
prompt that is longer; shorter prompts take a worker thread.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from dsv32.server.middleware import malloc_trim
from dsv32.tokenizer import LONG_TEXT, TooManyTokens

_tokenizer = None  # the child's
_trim = malloc_trim()


def _init(tokenizer) -> None:
    global _tokenizer
    _tokenizer = tokenizer
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """End this child when the server that spawned it is gone (killed, or shut down while this
    child was still tokenising a big prompt): it is then reparented, and nothing else would stop it."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(0)


def _render(tokenizer, messages, mode, tools, response_format, prefill, limit):
    """The prompt's ids, or ("too many", n) for one of n > limit tokens (an exception would carry
    its traceback across)."""
    try:
        if messages is None:
            return tokenizer.encode(prefill, limit)
        ids = tokenizer.apply_chat_template(messages, thinking_mode=mode, tools=tools,
                                            response_format=response_format, limit=limit)
        return ids + tokenizer.encode(prefill) if prefill else ids
    except TooManyTokens as e:
        return ("too many", e.n_tokens)


def _render_in_child(*args):
    try:
        return _render(_tokenizer, *args)
    finally:  # hand what the tokenizer freed back to the system
        if _trim is not None:
            _trim(0)


class PromptEncoder:
    def __init__(self, tokenizer, min_chars: int = LONG_TEXT):
        self.tokenizer, self.min_chars = tokenizer, min_chars
        self.pool: ProcessPoolExecutor | None = None

    async def chat(self, messages: list[dict], mode: str, tools=None, response_format=None, prefill=None,
                   limit: int | None = None) -> list[int]:
        """apply_chat_template(messages, ...) plus the prefill's ids; TooManyTokens past limit;
        ChatFormatError as the tokenizer raises it."""
        size = sum(len(m.get("content") or "") + len(m.get("reasoning_content") or "") for m in messages
                   if isinstance(m.get("content") or "", str))
        return await self._run(size + len(prefill or ""), messages, mode, tools, response_format, prefill, limit)

    async def encode(self, text: str, limit: int | None = None) -> list[int]:
        """tokenizer.encode(text, limit), off the event loop."""
        return await self._run(len(text), None, None, None, None, text, limit)

    async def _run(self, size: int, *args) -> list[int]:
        if size <= self.min_chars:
            out = await asyncio.to_thread(_render, self.tokenizer, *args)
        else:
            try:
                out = await asyncio.get_running_loop().run_in_executor(self._pool(), _render_in_child, *args)
            except BrokenProcessPool:  # the child died (killed for memory?): a fresh one next time
                self.pool = None
                raise RuntimeError("the tokenizer process died while tokenising this prompt") from None
        if isinstance(out, tuple):
            raise TooManyTokens(out[1], args[-1])
        return out

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:  # spawned, not forked: the server has threads (the engine's, uvicorn's)
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init, initargs=(self.tokenizer,))
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
