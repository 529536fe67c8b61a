"""One engine, many threads: continuous batching for callers that block.

An `Engine` is driven by one thread at a time. `SharedEngine` gives it one driver thread that
steps it while it has work; any thread calls `complete(requests)`, which blocks until its
requests finish. Requests from different threads join the running batch at the next step (the
scheduler's continuous batching), so agent episodes or rollouts running side by side decode
together instead of one at a time.

`complete` keeps the contract of `dsv32.rl.rollout.complete`: one RequestOutput per request, in
order, each taken with `engine.output(seq)` at the step its request finishes, so the RL records
(log-probs, kept sets, expert ids, key selections with `return_rl_data`) are whole. A request the
engine refuses at admission (too long, bad token ids) raises in the caller, as there. A seeded
request samples from its own generator (`Engine.add_request`), so what it draws does not depend
on the requests beside it.

A step that raises fails the requests in flight (finish_reason "error", `.error` saying why), not
the process; the driver goes on with later requests. `close()` fails what is still in flight and
stops the thread. (The server's `EngineRunner` is the asyncio, streaming cousin of this class.)
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from dsv32.engine.engine import Engine, RequestOutput
from dsv32.engine.sampler import SamplingParams
from dsv32.engine.scheduler import Sequence

log = logging.getLogger(__name__)
_STOP = object()   # close()'s message to the driver


class EngineClosed(RuntimeError):
    """The shared engine was closed: it takes no more requests."""


@dataclass
class _Job:
    """One `complete` call: its requests, their outputs as they finish, and the caller's wake-up."""
    requests: list[tuple[list[int], SamplingParams]]
    outputs: list[RequestOutput | None] = field(init=False)
    left: int = field(init=False)
    error: BaseException | None = None       # raised in the caller (a request refused at admission)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.outputs, self.left = [None] * len(self.requests), len(self.requests)

    def finish(self, i: int, out: RequestOutput) -> None:
        self.outputs[i] = out
        self.left -= 1
        if self.left == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class SharedEngine:
    """An Engine stepped by one driver thread; `complete` may be called from any thread. `steps`
    and `max_batch` (the most requests that gained a token in one step) are written by the driver
    only. Use as a context manager, or call `close()`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.steps, self.max_batch = 0, 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock, self._closed = threading.Lock(), False
        self._active: dict[str, tuple[_Job, int, Sequence]] = {}    # driver thread only
        self._thread = threading.Thread(target=self._drive, name="dsv32-shared-engine", daemon=True)
        self._thread.start()

    def complete(self, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestOutput]:
        """Run (prompt ids, params) requests to their end, batched with whatever else is running,
        and return their outputs in order (see the module docstring)."""
        if not requests:
            return []
        job = _Job(list(requests))
        with self._lock:
            if self._closed:
                raise EngineClosed("the shared engine is closed")
            self._inbox.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.outputs

    def close(self) -> None:
        """Fail the requests still in flight and stop the driver thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(_STOP)
        self._thread.join()

    def __enter__(self) -> SharedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the driver thread ----
    def _drive(self) -> None:
        while True:
            try:
                msg = self._inbox.get(block=not self.engine.has_work())
            except queue.Empty:
                msg = None
            if msg is _STOP:
                self._fail_all("the shared engine was closed")
                return
            try:
                if msg is not None:
                    self._admit(msg)
                    continue  # take everything queued before stepping
                self._step()
            except Exception as e:  # a step that raises: fail what it ran, keep serving
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(f"the engine step failed: {type(e).__name__}: {e}")

    def _admit(self, job: _Job) -> None:
        seqs = []
        try:
            for ids, params in job.requests:
                seqs.append(self.engine.add_request(ids, params))
        except Exception as e:  # refused (too long, bad token ids): none of the job's requests run
            for seq in seqs:
                self.engine.abort(seq.request_id)
            job.fail(e)
            return
        for i, seq in enumerate(seqs):
            self._active[seq.request_id] = (job, i, seq)

    def _step(self) -> None:
        outs = self.engine.step()
        self.steps += 1
        self.max_batch = max(self.max_batch, sum(1 for o in outs if o.token_ids))
        for o in outs:
            if o.finish_reason is not None and o.request_id in self._active:
                job, i, seq = self._active.pop(o.request_id)
                job.finish(i, self.engine.output(seq))

    def _fail_all(self, error: str) -> None:
        for rid in list(self.engine.seqs):
            self.engine.abort(rid)
        for job, i, seq in self._active.values():
            job.finish(i, RequestOutput(seq.request_id, seq.tokens[:seq.prompt_len], [], "error", error=error))
        self._active.clear()
