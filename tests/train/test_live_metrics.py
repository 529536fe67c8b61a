"""What a run shows while it runs: metrics.png redrawn every plot_every steps, lr / grad norm /
tokens/s / held-out loss in every row where due, and DSA top-k recall in the DSA stages."""

import json

import pytest
import torch

import dsv32.train.trainer as trainer_module
from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.train import TrainConfig, Trainer
from dsv32.train.data import PackedData, SFTData
from dsv32.train.losses import IGNORE, topk_recall
from dsv32.train.plots import TRAIN_PANELS, plot_metrics


def stream(seed):
    return PackedData(torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(seed)).numpy(), 32)


def test_topk_recall_is_the_attention_mass_inside_the_selected_keys():
    # one query row per position; k = 2, so only positions 2 and 3 (which see 3 and 4 keys) count
    p = torch.tensor([[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]]])
    idx = torch.tensor([[[0, -1], [0, 1], [2, 0], [3, 1]]])
    # position 2 keeps 0.5 + 0.2, position 3 keeps 0.4 + 0.2; heads summed = any positive scale
    assert topk_recall(3 * p, idx, 2) == pytest.approx((0.7 + 0.6) / 2)
    assert topk_recall(p, idx, 4) is None  # no query sees more than k keys: nothing to measure


@pytest.mark.slow
def test_a_dsa_stage_logs_recall_held_out_loss_and_redraws_its_plot_while_running(tmp_path, monkeypatch):
    drawn = []
    real = trainer_module.plot_metrics

    def spy(jsonl, png):
        drawn.append(len(jsonl.read_text().splitlines()))  # how many steps the plot saw
        return real(jsonl, png)

    monkeypatch.setattr(trainer_module, "plot_metrics", spy)
    torch.manual_seed(0)
    cfg = TrainConfig(stage="dsa-warmup", steps=4, batch_size=2, seq_len=32, index_topk=8, out=str(tmp_path),
                      warmup=1, device="cpu", checkpoint_every=100, eval_every=2, eval_batches=1, plot_every=2)
    Trainer(cfg, Transformer(preset("tiny")), stream(1), stream(2)).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert drawn == [2, 4, 4]  # at steps 2 and 4, then once more at the end
    assert all({"lr", "grad_norm", "tokens_per_s", "indexer_kl"} <= set(r) for r in rows)
    assert all(0 < r["topk_recall"] <= 1 for r in rows)
    assert [r["step"] for r in rows if "eval_lm" in r] == [2, 4]
    assert (tmp_path / "metrics.png").stat().st_size > 0


def test_the_plot_has_a_panel_per_metric_present(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "lm": 5.0 - s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0} for s in (1, 2, 3)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lm"')  # torn
    assert plot_metrics(tmp_path / "m.jsonl", tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "m.tmp.png").exists()
    titles = [t for keys, t in TRAIN_PANELS if any(k in rows[0] for k in keys)]
    assert titles == ["LM loss (train, held out)", "learning rate", "grad norm (before clipping)", "tokens/s"]


def test_tokens_per_second_counts_the_positions_a_trimmed_sft_batch_computes(tmp_path):
    # rows of 10-40 tokens in a 256-token window: SFTData trims each batch to 64 positions, so a step
    # computes batch_size x 64 positions, and tokens/s and the running total count those, not 256
    examples = [(list(range(1, n)), [IGNORE] * (n // 2) + list(range(n // 2, n - 1))) for n in (10, 25, 40)]
    cfg = TrainConfig(stage="sft", steps=3, batch_size=4, seq_len=256, out=str(tmp_path), warmup=1, device="cpu",
                      checkpoint_every=100, plot_every=100)
    torch.manual_seed(0)
    Trainer(cfg, Transformer(preset("tiny")), SFTData(examples, 256, pad_id=0)).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["batch_tokens"], r["width"]) for r in rows] == [(4 * 64, 64)] * 3
    assert [r["tokens"] for r in rows] == [256, 512, 768]
    assert all(r["tokens_per_s"] > 0 for r in rows)
