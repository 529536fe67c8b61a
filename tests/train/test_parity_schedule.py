"""The DSA parity experiment's fair control (experiments/dsa_parity_moe.py): stage 2 and the dense
control run the same fixed step count under the same schedule, so both end with the same decayed
learning rate (hand-computed from the schedule's formula); the held-out windows are disjoint and
as many as asked for; mean and standard error across seeds."""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.train.data import PackedData
from dsv32.train.trainer import lr_at

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `experiments` as a package
from experiments.dsa_parity_moe import Windows, mean_se, plan, run_stage  # noqa: E402


def args(**kw):
    base = dict(steps_pretrain=7, steps_warmup=5, steps_sparse=50, lr_pretrain=1e-3, lr_warmup=1e-3, lr_sparse=1e-4)
    return argparse.Namespace(**{**base, **kw})


def test_stage_2_and_the_control_end_on_the_same_decayed_learning_rate(tmp_path):
    cfgs = plan(args(), 128, 0, tmp_path, dict(seq_len=2048, batch_size=8, device="cpu", warmup=20))
    s2, control = cfgs["dsa-sparse k128"], cfgs["dense control"]
    assert (s2.stage, s2.attention, s2.sparse) == ("dsa-sparse", "dense", True)
    assert (control.stage, control.sparse) == ("pretrain", False)
    assert s2.steps == control.steps == 50 and cfgs["pretrain"].steps == 7 and cfgs["dsa-warmup"].steps == 5
    # last step 49, warm-up 20: t = 29/30; lr = 1e-4 (0.1 + 0.9 * (1 + cos(29 pi / 30)) / 2)
    #   cos(29 pi / 30) = -0.9945219, so lr = 1e-4 * (0.1 + 0.45 * 0.0054781) = 1.024651e-5
    assert lr_at(49, s2) == lr_at(49, control) == pytest.approx(1.024651e-5, rel=1e-6)
    assert lr_at(49, s2) < 0.11 * s2.lr                       # decayed to ~0.1 of the peak, not near it
    # the old stage 2 (a 100,000-step schedule cut by a time budget) was still at ~the peak there
    old = type(s2)(**{**s2.__dict__, "steps": 100_000})
    assert lr_at(49, old) > 0.99 * s2.lr


def test_run_stage_takes_exactly_the_steps_its_schedule_spans(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    data = PackedData(np.random.default_rng(0).integers(2, 500, 4000), 16)
    cfgs = plan(args(steps_sparse=3), 8, 0, tmp_path, dict(seq_len=16, batch_size=2, device="cpu", warmup=1))
    ends = []
    for name in ("dsa-sparse k8", "dense control"):
        hist, tokens, _ = run_stage(Transformer(preset("tiny")).train() if name == "dense control" else model,
                                    data, cfgs[name])
        assert [h["step"] for h in hist] == [1, 2, 3] and tokens == 3 * 2 * 16
        ends.append(hist[-1]["lr"])
    # step 2 of 3, warm-up 1: t = 1/2, cos(pi / 2) = 0: lr = 1e-4 (0.1 + 0.45) = 5.5e-5
    assert ends[0] == ends[1] == pytest.approx(5.5e-5)


def test_held_out_windows_are_disjoint_and_cover_the_tokens_asked_for():
    ids = np.arange(1000)
    w = Windows.disjoint(ids, 64, 200)                         # ceil(200 / 64) = 4 windows
    assert len(w) == 4
    x, y = w.batch(10_000, 4)
    targets = y.flatten().tolist()
    assert len(set(targets)) == len(targets) == 256 and targets == list(range(1, 257))
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="fewer than the 1025"):
        Windows.disjoint(ids, 64, 1000)                        # 16 windows need 1025 tokens


def test_mean_and_standard_error_across_seeds():
    got = mean_se([1.0, 2.0, 3.0])                             # sample std 1, s.e. 1 / sqrt(3)
    assert got["mean"] == 2.0 and got["se"] == pytest.approx(1 / math.sqrt(3), abs=1e-4) and got["n"] == 3
    assert mean_se([5.0])["se"] is None
