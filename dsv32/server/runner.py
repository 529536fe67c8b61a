"""The engine thread.

One thread owns the `Engine` and loops `step()`; nothing else touches it. The event loop hands it
requests and aborts through a thread-safe inbox; each request gets what each step gave it (the
engine's StepOutput, as a Delta) on its own asyncio queue (fed with `call_soon_threadsafe`). Text
is made on the event loop's side (app.py, through tokenizer.Detokenizer), which aborts a request
once a stop string ends its text. A step that raises fails the requests it was running, not the
process.
"""

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass, field

from dsv32.engine import StepOutput
from dsv32.model import ContextLengthError

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Too many requests are already waiting for the engine, or the server is shutting down."""


SHUTTING_DOWN = "server_shutting_down"  # the code of the error that ends requests cut off by a shutdown


class RequestFailed(Exception):
    """The engine could not serve a request; `client_error` when the request itself is at fault
    (too long for the context or the cache, a bad token id)."""

    def __init__(self, message: str, client_error: bool, code: str | None = None):
        super().__init__(message)
        self.client_error, self.code = client_error, code


@dataclass
class Delta:
    """What one request gained in one engine step."""
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list                     # per token: [(id, logprob)], empty if not asked for
    finish_reason: str | None = None
    prompt_len: int = 0
    num_cached: int = 0
    error: RequestFailed | None = None


@dataclass
class Stream:
    """A request's handle on the event-loop side."""
    request_id: str
    loop: asyncio.AbstractEventLoop
    prompt_len: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False               # has it had a delta (its prompt computed)? engine thread only

    def put(self, delta: Delta) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    async def get(self) -> Delta:
        return await self.queue.get()


class EngineRunner:
    """Runs an Engine in one background thread; `submit` and `abort` may be called from any
    thread (normally the event loop)."""

    def __init__(self, engine, max_queue: int = 64):
        self.engine = engine
        self.max_active = engine.config.max_num_seqs + max_queue   # running + waiting
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, Stream] = {}                       # engine thread only
        self.lock, self.active = threading.Lock(), 0
        self.closing = False                                       # set by shut_down: no new requests
        self.thread = threading.Thread(target=self._loop, name="dsv32-engine", daemon=True)
        blocks = engine.scheduler.blocks
        # plain numbers the metrics endpoint reads; written by the engine thread only
        self.stats = {"requests_total": 0, "generation_tokens_total": 0, "prompt_tokens_total": 0,
                      "prefix_cache_hit_tokens_total": 0, "running": 0, "waiting": 0,
                      "preemptions_total": 0, "cache_blocks_free": blocks.num_free,
                      "cache_blocks_total": len(blocks.ref)}

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(("stop",))
        self.thread.join(timeout=30)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def shut_down(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests and end every one in flight with an error (code SHUTTING_DOWN): the
        end of a graceful shutdown's grace period. Any thread."""
        self.closing = True
        self.inbox.put(("shutdown", reason))

    def submit(self, prompt: list[int], params) -> Stream:
        """Queue a request; raise Overloaded if max_num_seqs + max_queue are already in flight."""
        with self.lock:
            if self.closing:
                raise Overloaded("the server is shutting down")
            if self.active >= self.max_active:
                raise Overloaded(f"{self.active} requests in flight; try again later")
            self.active += 1
        stream = Stream(f"req-{uuid.uuid4().hex}", asyncio.get_running_loop(), len(prompt))
        self.inbox.put(("add", stream, prompt, params))
        return stream

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    # ---- engine thread ----
    def _loop(self) -> None:
        while True:
            try:
                msg = self.inbox.get(block=not self.engine.has_work())
            except queue.Empty:
                msg = None
            if msg is not None and msg[0] == "stop":
                break
            try:
                if msg is not None:
                    self._handle(msg)
                    continue  # take everything queued before stepping
                for out in self.engine.step():
                    self._publish(out)
                self._update_stats()
            except Exception as e:
                log.exception("engine step failed; failing the requests it was running")
                self._fail_all(RequestFailed(f"engine error: {e}", client_error=False))

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "add":
            _, stream, prompt, params = msg
            try:
                self.engine.add_request(prompt, params, stream.request_id)
            except Exception as e:  # ValueError: too long for the context, bad token ids
                code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
                failure = RequestFailed(str(e), isinstance(e, ValueError), code)
                stream.put(Delta([], [], [], "error", error=failure))
                self._release()
                return
            self.streams[stream.request_id] = stream
            self.stats["requests_total"] += 1
        elif msg[0] == "shutdown":
            self._fail_all(RequestFailed(msg[1], client_error=False, code=SHUTTING_DOWN))
        elif msg[0] == "abort":
            self.engine.abort(msg[1])
            if self.streams.pop(msg[1], None) is not None:
                self._release()
        self._update_stats()

    def _publish(self, out: StepOutput) -> None:
        stream = self.streams.get(out.request_id)
        if stream is None:
            return
        error = None
        if out.finish_reason == "error":  # the scheduler refused it (too large for the cache), or its sampling failed
            error = RequestFailed(out.error or "the request cannot be served", client_error=not out.error_internal)
        if not stream.started and error is None:
            stream.started = True
            self.stats["prompt_tokens_total"] += stream.prompt_len
            self.stats["prefix_cache_hit_tokens_total"] += out.num_cached_tokens
        stream.put(Delta(out.token_ids, out.logprobs, out.top_logprobs, out.finish_reason, stream.prompt_len,
                         out.num_cached_tokens, error))
        self.stats["generation_tokens_total"] += len(out.token_ids)
        if out.finish_reason is not None:
            del self.streams[out.request_id]
            self._release()

    def _fail_all(self, error: RequestFailed) -> None:
        for rid in list(self.engine.seqs):
            self.engine.abort(rid)
        for stream in self.streams.values():
            stream.put(Delta([], [], [], "error", error=error))
            self._release()
        self.streams.clear()
        self._update_stats()

    def _release(self) -> None:
        with self.lock:
            self.active -= 1

    def _update_stats(self) -> None:
        sched = self.engine.scheduler
        self.stats.update(running=len(sched.running), waiting=len(sched.waiting),
                          preemptions_total=sched.num_preemptions, cache_blocks_free=sched.blocks.num_free)

