"""The engine: one step at a time, `scheduler.schedule()` -> `runner.run(plan)` ->
`scheduler.postprocess(...)`, returning what each request gained (StepOutput).

It speaks token ids only: text, and with it stop strings, lives at the edge that decodes the
tokens (`LLM`, the server, the terminal chat; tokenizer.Detokenizer), which aborts a request
once a stop string ends its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv32.engine.cache import BlockManager
from dsv32.engine.config import EngineConfig
from dsv32.engine.runner import ModelRunner
from dsv32.engine.sampler import SamplingParams
from dsv32.engine.scheduler import Scheduler, Sequence, Status
from dsv32.model import ContextLengthError, Transformer
from dsv32.model.indexer import packed_dtype


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
    error_internal: bool = False           # the engine failed it (its sampling raised), not a refusal


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
    """runner_class: the ModelRunner to drive (parallel/engine.py's broadcasts each forward)."""

    def __init__(self, model: Transformer, config: EngineConfig | None = None, *,
                 runner_class: type[ModelRunner] = ModelRunner):
        self.config = config or EngineConfig()
        cfg, ec = model.cfg, self.config
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(ec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.runner = runner_class(model, ec, self.max_model_len)
        self.device = self.runner.device
        blocks = BlockManager(self.runner.num_blocks, ec.block_size, hash_overlap=1 if ec.speculative_tokens else 0)
        self.scheduler = Scheduler(blocks, ec.max_num_seqs, ec.max_num_batched_tokens, ec.prefill_chunk,
                                   self.max_model_len, cfg.eos_token_id, ec.prefix_caching, ec.speculative_tokens)
        self.seqs: dict[str, Sequence] = {}

    # ---- requests ----
    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens; the context is "
                                     f"{self.max_model_len} tokens, leaving no room to generate")
        if params.grammar is not None and params.grammar.vocab.vocab_size != self.vocab_size:
            raise ValueError(f"the grammar was compiled for a vocabulary of {params.grammar.vocab.vocab_size} "
                             f"tokens; the model has {self.vocab_size}")
        if self.config.speculative_tokens:   # drafts are verified against the history-free distribution
            if params.grammar is not None:
                raise ValueError("constrained decoding (response_format, a forced tool call) does not run with "
                                 "speculative decoding: serve without --speculative-tokens for it")
            history = [n for n, off in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                        ("repetition_penalty", 1.0), ("min_tokens", 0)) if getattr(params, n) != off]
            if history:
                raise ValueError(f"{', '.join(history)} do not run with speculative decoding: serve without "
                                 "--speculative-tokens for them")
        seq = Sequence(list(prompt), params, **({"request_id": request_id} if request_id else {}))
        if params.grammar is not None:
            seq.matcher = params.grammar.matcher()
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)  # on the host: sampler.seeded_uniforms
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
        sampled = self.runner.run(plan)
        touched = self.scheduler.postprocess(plan, sampled)
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
                          seq.finish_reason, seq.num_cached, seq.error, seq.error_internal)

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
