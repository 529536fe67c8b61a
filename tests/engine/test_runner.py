"""The ModelRunner's per-forward inputs (Batch), checked against a hand computation of where each
token goes in the paged cache and what each sequence reads back."""

import pytest
import torch

from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.engine.batch import DECODE_TOKENS, Batch
from dsv32.model import Transformer

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(preset("tiny").replace(index_topk=8)).eval()


def record_forwards(eng: Engine) -> list:
    """Wrap the runner's prepare: each step's (sequences, Batch) pairs, in order."""
    steps, prepare = [], eng.runner.prepare

    def recording(plan):
        steps.append(prepare(plan))
        return steps[-1]

    eng.runner.prepare = recording
    return steps


def test_a_mixed_steps_batches_are_what_a_hand_computation_gives(tiny):
    """Blocks of 4 tokens. Step 1 prefills A (6 tokens: blocks 0, 1) and C (3 tokens: block 2);
    B (10 tokens: blocks 3, 4, 5) arrives for step 2, which prefills its first chunk of 8 beside
    the decodes of A (position 6) and C (position 3). The prefill forward comes first; each
    token's slot is block * 4 + position % 4 of its own table; each sequence reads positions
    0..6 (one past the largest of the forward), C's last three through its padded table."""
    g = torch.Generator().manual_seed(0)
    a, c, b = (torch.randint(2, 512, (n,), generator=g).tolist() for n in (6, 3, 10))
    eng = Engine(tiny, EngineConfig(num_blocks=8, block_size=4, prefill_chunk=8, mha_prefill_below=8,
                                    prefix_caching=False))
    steps = record_forwards(eng)
    sa, sc = eng.add_request(a, GREEDY), eng.add_request(c, GREEDY)
    eng.step()
    sb = eng.add_request(b, GREEDY)
    eng.step()
    first, mixed = steps
    assert [[s.request_id for s in seqs] for seqs, _ in first] == [[sa.request_id], [sc.request_id]]
    (prefill_seqs, prefill), (decode_seqs, decode) = mixed
    assert prefill_seqs == [sb] and decode_seqs == [sa, sc]

    assert prefill.input_ids.tolist() == [b[:8]]
    assert prefill.positions.tolist() == [list(range(8))]
    assert prefill.slots.tolist() == [list(range(12, 20))]                  # blocks 3 and 4
    assert prefill.gather.tolist() == [list(range(12, 20))]
    assert prefill.block_table.tolist() == [[3, 4, 5]] and prefill.seq_lens.tolist() == [8]
    assert (prefill.mode, prefill.sample_rows, prefill.decode_shaped) == ("mha", (), False)  # 2 prompt tokens to go

    assert decode.input_ids.tolist() == [[sa.tokens[6]], [sc.tokens[3]]]
    assert decode.positions.tolist() == [[6], [3]]
    assert decode.slots.tolist() == [[1 * 4 + 2], [2 * 4 + 3]]
    assert decode.block_table.tolist() == [[0, 1], [2, 0]] and decode.seq_lens.tolist() == [7, 4]
    assert decode.gather.tolist() == [[0, 1, 2, 3, 4, 5, 6], [8, 9, 10, 11, 0, 1, 2]]
    assert (decode.mode, decode.sample_rows, decode.decode_shaped) == ("mqa", (0, 1), True)
    assert decode.block_table.dtype == decode.seq_lens.dtype == torch.int32


def test_a_prefill_chunk_samples_only_the_rows_whose_prompt_it_ends():
    """Two prompts prefilled as one forward over positions 4..7 (tokens 4..7 of each): only the one
    whose prompt has 8 tokens is sampled. Up to DECODE_TOKENS new tokens at consecutive positions
    are decode-shaped (the paged kernels' path: a decode, a verifying one with drafts), more are
    not, nor tokens at positions that skip one."""
    ids = torch.zeros(2, 4, dtype=torch.long)
    pos = torch.arange(4, 8).repeat(2, 1)
    batch = Batch.build(ids, pos, [[1, 0], [2, 3, 4]], 4, mode="mqa", sample_rows=(1,))
    assert batch.sample_rows == (1,) and batch.decode_shaped
    assert batch.slots.tolist() == [[0, 1, 2, 3], [12, 13, 14, 15]]
    assert batch.gather.tolist() == [[4, 5, 6, 7, 0, 1, 2, 3], [8, 9, 10, 11, 12, 13, 14, 15]]
    pair = torch.tensor([[5, 6], [9, 10]])
    assert Batch.build(pair, pair, [[1, 0], [2, 3, 4]], 4).decode_shaped
    assert not Batch.build(pair, torch.tensor([[5, 7], [9, 10]]), [[1, 0], [2, 3, 4]], 4).decode_shaped
    n = DECODE_TOKENS + 1
    long = torch.arange(n).repeat(2, 1)
    tables = [list(range(-(-n // 4)))] * 2
    assert Batch.build(long[:, 1:], long[:, 1:], tables, 4).decode_shaped
    assert not Batch.build(long, long, tables, 4).decode_shaped
