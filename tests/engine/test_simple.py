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



def test_greedy_generation_with_a_repetition_penalty_follows_ctrl_by_hand(tiny):
    """CTRL's penalty over prompt and generated tokens: a positive logit of a token already in the
    context is divided by r, a negative one multiplied by r; greedy takes the argmax of that."""
    torch.manual_seed(1)
    prompt, r = torch.randint(0, 512, (20,)).tolist(), 3.0
    got = list(generate(tiny, prompt, max_new_tokens=10, stop_ids=(), repetition_penalty=r))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            logits = tiny(torch.tensor([seq]), sparse=True).logits[0, -1].clone()
            seen = torch.tensor(sorted(set(seq)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / r, logits[seen] * r)
            seq.append(int(logits.argmax()))
    assert got == seq[20:]
    assert got != list(generate(tiny, prompt, max_new_tokens=10, stop_ids=()))  # the penalty changed the reply

def test_sampling_truncation_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, top_p=0.7, return_rl_data=True)
    draws = [sample(logits[None], [p], [g])[0] for _ in range(200)]
    assert {d.token for d in draws} == {0, 1}  # 0.5 < 0.7 needs the second token, and no more
    assert draws[0].kept.tolist() == [0, 1]
    for d in draws:  # log-prob under the renormalised kept set: 0.5/0.8 or 0.3/0.8
        assert abs(d.logprob - torch.log(torch.tensor([0.5, 0.3])[d.token] / 0.8)) < 1e-6
    p = SamplingParams(temperature=1.0, top_k=3)
    assert {sample(logits[None], [p], [g])[0].token for _ in range(300)} == {0, 1, 2}
    # top-k then top-p over what is left: top_k=2 renormalises to .625/.375, top_p=.6 keeps one
    p = SamplingParams(temperature=1.0, top_k=2, top_p=0.6, return_rl_data=True)
    assert sample(logits[None], [p], [g])[0].kept.tolist() == [0]
    assert sample(logits[None], [SamplingParams(temperature=0.0)], [g])[0].token == 0


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


def _kept_by_hand(row: list[float], temperature: float, top_p: float, top_k: int) -> list[int]:
    """Plain-Python truncation of one row: top-k (ties kept), then the smallest top-p prefix."""
    import math

    x = [v / temperature for v in row]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if 0 < top_k < len(x):
        order = [i for i in order if x[i] >= x[order[top_k - 1]]]
    z = sum(math.exp(x[i]) for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(x[i]) / z
    return sorted(kept)


def test_batched_sampling_matches_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 2
    params = [SamplingParams(temperature=0.7, top_p=0.8, return_rl_data=True),
              SamplingParams(temperature=0.0, return_rl_data=True),
              SamplingParams(temperature=1.3, top_k=5, return_rl_data=True),
              SamplingParams(temperature=1.0, top_k=8, top_p=0.6, seed=3, return_rl_data=True),
              SamplingParams(temperature=1.0, logprobs=3),
              SamplingParams(temperature=1.0, top_p=0.5)]
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    out = sample(logits, params, gens)
    for row, p, s in zip(logits, params, out):
        if p.temperature == 0:
            assert s.token == int(row.argmax()) and s.kept is None
            assert abs(s.logprob - float(row.log_softmax(-1)[s.token])) < 1e-6
            continue
        truncates = p.top_k or p.top_p < 1
        kept = _kept_by_hand(row.tolist(), p.temperature, p.top_p, p.top_k) if truncates else list(range(40))
        assert s.token in kept
        assert (None if s.kept is None else s.kept.tolist()) == (kept if p.return_rl_data and truncates else None)
        ref = (row[kept] / p.temperature).log_softmax(-1)[kept.index(s.token)]
        assert abs(s.logprob - float(ref)) < 1e-5
    assert [t for t, _ in out[4].top] == logits[4].topk(3).indices.tolist()
    assert out[0].top is None
    # the seeded row draws from its own generator alone: the same token whatever the other rows do
    again = sample(logits[3:4], params[3:4], [torch.Generator().manual_seed(3)])[0]
    assert again.token == out[3].token
