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

With speculative decoding (k = speculative_tokens > 0) a decode feeds the sequence's last token and its k
drafts, so a decoding sequence holds `draft_slots` cache slots past its tokens, and one decode step
may append up to k + 1 tokens (the accepted drafts and the token after them).
"""

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from dsv32.engine.cache import BlockManager, block_hash
from dsv32.engine.config import draft_slots
from dsv32.engine.grammar import GrammarError, Matcher
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
    # speculative decoding: the drafts its next decode step verifies, and their draft distributions
    draft: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None          # [k, V] processed, on the device
    matcher: Matcher | None = None      # its place in its grammar (constrained decoding)

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
                 prefill_chunk: int, max_model_len: int, eos_token_id: int | None, prefix_caching: bool = True,
                 speculative_tokens: int = 0):
        self.blocks, self.k, self.draft_slots = blocks, speculative_tokens, draft_slots(speculative_tokens)
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
            need = len(seq.tokens) + self.draft_slots
            while not self.blocks.append_slot(seq.block_table, need):
                if -(-need // self.blocks.block_size) > len(self.blocks.ref):
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
        budget = self.budget - len(plan.decodes) * (1 + self.k)
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
            need = len(seq.tokens) + self.draft_slots
            if self.blocks.blocks_needed(need, cached) > self.blocks.num_free:
                if not self.running and not plan.prefills:  # nothing will ever free enough
                    self.waiting.popleft()
                    self.finish(seq, "error", f"the sequence needs {-(-need // self.blocks.block_size)} "
                                f"cache blocks, the cache has {len(self.blocks.ref)}")
                    plan.finished.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.block_table = self.blocks.allocate(need, cached)
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
        (in sampling order) and finish the sequences it ends. A decode computed as many positions
        as it got tokens (1, or with drafts the accepted ones and the last token fed); tokens after
        one that finishes its sequence are dropped. Returns the sequences that got a token or
        finished in this step, each once."""
        n_tokens: dict[int, int] = {}
        for seq, _ in sampled:
            n_tokens[id(seq)] = n_tokens.get(id(seq), 0) + 1
        for seq, a, b in plan.prefills:
            self.computed(seq, b - a)
        for seq in plan.decodes:
            self.computed(seq, n_tokens[id(seq)])
        touched = []
        for seq, s in sampled:
            if seq.status is Status.FINISHED:
                continue
            self._append(seq, s)
            if not touched or touched[-1] is not seq:
                touched.append(seq)
        for seq in touched:
            if seq.status is Status.RUNNING:
                self.computed(seq, 0)  # blocks whose hash needed the token just appended
            else:
                _drop_records_past(seq, len(seq.tokens) - 1)
        return plan.finished + touched

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
        if seq.matcher is not None:
            try:
                seq.matcher.advance(s.token)
            except GrammarError as e:  # only this sequence's grammar failed: only it ends
                self.finish(seq, "error", str(e))
                return
        ended = (s.token == self.eos_token_id and not p.ignore_eos) or s.token in p.stop_token_ids
        if ended or (seq.matcher is not None and seq.matcher.done):  # done: the grammar takes no more
            self.finish(seq, "stop")
        elif n_out >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            self.finish(seq, "length")

    def _may_share(self, seq: Sequence) -> bool:
        # RL requests record expert ids for every position: reused blocks would have none
        return self.prefix_caching and not seq.params.return_rl_data

    def _hash_at(self, seq: Sequence, i: int) -> bytes:
        bs = self.blocks.block_size
        return block_hash(seq.block_hashes[i - 1] if i else None,
                          seq.tokens[i * bs:(i + 1) * bs + self.blocks.hash_overlap])

    def computed(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq have cache entries: register the blocks that became full (and whose
        hash's tokens are all known: see BlockManager.hash_overlap)."""
        seq.num_computed += n
        if not self.prefix_caching:
            return
        bs, over = self.blocks.block_size, self.blocks.hash_overlap
        while len(seq.block_hashes) < seq.num_computed // bs and \
                len(seq.tokens) >= (len(seq.block_hashes) + 1) * bs + over:
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
        seq.draft, seq.draft_probs = [], None
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
        seq.block_table, seq.draft, seq.draft_probs = [], [], None
        seq.status, seq.finish_reason, seq.error = Status.FINISHED, reason, error


def _drop_records_past(seq: Sequence, end: int) -> None:
    """Forget the RL records of positions >= end: positions a verifying forward fed past the token
    that finished the sequence (a plain decode never feeds a sequence's last token)."""
    for records in (seq.experts, seq.selection):
        for p in [p for p in records if p >= end]:
            del records[p]
