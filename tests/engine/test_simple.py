import subprocess
import sys

import pytest
import torch

from dsv32 import save_model
from dsv32.config import preset
from dsv32.engine import SamplingParams, generate
from dsv32.engine.sampler import sample
from dsv32.model import ContextLengthError, Transformer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(preset("tiny").replace(index_topk=8)).eval()


@pytest.mark.parametrize("sparse", [True, False])
def test_greedy_generation_equals_repeated_full_forward(tiny, sparse):
    prompt = torch.randint(0, 512, (20,)).tolist()
    got = list(generate(tiny, prompt, max_new_tokens=12, sparse=sparse, stop_ids=()))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(tiny(torch.tensor([seq]), sparse=sparse).logits[0, -1].argmax()))
    assert got == seq[20:]


def test_sampling_truncation_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, top_p=0.7, return_rl_data=True)
    draws = [sample(logits, p, g) for _ in range(200)]
    assert {d.token for d in draws} == {0, 1}  # 0.5 < 0.7 needs the second token, and no more
    assert draws[0].kept.tolist() == [0, 1]
    for d in draws:  # log-prob under the renormalised kept set: 0.5/0.8 or 0.3/0.8
        assert abs(d.logprob - torch.log(torch.tensor([0.5, 0.3])[d.token] / 0.8)) < 1e-6
    p = SamplingParams(temperature=1.0, top_k=3)
    assert {sample(logits, p, g).token for _ in range(300)} == {0, 1, 2}
    # top-k then top-p over what is left: top_k=2 renormalises to .625/.375, top_p=.6 keeps one
    p = SamplingParams(temperature=1.0, top_k=2, top_p=0.6, return_rl_data=True)
    assert sample(logits, p, g).kept.tolist() == [0]
    assert sample(logits, SamplingParams(temperature=0.0), g).token == 0


def test_seeded_sampling_is_reproducible(tiny):
    prompt = [1, 2, 3, 4]
    a = list(generate(tiny, prompt, 10, temperature=1.0, top_p=0.9, seed=7))
    b = list(generate(tiny, prompt, 10, temperature=1.0, top_p=0.9, seed=7))
    assert a == b


def test_generation_limits(tiny):
    with pytest.raises(ContextLengthError, match="no room"):
        list(generate(tiny, [1] * 1024))
    with pytest.raises(ValueError, match="empty"):
        list(generate(tiny, []))
    assert len(list(generate(tiny, [1] * 1020, max_new_tokens=50))) == 4  # stops at the context end


def test_cli_generate_runs_and_says_it_is_random(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsv32.cli", "generate", "Hi", "--preset", "tiny",
                        "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and r.stdout.startswith("Hi")
    torch.manual_seed(0)
    save_model(Transformer(preset("tiny")), tmp_path)
    r = subprocess.run([sys.executable, "-m", "dsv32.cli", "generate", "Hi", "--model", str(tmp_path),
                        "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "RANDOM" not in r.stderr and "5 tokens" in r.stderr
    (tmp_path / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "dsv32.cli", "generate", "Hi", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing required field" in r.stderr
