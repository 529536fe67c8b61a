"""The engine: scheduler -> model over the paged cache -> sampler, one step at a time, returning
what each request gained (StepOutput).

It speaks token ids only: text, and with it stop strings, lives at the edge that decodes the
tokens (`LLM`, the server, the terminal chat; tokenizer.Detokenizer), which aborts a request
once a stop string ends its text.

Prefill runs DSA in MLA's masked-MHA mode for short chunks (what DeepSeek serves short prefills
with) and in absorbed MQA mode beyond `mha_prefill_below`; decode always runs absorbed MQA + DSA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from dsv32.engine.cache import BlockManager, PagedCache
from dsv32.engine.config import EngineConfig
from dsv32.engine.graphs import DecodeGraphs
from dsv32.engine.sampler import Sample, SamplingParams, sample
from dsv32.engine.scheduler import Scheduler, Sequence, Status
from dsv32.model import ContextLengthError, Transformer
from dsv32.model.indexer import pack_selection, packed_dtype
from dsv32.model.moe import MoE

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one request gained in one engine step: its new tokens with their log-probs, and on its
    last step why it finished. A request's StepOutputs, concatenated, are its RequestOutput's."""
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list                     # per token: [(id, logprob)], empty if not asked for
    finish_reason: str | None = None       # stop, length, error (abort: the caller's own doing)
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    text: str | None = None                          # decoded at the edge (LLM), never by the engine
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    kept: list = field(default_factory=list)         # per token: kept ids (None = all), RL only
    experts: torch.Tensor | None = None              # [positions, n_moe_layers, k], RL only
    selection: torch.Tensor | None = None            # [positions - index_topk, layers, index_topk]
                                                     # packed key sets of positions index_topk.., RL only
    num_cached_tokens: int = 0
    error: str | None = None


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig | None = None):
        self.model, self.config = model.eval(), config or EngineConfig()
        for m in model.modules():  # routed experts as grouped GEMMs: no host sync per MoE layer
            if type(m) is MoE:
                m.stack_experts()
        cfg, ec = model.cfg, self.config
        self.max_model_len = min(ec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.mha_below = ec.mha_prefill_below or cfg.index_topk
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        probe = PagedCache(cfg, 1, ec.block_size, ec.kv_cache_dtype == "fp8", self.dtype, "meta")
        num_blocks = ec.num_blocks or self._auto_blocks(probe.bytes_per_token() * cfg.num_hidden_layers * ec.block_size)
        # one block more than the scheduler hands out: the scratch block padded graph rows use
        self.cache = PagedCache(cfg, num_blocks + 1, ec.block_size, ec.kv_cache_dtype == "fp8", self.dtype,
                                self.device, ec.paged_decode)
        self.cache.max_len = self.max_model_len
        self.graphs = (DecodeGraphs(model, self.cache, ec.max_num_seqs, self.max_model_len, scratch_block=num_blocks)
                       if ec.cuda_graphs else None)
        self.scheduler = Scheduler(BlockManager(num_blocks, ec.block_size), ec.max_num_seqs,
                                   ec.max_num_batched_tokens, ec.prefill_chunk, ec.prefix_caching)
        self.seqs: dict[str, Sequence] = {}
        log.info("paged cache: %d blocks of %d tokens (%s)", num_blocks, ec.block_size, ec.kv_cache_dtype)

    def _auto_blocks(self, bytes_per_block: int) -> int:
        ec = self.config
        want = ec.max_num_seqs * -(-self.max_model_len // ec.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, min(want, int(free * ec.memory_fraction) // bytes_per_block))
        return max(1, min(want, (1 << 30) // bytes_per_block))  # CPU: at most 1 GiB

    # ---- requests ----
    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens; the context is "
                                     f"{self.max_model_len} tokens, leaving no room to generate")
        seq = Sequence(list(prompt), params, **({"request_id": request_id} if request_id else {}))
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away, a stop string ended its text) and free its blocks."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ----
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Run one plan; return what each request that got a token or finished gained."""
        plan = self.scheduler.schedule()
        touched = [s for s in self.seqs.values() if s.status is Status.FINISHED]  # finished by scheduling
        spans: dict[tuple[int, int], list[Sequence]] = {}  # chunks of one (start, end) run as one batch,
        for seq, a, b in plan.prefills:                     # e.g. the G copies of a prompt in a GRPO group
            spans.setdefault((a, b), []).append(seq)
        for (a, b), seqs in spans.items():
            ids = torch.tensor([s.tokens[a:b] for s in seqs], device=self.device)                  # [n, b - a]
            pos = torch.arange(a, b, device=self.device).repeat(len(seqs), 1)
            self.cache.prepare([s.block_table for s in seqs], pos)
            out = self.model(ids, cache=self.cache, positions=pos, sparse=True,
                             mode="mha" if b <= self.mha_below else "mqa", return_topk=_rl(seqs))
            self._record(seqs, out, [a] * len(seqs), n=b - a)
            for seq in seqs:
                self.scheduler.computed(seq, b - a)
            done = [i for i, s in enumerate(seqs) if b == len(s.tokens)]
            if done:
                last = sample(out.logits[done, -1], [seqs[i].params for i in done], [seqs[i].generator for i in done])
                for i, s in zip(done, last):
                    self._append(seqs[i], s)
                    touched.append(seqs[i])
        if plan.decodes:
            seqs = plan.decodes
            last, pos = [s.tokens[-1] for s in seqs], [len(s.tokens) - 1 for s in seqs]
            if self.graphs is not None and not _rl(seqs) and self.graphs.fits(len(seqs)):
                logits = self.graphs.run(last, pos, [s.block_table for s in seqs])     # [B, V]
            else:
                positions = torch.tensor(pos, device=self.device)[:, None]
                self.cache.prepare([s.block_table for s in seqs], positions)
                out = self.model(torch.tensor(last, device=self.device)[:, None], cache=self.cache,
                                 positions=positions, sparse=True, mode="mqa", return_topk=_rl(seqs))
                self._record(seqs, out, pos, n=1)
                logits = out.logits[:, -1]
            samples = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
            for seq, s in zip(seqs, samples):
                self.scheduler.computed(seq, 1)
                self._append(seq, s)
                touched.append(seq)
        outs = [self._emit(seq) for seq in touched]
        for seq in touched:
            if seq.status is Status.FINISHED:
                self.seqs.pop(seq.request_id, None)
        return outs

    def _emit(self, seq: Sequence) -> StepOutput:
        """seq's tokens since its last StepOutput."""
        a, b = seq.num_emitted, len(seq.output_tokens)
        seq.num_emitted = b
        return StepOutput(seq.request_id, seq.output_tokens[a:b], seq.logprobs[a:b], seq.top_logprobs[a:b],
                          seq.finish_reason, seq.num_cached, seq.error)

    def _record(self, seqs: list[Sequence], out, starts: list[int], n: int) -> None:
        """What RL replays of a forward where seqs[i] fed the n positions from starts[i]: the
        expert ids of every position (out.expert_ids: per MoE layer [len(seqs) * n, k], row-major)
        and the selected keys of every position with more causal keys than index_topk
        (out.topk_indices: per layer [len(seqs), n, k]; the others select all of theirs). One
        copy to the host per forward and kind."""
        if not _rl(seqs):
            return
        if out.expert_ids:
            e = torch.stack(out.expert_ids, 1).to("cpu", torch.int16).view(len(seqs), n, len(out.expert_ids), -1)
            _file(seqs, starts, e, "experts")
        k, topk = self.model.cfg.index_topk, out.topk_indices
        if topk and all(t is not None for t in topk) and max(starts) + n > k:
            _file(seqs, starts, pack_selection(torch.stack(topk, 2)).cpu(), "selection", first=k)

    def _append(self, seq: Sequence, s: Sample) -> None:
        p = seq.params
        seq.tokens.append(s.token)
        seq.logprobs.append(s.logprob)
        if p.logprobs:
            seq.top_logprobs.append(s.top)
        if p.return_rl_data:
            seq.kept.append(s.kept)
        n_out = len(seq.tokens) - seq.prompt_len
        if (s.token == self.model.cfg.eos_token_id and not p.ignore_eos) or s.token in p.stop_token_ids:
            self.scheduler.finish(seq, "stop")
        elif n_out >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def output(self, seq: Sequence) -> RequestOutput:
        """Everything seq has so far (the whole request once it finished), RL records included."""
        experts = selection = None
        if seq.params.return_rl_data and seq.experts:
            experts = torch.stack([seq.experts[p] for p in sorted(seq.experts)])
        if seq.params.return_rl_data and seq.selection:
            rows = [seq.selection[p] for p in sorted(seq.selection)]
            selection = torch.stack([r.to(packed_dtype(rows)) for r in rows])
        return RequestOutput(seq.request_id, seq.tokens[:seq.prompt_len], seq.output_tokens, seq.finish_reason,
                             None, seq.logprobs, seq.top_logprobs, seq.kept, experts, selection,
                             seq.num_cached, seq.error)


def _file(seqs: list[Sequence], starts: list[int], rows: torch.Tensor, field: str, first: int = 0) -> None:
    """rows[i]: [n, ...] records of the n positions seqs[i] fed from starts[i]; those from position
    `first` on go into seqs[i].<field> (a dict by position) of each RL request."""
    for seq, a, per_seq in zip(seqs, starts, rows):
        if seq.params.return_rl_data:
            for j in range(max(0, first - a), len(per_seq)):
                getattr(seq, field)[a + j] = per_seq[j]


def _rl(seqs: list[Sequence]) -> bool:
    """Whether any of a forward's sequences records what RL replays."""
    return any(s.params.return_rl_data for s in seqs)

