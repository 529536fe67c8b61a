"""Run by test_fsdp_ep: one rank of a CPU (gloo) FSDP2 + expert-parallel training run of two
steps, then a fresh trainer that resumes from its checkpoint for a third."""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.train import TrainConfig, Trainer
from dsv32.train.data import PackedData


def main(root, stages):
    dist.init_process_group("gloo")
    for stage in stages:
        run(os.path.join(root, stage), stage)
    dist.destroy_process_group()


def run(out, stage):
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    data = PackedData(torch.randint(0, 512, (5000,), generator=torch.Generator().manual_seed(1)).numpy(), 32)
    cfg = TrainConfig(stage=stage, steps=2, batch_size=2, seq_len=32, out=out, warmup=1,
                      checkpoint_every=100, device="cpu", ep=dist.get_world_size(), index_topk=8)
    hist = Trainer(cfg, model, data).fit(resume=False)      # steps 1-2, checkpoint at 2
    torch.manual_seed(0)
    again = Trainer(TrainConfig(**{**cfg.__dict__, "steps": 3}), Transformer(preset("tiny")), data)
    hist += again.fit(resume=True)                          # resumes at 2, runs step 3
    sd, _ = again._full_state()
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "final.safetensors"))
        with open(os.path.join(out, "hist.json"), "w") as f:
            json.dump(hist, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
