"""FSDP2 + expert parallelism on two CPU processes (gloo) equals one process taking both ranks'
batches as micro-batches, through a checkpoint and resume, in pretraining and the DSA stages."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.train import TrainConfig, Trainer
from dsv32.train.data import PackedData

STAGES = ("pretrain", "dsa-warmup", "dsa-sparse")


def test_fsdp2_with_expert_parallelism_matches_one_process(torchrun, tmp_path):
    r = torchrun(2, Path(__file__).parent / "_fsdp_ep_worker.py", tmp_path, ",".join(STAGES))
    assert r.returncode == 0, r.stderr[-4000:]
    for stage in STAGES:
        torch.manual_seed(0)
        data = PackedData(torch.randint(0, 512, (5000,), generator=torch.Generator().manual_seed(1)).numpy(), 32)
        cfg = TrainConfig(stage=stage, steps=3, batch_size=2, seq_len=32, out=str(tmp_path / f"one-{stage}"), warmup=1,
                          checkpoint_every=100, device="cpu", grad_accum=2, index_topk=8)
        one = Trainer(cfg, Transformer(preset("tiny")), data)
        hist = one.fit(resume=False)
        dist_hist = json.loads((tmp_path / stage / "hist.json").read_text())
        assert [h["step"] for h in dist_hist] == [1, 2, 3]
        for a, b in zip(hist, dist_hist):
            for key in ("lm", "indexer_kl", "grad_norm"):
                if key in a:
                    assert abs(a[key] - b[key]) < 1e-4, (stage, a["step"], key, a[key], b[key])
        # every expert came back from its rank; parameters agree to a few Adam steps at worst
        final = load_file(str(tmp_path / stage / "final.safetensors"))
        sd = one.model.state_dict()
        assert set(final) == set(sd)
        diff = torch.cat([(p - final[n]).abs().flatten() for n, p in sd.items()])
        assert diff.max() < 4 * cfg.lr and (diff > 1e-5).float().mean() < 0.05, stage
