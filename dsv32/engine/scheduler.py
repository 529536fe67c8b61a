"""Sequences and the scheduler: continuous batching, chunked prefill, prefix caching, preemption,
and the rules that finish a sequence.

Each engine step is one plan: some prefill chunks (at most `prefill_chunk` tokens of one sequence
each, within a token budget) and one batch of decodes (every running sequence whose prompt is
done). A sequence that cannot get a block for its next token preempts the youngest running one
(itself, if it is the youngest: it then skips this step's decode), whose blocks are freed and whose
tokens are recomputed later (their prefix blocks usually still sit in the prefix cache). After the
step's forwards, `postprocess` appends the sampled tokens and finishes the sequences that reached
the end-of-sentence token, one of their stop token ids, max_tokens or the context length. Stop
strings are text: the edge that decodes the tokens checks them (tokenizer.Detokenizer).
"""

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from dsv32.engine.cache import BlockManager, block_hash
from dsv32.engine.sampler import Sample, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Sequence:
    tokens: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    status: Status = Status.WAITING
    prompt_len: int = 0
    num_computed: int = 0               # tokens whose cache entries are written
    num_cached: int = 0                 # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0            # times preempted (its tokens recomputed on re-admission)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_internal: bool = False        # the error is the engine's (a failed sampling), not a refusal
    num_emitted: int = 0                # output tokens the engine's steps have returned
    # per generated token
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    # per position (prompt and generated): expert ids [n_moe_layers, k], when return_rl_data
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    # per position past index_topk: the selected key set of every layer [layers, k], packed
    selection: dict[int, torch.Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None

    def __post_init__(self):
        self.prompt_len = self.prompt_len or len(self.tokens)

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.tokens) - 1 and self.num_computed > 0


@dataclass
class Plan:
    prefills: list[tuple[Sequence, int, int]]   # (seq, start, end) token ranges to compute
    decodes: list[Sequence]
    preempted: list[Sequence]
    finished: list[Sequence] = field(default_factory=list)  # refused while scheduling (too large for the cache)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int, max_model_len: int, eos_token_id: int | None, prefix_caching: bool = True):
        self.blocks = blocks
        self.max_num_seqs, self.budget, self.chunk = max_num_seqs, max_num_batched_tokens, prefill_chunk
        self.max_model_len, self.eos_token_id = max_model_len, eos_token_id
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        plan = Plan([], [], [])
        # decodes: every running sequence past its prompt needs a slot for the token it feeds
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or not seq.prefill_done:
                continue
            while not self.blocks.append_slot(seq.block_table, len(seq.tokens)):
                if -(-len(seq.tokens) // self.blocks.block_size) > len(self.blocks.ref):
                    self.finish(seq, "length")  # the whole cache is too small for it
                    plan.finished.append(seq)
                    break
                victim = self._youngest()  # seq or younger: never a sequence already planned
                self.preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                plan.decodes.append(seq)
        budget = self.budget - len(plan.decodes)
        # prefill chunks: running sequences mid-prompt first, then new admissions
        for seq in self.running:
            if budget <= 0:
                break
            if seq.status is Status.RUNNING and not seq.prefill_done:
                n = min(self.chunk, budget, len(seq.tokens) - seq.num_computed)
                plan.prefills.append((seq, seq.num_computed, seq.num_computed + n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached, hashes = self.blocks.lookup_prefix(seq.tokens) if self._may_share(seq) else ([], [])
            if self.blocks.blocks_needed(len(seq.tokens), cached) > self.blocks.num_free:
                if not self.running and not plan.prefills:  # nothing will ever free enough
                    self.waiting.popleft()
                    self.finish(seq, "error", f"the sequence needs {-(-len(seq.tokens) // self.blocks.block_size)} "
                                f"cache blocks, the cache has {len(self.blocks.ref)}")
                    plan.finished.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.block_table = self.blocks.allocate(len(seq.tokens), cached)
            seq.block_hashes = hashes
            seq.num_computed = len(cached) * self.blocks.block_size
            if not seq.num_preemptions:  # a recompute's hits (its own blocks) are no prompt cache hits
                seq.num_cached = seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(self.chunk, budget, len(seq.tokens) - seq.num_computed)
            plan.prefills.append((seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        return plan

    def postprocess(self, plan: Plan, sampled: list[tuple[Sequence, Sample]]) -> list[Sequence]:
        """After the plan's forwards: count the tokens they computed, append each sampled token
        (in sampling order) and finish the sequences it ends. Returns the sequences that got a
        token or finished in this step, each once."""
        for seq, a, b in plan.prefills:
            self.computed(seq, b - a)
        for seq in plan.decodes:
            self.computed(seq, 1)
        for seq, s in sampled:
            self._append(seq, s)
        return plan.finished + [seq for seq, _ in sampled]

    def _append(self, seq: Sequence, s: Sample) -> None:
        p = seq.params
        if s.error is not None:  # its sampling failed: it alone ends
            self.finish(seq, "error", s.error)
            seq.error_internal = True
            return
        seq.tokens.append(s.token)
        seq.logprobs.append(s.logprob)
        if p.logprobs:
            seq.top_logprobs.append(s.top)
        if p.return_rl_data:
            seq.kept.append(s.kept)
        n_out = len(seq.tokens) - seq.prompt_len
        if (s.token == self.eos_token_id and not p.ignore_eos) or s.token in p.stop_token_ids:
            self.finish(seq, "stop")
        elif n_out >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            self.finish(seq, "length")

    def _may_share(self, seq: Sequence) -> bool:
        # RL requests record expert ids for every position: reused blocks would have none
        return self.prefix_caching and not seq.params.return_rl_data

    def _hash_at(self, seq: Sequence, i: int) -> bytes:
        bs = self.blocks.block_size
        return block_hash(seq.block_hashes[i - 1] if i else None, seq.tokens[i * bs:(i + 1) * bs])

    def computed(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq have cache entries: register the blocks that became full."""
        seq.num_computed += n
        if not self.prefix_caching:
            return
        bs = self.blocks.block_size
        while len(seq.block_hashes) < seq.num_computed // bs:
            i = len(seq.block_hashes)
            seq.block_hashes.append(self._hash_at(seq, i))
            self.blocks.register(seq.block_table[i], seq.block_hashes[i])

    def _youngest(self) -> Sequence:
        """The running sequence admitted last: the preemption victim."""
        for other in reversed(self.running):
            if other.status is Status.RUNNING:
                return other
        raise RuntimeError("no running sequence to preempt")

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks; it re-enters the queue first and recomputes its tokens."""
        self.num_preemptions += 1
        seq.num_preemptions += 1
        self.blocks.release(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.status, seq.finish_reason, seq.error = Status.FINISHED, reason, error
