"""GPU runs of the model: CUDA agrees with the CPU, in fp32 and in bf16."""

import pytest
import torch

from dsv32.config import preset
from dsv32.engine import generate
from dsv32.model import Transformer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cpu = Transformer(preset("tiny")).eval()
    gpu = Transformer(preset("tiny")).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@torch.no_grad()
@pytest.mark.parametrize("mode", ["mha", "mqa"])
def test_cuda_fp32_matches_cpu(pair, mode):
    cpu, gpu = pair
    ids = torch.randint(0, 512, (2, 64))
    want = cpu(ids, mode=mode).logits
    got = gpu(ids.cuda(), mode=mode).logits.cpu()
    assert (got - want).abs().max() < 1e-3


@torch.no_grad()
def test_cuda_bf16_close_to_fp32(pair):
    cpu, gpu = pair
    ids = torch.randint(0, 512, (2, 64))
    want = cpu(ids, sparse=False).logits
    half = Transformer(cpu.cfg).cuda()
    half.load_state_dict(cpu.state_dict())
    got = half.to(torch.bfloat16).eval()(ids.cuda(), sparse=False).logits.float().cpu()
    assert (got - want).norm() / want.norm() < 0.05


def test_cuda_greedy_generation_matches_cpu(pair):
    cpu, gpu = pair
    prompt = list(range(1, 30))
    assert list(generate(cpu, prompt, 16)) == list(generate(gpu, prompt, 16))
