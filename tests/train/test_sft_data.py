"""SFTData's batches: cut to the longest row (rounded up to 64), with the same loss as the
full-width batch, which a causal model cannot tell apart."""

import torch

from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.train.data import SFTData
from dsv32.train.losses import IGNORE, lm_loss


def _examples(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=g).tolist()
        out.append((ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


def test_a_batch_is_as_wide_as_its_longest_row_rounded_up_to_64():
    data = SFTData(_examples([30, 70, 129]), seq_len=256, pad_id=0, seed=1)
    for step in range(20):
        x, y = data.batch(step, 2)
        longest = max((row != IGNORE).nonzero().max().item() + 1 for row in y)   # the last labelled position
        assert x.shape == y.shape and x.shape[1] % 64 == 0 and longest <= x.shape[1] < longest + 64
    capped = SFTData(_examples([300]), seq_len=256, pad_id=0)
    assert capped.batch(0, 1)[0].shape == (1, 256)                              # never past seq_len


@torch.no_grad()
def test_the_cut_batch_has_the_full_width_batchs_loss():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    data = SFTData(_examples([40, 90, 20]), seq_len=256, pad_id=0, seed=3)
    x, y = data.batch(5, 3)
    wide_x = torch.zeros(3, 256, dtype=x.dtype)
    wide_y = torch.full((3, 256), IGNORE, dtype=y.dtype)
    wide_x[:, :x.shape[1]], wide_y[:, :y.shape[1]] = x, y
    assert x.shape[1] < 256
    torch.testing.assert_close(lm_loss(model(x).logits, y), lm_loss(model(wide_x).logits, wide_y),
                               rtol=1e-5, atol=1e-5)
