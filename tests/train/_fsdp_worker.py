"""Run by test_fsdp: one rank of a 2-process CPU (gloo) FSDP2 training run."""

import json
import os
import sys

import torch
import torch.distributed as dist

from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.train import TrainConfig, Trainer
from dsv32.train.data import PackedData


def main(out):
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    data = PackedData(torch.randint(0, 512, (5000,), generator=torch.Generator().manual_seed(1)).numpy(), 32)
    cfg = TrainConfig(stage="pretrain", steps=4, batch_size=2, seq_len=32, out=out, warmup=1,
                      checkpoint_every=100, device="cpu")
    tr = Trainer(cfg, model, data)
    hist = tr.fit(resume=False)
    sd, _ = tr._full_state()
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "final.safetensors"))
        with open(os.path.join(out, "hist.json"), "w") as f:
            json.dump(hist, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/parallel/_worker.py: no C++ static destructors racing a gloo thread
