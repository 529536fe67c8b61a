"""ModelRunner: a scheduled step in, sampled tokens out.

It owns what runs on the device: the model (its routed experts stacked for grouped GEMMs), the
paged cache's storage, the decode CUDA graphs, and the sampler. For each step it prepares the
forwards' inputs as Batches (batch.py), prefill chunks of one (start, end) range together (e.g. the
G copies of a prompt in a GRPO group), then every decode; runs each forward, records what RL
replays, and samples the rows that are due a token. Nothing about the step is left on the cache.

Prefill runs DSA in MLA's masked-MHA mode for short chunks (what DeepSeek serves short prefills
with) and in absorbed MQA mode beyond `mha_prefill_below`; decode always runs absorbed MQA + DSA.

Speculative decoding (`speculative_tokens` = k > 0): the MTP module keeps its own latents and
indexer keys in the paged cache (layer id num_hidden_layers, the same blocks and slots as the main
layers). Its entry at position i is built from the main model's hidden state at i and the token at
i + 1, so after every forward of the main model the MTP module runs over the positions that forward
made final: a prefill chunk's, or a verifying decode's accepted ones (what it wrote past them is
overwritten by the next step's). From its output at a sequence's last position it drafts by
*sampling* the processed distribution (temperature, top-k, top-p; argmax when greedy), chained k
times. A decode step feeds the last token and the k drafts, and accepts by exact rejection
sampling (speculative.py); the log-probs, kept sets, expert ids and key selections it records are
the verifying forward's, of the positions it accepts. With CUDA graphs the fixed-shape parts of a
speculative step are graphed per batch-size bucket (graphs.py): the verifying forward over [B, 1 + k]
tokens, the MTP module over the same positions, and each chained draft's MTP forward over [B, 1];
the rejection sampling, sampling and drafting between them run eagerly (their shapes depend on
what is accepted). RL steps stay eager, as for plain decode.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace

import torch

from dsv32.engine.batch import Batch
from dsv32.engine.cache import PagedCache
from dsv32.engine.config import EngineConfig
from dsv32.engine.grammar import fill_masks, mask_executor
from dsv32.engine.graphs import DecodeGraphs
from dsv32.engine.sampler import Sample, failed_sample, processed_logprobs, sample, samples
from dsv32.engine.scheduler import Plan, Sequence
from dsv32.engine.speculative import draw, verify_drafts
from dsv32.model import ModelOutput
from dsv32.model.batch_invariant import batch_invariant
from dsv32.model.fp8 import FP8
from dsv32.model.indexer import pack_selection
from dsv32.model.moe import MoE

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model, config: EngineConfig, max_model_len: int):
        self.model, self.config = model.eval(), config
        stacked = [m.stack_experts() and m.stacked[0].dtype for m in model.modules() if type(m) is MoE]
        if stacked:  # routed experts as grouped GEMMs: no host sync per MoE layer
            fp8 = sum(d == FP8 for d in stacked)
            log.info("routed experts: %d MoE layers as grouped GEMMs (%d of them grouped FP8 GEMMs), %d one "
                     "expert at a time", sum(map(bool, stacked)), fp8, stacked.count(False))
        cfg, ec = model.cfg, config
        self.mha_below = 0 if ec.batch_invariant else ec.mha_prefill_below or cfg.index_topk
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        self.k = ec.speculative_tokens
        self.verified, self.accepted = 0, [0] * self.k  # verifying rows; of them, with draft j accepted
        if self.k and not len(getattr(model, "mtp", ())):
            raise ValueError("speculative_tokens needs a model with an MTP module (num_nextn_predict_layers > 0)")
        mtp_layers = 1 if self.k else 0  # one MTP module drafts, chained for k > 1
        probe = PagedCache(cfg, 1, ec.block_size, ec.kv_cache_dtype == "fp8", self.dtype, "meta")
        bytes_per_block = probe.bytes_per_token() * (cfg.num_hidden_layers + mtp_layers) * ec.block_size
        self.num_blocks = ec.num_blocks or self._auto_blocks(bytes_per_block, max_model_len)  # what the scheduler
        # hands out; the cache has one block more: the scratch block padded graph rows use
        self.cache = PagedCache(cfg, self.num_blocks + 1, ec.block_size, ec.kv_cache_dtype == "fp8", self.dtype,
                                self.device, ec.paged_decode and not ec.batch_invariant, max_model_len + ec.draft_slots,
                                mtp_layers)
        if ec.cuda_graphs and ec.batch_invariant:
            log.info("the batch-invariant mode runs decode eagerly: CUDA graphs are off")
        graphed = ec.cuda_graphs and not ec.batch_invariant
        self.graphs = self.mtp_graphs = self.chain_graphs = None
        if graphed:  # plain decode, or a verifying one (the last token and k drafts a row)
            self.graphs = self._graphs(self._call_model, max_model_len, 1 + self.k)
        if graphed and self.k:  # the MTP module over a verifying decode's positions, and its chained drafts
            rows, d = self.graphs.sizes[-1], cfg.hidden_size
            self.mtp_hidden = torch.zeros(rows, 1 + self.k, d, dtype=self.dtype, device=self.device)
            self.mtp_graphs = self._graphs(lambda b: self._mtp_static(self.mtp_hidden, b), max_model_len, 1 + self.k)
            if self.k > 1:
                self.chain_hidden = torch.zeros(rows, 1, d, dtype=self.dtype, device=self.device)
                self.chain_graphs = self._graphs(lambda b: self._mtp_static(self.chain_hidden, b), max_model_len, 1)
        self.mask_executor = None  # grammar masks' thread pool (constrained decoding), made on first need
        log.info("paged cache: %d blocks of %d tokens (%s)", self.num_blocks, ec.block_size, ec.kv_cache_dtype)

    def _graphs(self, forward, max_model_len: int, width: int) -> DecodeGraphs:
        """Graph buckets of `forward` over `width` tokens a row, for sequences up to max_model_len
        tokens and the draft slots past them."""
        ec = self.config
        return DecodeGraphs(forward, self.device, ec.block_size, ec.max_num_seqs, max_model_len + ec.draft_slots,
                            scratch_block=self.num_blocks, width=width)

    def _mtp_static(self, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP module over a graph bucket's static Batch (its token ids: the token after each
        position), on the first rows of the static hidden states hidden [rows, W, D]."""
        return self.model.mtp_forward(hidden[:batch.input_ids.shape[0]], batch.input_ids, batch.positions,
                                      self.cache.bind(batch))

    def _auto_blocks(self, bytes_per_block: int, max_model_len: int) -> int:
        ec = self.config
        want = ec.max_num_seqs * -(-max_model_len // ec.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, min(want, int(free * ec.memory_fraction) // bytes_per_block))
        return max(1, min(want, (1 << 30) // bytes_per_block))  # CPU: at most 1 GiB

    # ---- one step ----
    def run(self, plan: Plan) -> list[tuple[Sequence, Sample]]:
        """Run the plan's forwards in order, each followed by sampling the rows it made due a
        token; return (sequence, sample) in sampling order. The grammar masks of the due rows are
        computed on the host while the device runs the forward."""
        sampled = []
        for seqs, batch in self.prepare(plan):
            out = self.forward(batch)
            if self.k and seqs is plan.decodes:
                sampled += self._verify(seqs, batch, out)
                continue
            due = [seqs[i] for i in batch.sample_rows]
            masks = self._grammar_masks(due)
            if batch.return_topk:
                self._record(seqs, batch, out)
            new = self._sample_isolated(_last_logits(out, batch), due, masks) if due else []
            sampled += zip(due, new)
            if self.k:
                self._draft_after_prefill(seqs, batch, out, dict(zip(batch.sample_rows, new)))
        return sampled

    def _sample_isolated(self, logits: torch.Tensor, seqs: list[Sequence],
                         masks: torch.Tensor | None = None) -> list[Sample]:
        """self.sample, but a failure that belongs to one row fails that row alone: a batch that
        raises is sampled again row by row, and a row that raises on its own gets a failed Sample
        (its sequence ends with an error; the others keep their tokens)."""
        try:
            return self.sample(logits, seqs, masks)
        except Exception as e:  # noqa: BLE001 (whatever it is, it fails its request, not the step)
            if len(seqs) == 1:
                log.warning("sampling failed for %s: %s", seqs[0].request_id, e)
                return [failed_sample(f"sampling failed for this request: {e}")]
        return [self._sample_isolated(logits[i:i + 1], [seq], None if masks is None else masks[i:i + 1])[0]
                for i, seq in enumerate(seqs)]

    def prepare(self, plan: Plan) -> list[tuple[list[Sequence], Batch]]:
        """The step's forwards: (the sequences of its rows, its Batch), prefill chunks of one
        (start, end) range as one forward, then the decodes."""
        spans: dict[tuple[int, int], list[Sequence]] = {}
        for seq, a, b in plan.prefills:
            spans.setdefault((a, b), []).append(seq)
        forwards = [(seqs, self._prefill(seqs, a, b)) for (a, b), seqs in spans.items()]
        if plan.decodes:
            forwards.append((plan.decodes, self._decode(plan.decodes)))
        return forwards

    def _prefill(self, seqs: list[Sequence], a: int, b: int) -> Batch:
        """Tokens a..b-1 of each sequence; those whose prompt ends at b are sampled."""
        ids = torch.tensor([s.tokens[a:b] for s in seqs], device=self.device)                  # [n, b - a]
        pos = torch.arange(a, b, device=self.device).repeat(len(seqs), 1)                     # [n, b - a]
        return Batch.build(ids, pos, [s.block_table for s in seqs], self.config.block_size,
                           mode="mha" if b <= self.mha_below else "mqa",
                           sample_rows=tuple(i for i, s in enumerate(seqs) if b == len(s.tokens)),
                           return_topk=_rl(seqs))

    def _decode(self, seqs: list[Sequence]) -> Batch:
        """Each sequence's last token (and its k drafts with speculative decoding), every row
        sampled; a graph bucket's static Batch where one applies (not for RL, whose records need the
        eager forward's outputs)."""
        # the last token, with speculative decoding followed by its k drafts, at their positions
        fed = [[s.tokens[-1]] + (s.draft if self.k else []) for s in seqs]                     # [B, 1 + k]
        first = [len(s.tokens) - 1 for s in seqs]
        tables = [s.block_table for s in seqs]
        if self.graphs is not None and not _rl(seqs) and self.graphs.fits(len(seqs)):
            return self.graphs.load(fed, first, tables)
        pos = torch.arange(self.k + 1, device=self.device) + torch.tensor(first, device=self.device)[:, None]
        return Batch.build(torch.tensor(fed, device=self.device), pos, tables, self.config.block_size, mode="mqa",
                           sample_rows=tuple(range(len(seqs))), return_topk=_rl(seqs))

    def forward(self, batch: Batch) -> ModelOutput:
        """The model over one Batch: a graph bucket's replayed, any other run eagerly."""
        if batch.static:
            return self.graphs.replay(batch)
        return self._call_model(batch)

    def _call_model(self, batch: Batch) -> ModelOutput:
        invariant = self.config.batch_invariant
        with batch_invariant() if invariant else nullcontext():
            return self.model(batch.input_ids, cache=self.cache.bind(batch), positions=batch.positions, sparse=True,
                              mode=batch.mode, return_topk=batch.return_topk, batch_invariant=invariant)

    def _grammar_masks(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The packed grammar masks of seqs' next tokens (grammar.fill_masks), None without grammars;
        several rows are filled in parallel by a thread pool made on first need."""
        matchers = [s.matcher for s in seqs]
        if sum(m is not None for m in matchers) > 1 and self.mask_executor is None:
            self.mask_executor = mask_executor()
        return fill_masks(matchers, self.model.cfg.vocab_size, self.mask_executor)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], masks: torch.Tensor | None = None) -> list[Sample]:
        """logits [B, V], one row per sequence -> one sample each, under its own parameters (with
        its history for penalties and min_tokens) and, where masks [B, ceil(V / 32)] has its
        grammar's packed mask, its grammar."""
        eos = self.model.cfg.eos_token_id
        ends = [([] if s.params.ignore_eos or eos is None else [eos]) + list(s.params.stop_token_ids) for s in seqs]
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs], masks,
                      [s.tokens for s in seqs], [s.prompt_len for s in seqs], ends)

    def _record(self, seqs: list[Sequence], batch: Batch, out: ModelOutput, counts: list[int] | None = None) -> None:
        """What RL replays of a forward where seqs[i] fed the n positions from starts[i]: the
        expert ids of every position (out.expert_ids: per MoE layer [len(seqs) * n, k], row-major)
        and the selected keys of every position with more causal keys than index_topk
        (out.topk_indices: per layer [len(seqs), n, k]; the others select all of theirs); of
        seqs[i]'s first counts[i] positions only where given (a verifying forward's accepted ones).
        One copy to the host per forward and kind."""
        starts, n = batch.positions[:, 0].tolist(), batch.positions.shape[1]
        if out.expert_ids:
            e = torch.stack(out.expert_ids, 1).to("cpu", torch.int16).view(len(seqs), n, len(out.expert_ids), -1)
            _file(seqs, starts, e, "experts", counts=counts)
        k, topk = self.model.cfg.index_topk, out.topk_indices
        if topk and all(t is not None for t in topk) and max(starts) + n > k:
            _file(seqs, starts, pack_selection(torch.stack(topk, 2)).cpu(), "selection", first=k, counts=counts)

    # ---- speculative decoding ----
    def _verify(self, seqs: list[Sequence], batch: Batch, out: ModelOutput) -> list[tuple[Sequence, Sample]]:
        """A verifying decode: accept each row's drafts by rejection sampling against the processed
        distributions of this forward (out.logits [B, 1 + k, V]), record what RL replays of the
        accepted positions, run the MTP module over them and draft anew. -> (sequence, sample) of
        every accepted draft and the token after them, in order. A graph bucket's batch and outputs
        have padding rows past len(seqs): they are cut off first."""
        static = batch.static
        if static:
            rows = len(seqs)
            out = replace(out, logits=out.logits[:rows], hidden=out.hidden[:rows])
            batch = replace(batch, input_ids=batch.input_ids[:rows], positions=batch.positions[:rows])
        b, k1 = batch.input_ids.shape
        params = [s.params for s in seqs for _ in range(k1)]
        lp, keep, greedy, truncates = processed_logprobs(out.logits.flatten(0, 1), params)     # [B * (1 + k), V]
        p = _target_probs(lp, greedy).view(b, k1, -1)                                          # [B, 1 + k, V]
        q = torch.stack([s.draft_probs for s in seqs])                                         # [B, k, V]
        drafts = batch.input_ids[:, 1:]                                                        # [B, k]
        n, nxt = verify_drafts(p, q, drafts, [s.generator for s in seqs])
        self.verified += b
        for m in n:
            for j in range(m):
                self.accepted[j] += 1
        if batch.return_topk:
            self._record(seqs, batch, out, counts=[m + 1 for m in n])
        rows = [i * k1 + j for i, m in enumerate(n) for j in range(m + 1)]                    # accepted + next
        listed = drafts.tolist()
        tokens = [t for i, m in enumerate(n) for t in listed[i][:m] + [nxt[i]]]
        got = samples(lp[rows], torch.tensor(tokens, device=lp.device), None if keep is None else keep[rows],
                      [params[r] for r in rows], [truncates[r] for r in rows])
        owners = [s for s, m in zip(seqs, n) for _ in range(m + 1)]
        # the MTP module over positions N..N+k: the token after position N+j is draft j+1 for j < n,
        # then the token just drawn; past it, entries the next step overwrites
        at = torch.tensor(n, device=self.device)                                               # [B]
        following = torch.cat([drafts, drafts[:, -1:]], 1)                                     # [B, 1 + k]
        following[torch.arange(b, device=self.device), at] = torch.tensor(nxt, device=self.device)
        if static:  # its graph, on the verifying forward's positions
            step = self.mtp_graphs.load(following, batch.positions[:, 0], [s.block_table for s in seqs])
            self.mtp_hidden[:b].copy_(out.hidden)
            h, logits = self.mtp_graphs.replay(step)
            h, logits = h[:b], logits[:b]
        else:
            h, logits = self.model.mtp_forward(out.hidden, following, batch.positions, self.cache.bind(batch))
        rows_b = torch.arange(b, device=self.device)
        self._draft(seqs, h[rows_b, at][:, None], logits[rows_b, at], batch.positions[:, 0] + at + 1)
        return list(zip(owners, got))

    def _draft_after_prefill(self, seqs: list[Sequence], batch: Batch, out: ModelOutput,
                             new: dict[int, Sample]) -> None:
        """The MTP module over a prefill chunk's positions a..b-1 (the token after each: the prompt's,
        or at the end of a prompt the one just sampled, new[row]); the rows whose prompt ended draft."""
        a, b = int(batch.positions[0, 0]), int(batch.positions[0, -1]) + 1
        following = torch.tensor([s.tokens[a + 1:b] + [new[i].token if i in new else s.tokens[b]]
                                  for i, s in enumerate(seqs)], device=self.device)            # [n, b - a]
        h, logits = self.model.mtp_forward(out.hidden, following, batch.positions,
                                           self.cache.bind(batch), mode=batch.mode)
        rows = list(batch.sample_rows)
        if rows:
            self._draft([seqs[i] for i in rows], h[rows, -1:], logits[rows, -1],
                        torch.full((len(rows),), b, device=self.device))

    def _draft(self, seqs: list[Sequence], h: torch.Tensor, logits: torch.Tensor, pos: torch.Tensor) -> None:
        """Draft k tokens per sequence: the first from logits [B, V] (the MTP module's output at the
        sequence's last token, at position pos - 1 with pos [B] that of the token's successor), each
        next one by running the module again on its own hidden state h [B, 1, D] and the draft, at
        the draft's position. Stores seq.draft and seq.draft_probs [k, V]."""
        params, gens = [s.params for s in seqs], [s.generator for s in seqs]
        tables = [s.block_table for s in seqs]
        drafts, probs = [], []
        for j in range(self.k):
            lp, _, greedy, _ = processed_logprobs(logits, params)
            q = _target_probs(lp, greedy)                                                      # [B, V]
            d = draw(q, gens)                                                                  # [B]
            drafts.append(d)
            probs.append(q)
            if j + 1 < self.k and self.chain_graphs is not None:  # chain: the module again, on the draft
                step = self.chain_graphs.load(d[:, None], pos + j, tables)                     # at its position
                self.chain_hidden[:len(seqs)].copy_(h)
                h, logits = self.chain_graphs.replay(step)
                h, logits = h[:len(seqs)], logits[:len(seqs), -1]
            elif j + 1 < self.k:
                step = Batch.build(d[:, None], (pos + j)[:, None], tables, self.config.block_size)
                h, logits = self.model.mtp_forward(h, d[:, None], step.positions, self.cache.bind(step))
                logits = logits[:, -1]
        drafts, probs = torch.stack(drafts, 1).tolist(), torch.stack(probs, 1)                # [B, k], [B, k, V]
        for i, s in enumerate(seqs):
            s.draft, s.draft_probs = drafts[i], probs[i]


def _last_logits(out: ModelOutput, batch: Batch) -> torch.Tensor:
    """The last position's logits of the rows batch samples: [len(sample_rows), V]."""
    rows = batch.sample_rows
    if rows == tuple(range(len(rows))):  # the first rows (a decode step): a view, no index tensor
        return out.logits[:len(rows), -1]
    return out.logits[list(rows), -1]


def _target_probs(lp: torch.Tensor, greedy: list[bool]) -> torch.Tensor:
    """Processed log-probs lp [B, V] -> the distributions tokens are drawn from [B, V]: one-hot at
    the argmax for greedy rows (what `sample` picks), exp(lp) for the others."""
    if all(greedy):  # no row indexing: an index built from a list is a host-to-device copy
        return torch.nn.functional.one_hot(lp.argmax(-1), lp.shape[-1]).to(lp.dtype)
    p = lp.exp()
    if any(greedy):
        g = [i for i, x in enumerate(greedy) if x]
        p[g] = torch.nn.functional.one_hot(lp[g].argmax(-1), lp.shape[-1]).to(p.dtype)
    return p


def _file(seqs: list[Sequence], starts: list[int], rows: torch.Tensor, field: str, first: int = 0,
          counts: list[int] | None = None) -> None:
    """rows[i]: [n, ...] records of the n positions seqs[i] fed from starts[i] (its first counts[i]
    where given); those from position `first` on go into seqs[i].<field> (a dict by position) of
    each RL request."""
    for i, (seq, a, per_seq) in enumerate(zip(seqs, starts, rows)):
        if seq.params.return_rl_data:
            for j in range(max(0, first - a), len(per_seq) if counts is None else counts[i]):
                getattr(seq, field)[a + j] = per_seq[j]


def _rl(seqs: list[Sequence]) -> bool:
    """Whether any of a forward's sequences records what RL replays."""
    return any(s.params.return_rl_data for s in seqs)
