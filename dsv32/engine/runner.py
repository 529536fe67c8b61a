"""ModelRunner: a scheduled step in, sampled tokens out.

It owns what runs on the device: the model (its routed experts stacked for grouped GEMMs), the
paged cache's storage, the decode CUDA graphs, and the sampler. For each step it prepares the
forwards' inputs as Batches (batch.py), prefill chunks of one (start, end) range together (e.g. the
G copies of a prompt in a GRPO group), then every decode; runs each forward, records what RL
replays, and samples the rows that are due a token. Nothing about the step is left on the cache.

Prefill runs DSA in MLA's masked-MHA mode for short chunks (what DeepSeek serves short prefills
with) and in absorbed MQA mode beyond `mha_prefill_below`; decode always runs absorbed MQA + DSA.
"""

from __future__ import annotations

import logging

import torch

from dsv32.engine.batch import Batch
from dsv32.engine.cache import PagedCache
from dsv32.engine.config import EngineConfig
from dsv32.engine.graphs import DecodeGraphs
from dsv32.engine.sampler import Sample, failed_sample, sample
from dsv32.engine.scheduler import Plan, Sequence
from dsv32.model import ModelOutput
from dsv32.model.indexer import pack_selection
from dsv32.model.moe import MoE

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model, config: EngineConfig, max_model_len: int):
        self.model, self.config = model.eval(), config
        for m in model.modules():  # routed experts as grouped GEMMs: no host sync per MoE layer
            if type(m) is MoE:
                m.stack_experts()
        cfg, ec = model.cfg, config
        self.mha_below = ec.mha_prefill_below or cfg.index_topk
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        probe = PagedCache(cfg, 1, ec.block_size, ec.kv_cache_dtype == "fp8", self.dtype, "meta")
        bytes_per_block = probe.bytes_per_token() * cfg.num_hidden_layers * ec.block_size
        self.num_blocks = ec.num_blocks or self._auto_blocks(bytes_per_block, max_model_len)  # what the scheduler
        # hands out; the cache has one block more: the scratch block padded graph rows use
        self.cache = PagedCache(cfg, self.num_blocks + 1, ec.block_size, ec.kv_cache_dtype == "fp8", self.dtype,
                                self.device, ec.paged_decode, max_model_len)
        self.graphs = (DecodeGraphs(self._call_model, self.device, ec.block_size, ec.max_num_seqs, max_model_len,
                                    scratch_block=self.num_blocks) if ec.cuda_graphs else None)
        log.info("paged cache: %d blocks of %d tokens (%s)", self.num_blocks, ec.block_size, ec.kv_cache_dtype)

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
        token; return (sequence, sample) in sampling order."""
        sampled = []
        for seqs, batch in self.prepare(plan):
            out = self.forward(batch)
            if batch.return_topk:
                self._record(seqs, batch, out)
            due = [seqs[i] for i in batch.sample_rows]
            if due:
                sampled += zip(due, self._sample_isolated(_last_logits(out, batch), due))
        return sampled

    def _sample_isolated(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sample]:
        """self.sample, but a failure that belongs to one row fails that row alone: a batch that
        raises is sampled again row by row, and a row that raises on its own gets a failed Sample
        (its sequence ends with an error; the others keep their tokens)."""
        try:
            return self.sample(logits, seqs)
        except Exception as e:  # noqa: BLE001 (whatever it is, it fails its request, not the step)
            if len(seqs) == 1:
                log.warning("sampling failed for %s: %s", seqs[0].request_id, e)
                return [failed_sample(f"sampling failed for this request: {e}")]
        return [self._sample_isolated(logits[i:i + 1], [seq])[0] for i, seq in enumerate(seqs)]

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
        """Each sequence's last token, every row sampled; a graph bucket's static Batch where one
        applies (not for RL, whose records need the eager forward's outputs)."""
        last, pos = [s.tokens[-1] for s in seqs], [len(s.tokens) - 1 for s in seqs]
        if self.graphs is not None and not _rl(seqs) and self.graphs.fits(len(seqs)):
            return self.graphs.load(last, pos, [s.block_table for s in seqs])
        return Batch.build(torch.tensor(last, device=self.device)[:, None],
                           torch.tensor(pos, device=self.device)[:, None],
                           [s.block_table for s in seqs], self.config.block_size, mode="mqa",
                           sample_rows=tuple(range(len(seqs))), return_topk=_rl(seqs))

    def forward(self, batch: Batch) -> ModelOutput:
        """The model over one Batch: a graph bucket's replayed, any other run eagerly."""
        if batch.static:
            return self.graphs.replay(batch)
        return self._call_model(batch)

    def _call_model(self, batch: Batch) -> ModelOutput:
        return self.model(batch.input_ids, cache=self.cache.bind(batch), positions=batch.positions, sparse=True,
                          mode=batch.mode, return_topk=batch.return_topk)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sample]:
        """logits [B, V], one row per sequence -> one sample each, under its own parameters."""
        eos = self.model.cfg.eos_token_id
        ends = [([] if s.params.ignore_eos or eos is None else [eos]) + list(s.params.stop_token_ids) for s in seqs]
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                      [s.tokens for s in seqs], [s.prompt_len for s in seqs], ends)

    def _record(self, seqs: list[Sequence], batch: Batch, out: ModelOutput) -> None:
        """What RL replays of a forward where seqs[i] fed the n positions from starts[i]: the
        expert ids of every position (out.expert_ids: per MoE layer [len(seqs) * n, k], row-major)
        and the selected keys of every position with more causal keys than index_topk
        (out.topk_indices: per layer [len(seqs), n, k]; the others select all of theirs). One
        copy to the host per forward and kind."""
        starts, n = batch.positions[:, 0].tolist(), batch.positions.shape[1]
        if out.expert_ids:
            e = torch.stack(out.expert_ids, 1).to("cpu", torch.int16).view(len(seqs), n, len(out.expert_ids), -1)
            _file(seqs, starts, e, "experts")
        k, topk = self.model.cfg.index_topk, out.topk_indices
        if topk and all(t is not None for t in topk) and max(starts) + n > k:
            _file(seqs, starts, pack_selection(torch.stack(topk, 2)).cpu(), "selection", first=k)


def _last_logits(out: ModelOutput, batch: Batch) -> torch.Tensor:
    """The last position's logits of the rows batch samples: [len(sample_rows), V]."""
    rows = batch.sample_rows
    if rows == tuple(range(len(rows))):  # the first rows (a decode step): a view, no index tensor
        return out.logits[:len(rows), -1]
    return out.logits[list(rows), -1]


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
