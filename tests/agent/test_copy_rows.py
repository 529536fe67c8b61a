"""The agent experiments' copy rows (experiments/agent_context.py `copy_rows`, `add_copy_rows`):
every target can be read from earlier in its row, and the rows are the asked share of the mix."""

import sys
from pathlib import Path

import pytest

from dsv32.train.losses import IGNORE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from agent_context import add_copy_rows, copy_rows

FIRST, VOCAB = 10, 4096


def test_repeat_rows_are_a_span_twice_with_targets_on_the_repeat_past_its_first_token():
    rows = copy_rows(FIRST, VOCAB, 20, 512, seed=0)[0::2]
    for ids, labels in rows:
        half = len(ids) // 2
        assert len(ids) == 2 * half and ids[:half] == ids[half:] and len(ids) <= 512
        assert labels[:half + 1] == [IGNORE] * (half + 1)
        assert labels[half + 1:] == ids[half + 1:]
        assert all(FIRST + 2 <= t < VOCAB for t in ids)


def test_lookup_targets_are_the_value_written_after_the_same_key_earlier_in_the_row():
    sep, end = FIRST, FIRST + 1
    for ids, labels in copy_rows(FIRST, VOCAB, 40, 700, seed=1)[1::2]:
        assert len(ids) == len(labels) <= 700
        first = labels.index(next(t for t in labels if t != IGNORE))
        lines = {}                                   # key -> value, read from the lines before the queries
        for i in range(0, first - 3, 7):
            assert ids[i + 2] == sep and ids[i + 6] == end
            lines[tuple(ids[i:i + 2])] = ids[i + 3:i + 7]
        queries = 0
        for i, t in enumerate(labels):
            if t != IGNORE and ids[i - 1] == sep:      # the first target of a query: its value follows
                assert ids[i:i + 4] == labels[i:i + 4] == lines[tuple(ids[i - 3:i - 1])]
                queries += 1
        assert queries == min(4, len(lines)) and queries > 0
        assert sum(t != IGNORE for t in labels) == 4 * queries


def test_the_rows_are_the_asked_share_of_what_sft_samples():
    examples = [([1, 2, 3], [IGNORE, 2, 3])] * 300
    mixed = add_copy_rows(examples, 0.25, FIRST, VOCAB, 256, seed=0)
    assert mixed[:300] == examples and len(mixed) == 400       # 100 of 400: a quarter
    assert add_copy_rows(examples, 0.0, FIRST, VOCAB, 256, seed=0) is examples
    with pytest.raises(ValueError, match="share"):
        add_copy_rows(examples, 1.0, FIRST, VOCAB, 256, seed=0)


def test_rows_depend_only_on_the_seed():
    assert copy_rows(FIRST, VOCAB, 6, 300, seed=4) == copy_rows(FIRST, VOCAB, 6, 300, seed=4)
    assert copy_rows(FIRST, VOCAB, 6, 300, seed=4) != copy_rows(FIRST, VOCAB, 6, 300, seed=5)


def test_copy_rows_of_a_grown_vocabulary_stay_below_its_trailing_special_tokens():
    """SmolLM2 given V3.2's tokens has them at the top of the vocabulary (ids 400.. here), ours at
    the bottom: either way no copy row writes a special token."""
    from argparse import Namespace

    from agent_context import sft_rows

    class Tok:  # the two attributes sft_rows reads
        vocab_size = 407
        special_ids = {f"s{i}": 400 + i for i in range(7)}

    args = Namespace(sft_all_tokens=False, sft_tool_weight=0.0, sft_copy_share=0.5, seed=0)
    examples = [([1, 2, 3], [IGNORE, 2, 3])] * 8
    rows = sft_rows(examples, args, Tok(), 128)[8:]
    assert len(rows) == 8 and all(0 <= t < 400 for ids, _ in rows for t in ids)
    Tok.special_ids = {f"s{i}": i for i in range(7)}
    assert all(7 <= t < 407 for ids, _ in sft_rows(examples, args, Tok(), 128)[8:] for t in ids)
