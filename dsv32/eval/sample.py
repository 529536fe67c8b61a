"""Samplers: n completions per task, from our engine in process or from an OpenAI-compatible
endpoint. Both yield (task, [Sample]) as each task's samples are all done.

Stop strings end only the answer: in thinking mode a stop string written inside the reasoning
does not end the sample (the model may quote anything while it thinks); it is armed once
`</think>` has been written. So the engine is never given the user's stop strings: each request's
text is watched here and the request aborted at the first stop string of its answer part. An
endpoint does not know the rule either, so its texts are cut here after the fact.
"""

import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dsv32.chat import THINK_END
from dsv32.engine import LLM, SamplingParams
from dsv32.eval.tasks import Task
from dsv32.tokenizer import Detokenizer


@dataclass(frozen=True)
class Sample:
    text: str                 # the completion after the prompt: reasoning, </think>, answer
    finish_reason: str        # stop (end of reply or a stop string) or length
    num_tokens: int | None = None  # completion tokens where known


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 16
    thinking: bool = True
    temperature: float = 1.0   # the V3.2 evaluations sample at 1.0
    top_p: float = 1.0
    max_tokens: int = 32768
    stop: tuple[str, ...] = ()
    seed: int = 0


class AnswerStop:
    """A completion's text as it grows, watched for stop strings in its answer part only (all of
    it in chat mode, after `</think>` in thinking mode). Each piece is scanned once, with an
    overlap of a stop string's length, so a long reasoning costs no quadratic search."""

    def __init__(self, stop, thinking: bool):
        self.stop, self.thinking = [s for s in stop if s], thinking
        self.text = ""
        self.answer_start = None if thinking else 0
        self.scanned = 0          # the text before this has no stop string of the answer
        self.cut = False

    def feed(self, piece: str) -> bool:
        """Add piece; True once the answer holds a stop string (self.text then ends before it)."""
        if self.cut:
            return True
        before, self.text = len(self.text), self.text + piece
        if self.answer_start is None:
            end = self.text.find(THINK_END, max(0, before - len(THINK_END) + 1))
            if end == -1:
                return False
            self.answer_start = self.scanned = end + len(THINK_END)
        if not self.stop:
            return False
        start = max(self.answer_start, self.scanned - max(map(len, self.stop)) + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) != -1]
        self.scanned = len(self.text)
        if hits:
            self.text, self.cut = self.text[:min(hits)], True
        return self.cut


def sample_seed(cfg: SamplingConfig, task_id: str, j: int) -> int:
    """A seed per (task, sample): a resumed run draws the same samples for the tasks it has left."""
    return zlib.crc32(f"{cfg.seed}:{task_id}:{j}".encode())


class EngineSampler:
    """Samples through `dsv32.engine.LLM`: all requests queued at once, each task's n samples
    sharing its prompt's cached blocks (prefix caching)."""

    def __init__(self, llm: LLM):
        if llm.tokenizer is None:
            raise ValueError("evaluation needs the model's tokenizer (the model directory has no tokenizer.json)")
        self.llm = llm

    def sample(self, tasks: list[Task], cfg: SamplingConfig, progress=None) -> Iterator[tuple[Task, list[Sample]]]:
        engine, tok = self.llm.engine, self.llm.tokenizer
        mode = "thinking" if cfg.thinking else "chat"
        owner, texts, detoks, results = {}, {}, {}, {}  # texts: request id -> AnswerStop
        left = {t.id: cfg.n for t in tasks}
        for t in tasks:
            prompt = tok.apply_chat_template(t.messages, thinking_mode=mode)
            results[t.id] = [None] * cfg.n
            for j in range(cfg.n):
                params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                        seed=sample_seed(cfg, t.id, j), stop_token_ids=list(tok.stop_ids))
                rid = engine.add_request(prompt, params).request_id
                owner[rid], texts[rid], detoks[rid] = (t, j), AnswerStop(cfg.stop, cfg.thinking), Detokenizer(tok)
        counts = {rid: 0 for rid in owner}
        while engine.has_work():
            for out in engine.step():
                rid = out.request_id
                if rid not in owner:  # aborted at a stop string already
                    continue
                done = out.finish_reason is not None
                counts[rid] += len(out.token_ids)
                reason = out.finish_reason
                if texts[rid].feed(detoks[rid].feed(out.token_ids, final=done)):
                    reason = "stop"
                    if not done:
                        engine.abort(rid)
                        done = True
                if not done:
                    continue
                task, j = owner.pop(rid)
                results[task.id][j] = Sample(texts[rid].text, reason, counts[rid])
                if progress is not None:
                    progress.update(1)
                left[task.id] -= 1
                if left[task.id] == 0:
                    yield task, results.pop(task.id)


class EndpointSampler:
    """Samples through an OpenAI-compatible chat endpoint (ours: `dsv32 serve`; vLLM, SGLang,
    DeepSeek's API), one request per sample, `concurrency` at a time. Thinking is asked for with
    `thinking: true` and `chat_template_kwargs`; the reply's `reasoning_content` is the reasoning."""

    def __init__(self, base_url: str, model: str = "default", api_key: str = "none", concurrency: int = 8):
        from openai import OpenAI  # the `openai` client is needed only for endpoints

        self.client, self.model, self.concurrency = OpenAI(base_url=base_url, api_key=api_key), model, concurrency

    def _one(self, task: Task, cfg: SamplingConfig, j: int) -> Sample:
        extra = {"thinking": cfg.thinking, "chat_template_kwargs": {"thinking": cfg.thinking}}
        r = self.client.chat.completions.create(
            model=self.model, messages=task.messages, temperature=cfg.temperature, top_p=cfg.top_p,
            max_tokens=cfg.max_tokens, seed=sample_seed(cfg, task.id, j), extra_body=extra)
        choice = r.choices[0]
        content = choice.message.content or ""
        reasoning = getattr(choice.message, "reasoning_content", None) or ""
        if cfg.thinking:  # the thinking closed unless the budget ran out before any answer
            closed = content or choice.finish_reason != "length"
            text = reasoning + THINK_END + content if closed else reasoning
        else:
            text = content
        reason = choice.finish_reason or "stop"
        watch = AnswerStop(cfg.stop, cfg.thinking)
        if watch.feed(text):
            text, reason = watch.text, "stop"
        tokens = r.usage.completion_tokens if r.usage else None
        return Sample(text, reason, tokens)

    def sample(self, tasks: list[Task], cfg: SamplingConfig, progress=None) -> Iterator[tuple[Task, list[Sample]]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [(t, [pool.submit(self._one, t, cfg, j) for j in range(cfg.n)]) for t in tasks]
            for t, fs in futures:
                samples = []
                for f in fs:
                    samples.append(f.result())
                    if progress is not None:
                        progress.update(1)
                yield t, samples
