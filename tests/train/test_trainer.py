import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv32.config import preset
from dsv32.kernels import force
from dsv32.model import Transformer
from dsv32.train import TrainConfig, Trainer, losses
from dsv32.train.data import PackedData
from dsv32.train.trainer import lr_at

ROOT = Path(__file__).resolve().parents[2]


def data(seq=32):
    return PackedData(torch.randint(0, 512, (5000,), generator=torch.Generator().manual_seed(1)).numpy(), seq)


def trainer(stage, tmp_path, steps=4, device="cpu", **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(stage=stage, steps=steps, batch_size=2, seq_len=32, out=str(tmp_path), warmup=1,
                      index_topk=8, device=device, checkpoint_every=100, **kw)
    return Trainer(cfg, Transformer(preset("tiny")), data())


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def indexer(name):
    return ".indexer." in name


# The indexer's scores come from the Triton kernel on CUDA: training must work on that path too.
# On CPU it runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with the
# reference top-k (the top-k kernel takes ~10 s a forward there and has no gradient to test).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PATHS = [pytest.param("cpu", "ref", id="cpu-ref"),
         pytest.param("cpu", "triton", id="cpu-triton-interpreted",
                      marks=pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs its interpreter")),
         pytest.param("cuda", "triton", id="cuda-triton", marks=pytest.mark.gpu)]


@pytest.fixture
def kernels(monkeypatch, device, backend):
    """Run the test's block on `backend`'s kernels (under the interpreter: all but top-k)."""
    if device == "cpu" and backend == "triton":
        import dsv32.kernels.topk

        monkeypatch.setattr(dsv32.kernels.topk, "use_triton", lambda t: False)
    return lambda: force(backend)


@pytest.mark.parametrize("device,backend", PATHS)
def test_stage1_trains_only_the_indexers_mtp_included(tmp_path, device, backend, kernels):
    tr = trainer("dsa-warmup", tmp_path, device=device)
    x, y = (t.to(device) for t in tr.data.batch(0, 2))
    with kernels():
        loss, metrics, out = tr.loss(x, y)
        loss.backward()
    assert len(out.index_scores) == tr.model.cfg.num_hidden_layers + len(tr.model.mtp)
    g = grads(tr.model)
    assert all(v is None for n, v in g.items() if not indexer(n))
    no_grad = [n for n, v in g.items() if indexer(n) and (v is None or v.abs().sum() == 0)]
    assert not no_grad and any(n.startswith("mtp.") for n in g if indexer(n))
    assert set(metrics) == {"indexer_kl", "topk_recall"}  # no LM loss: stage 1 trains the indexers alone


@pytest.mark.parametrize("device,backend", PATHS)
def test_stage1_lowers_the_kl_and_moves_only_the_indexers(tmp_path, device, backend, kernels):
    tr = trainer("dsa-warmup", tmp_path, steps=6, device=device, lr=3e-3)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with kernels():
        hist = [tr.train_step() for _ in range(6)]
        x, y = (t.to(device) for t in tr.data.batch(0, 2))
        with torch.no_grad():
            first = trainer("dsa-warmup", tmp_path / "b", device=device).loss(x, y)[1]["indexer_kl"]
            last = tr.loss(x, y)[1]["indexer_kl"]
    assert last < 0.9 * first, (first, last, [h["indexer_kl"] for h in hist])
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in before if indexer(n)}


@pytest.mark.parametrize("device,backend", PATHS)
def test_stage2_separates_lm_and_indexer_gradients(tmp_path, device, backend, kernels):
    tr = trainer("dsa-sparse", tmp_path, device=device)
    x, y = (t.to(device) for t in tr.data.batch(0, 2))
    with kernels():
        out = tr.model(x, sparse=True, mtp=True, return_aux=True, return_attn_probs=True, detach_indexer=True)
        (losses.lm_loss(out.logits, y) + losses.mtp_loss(out.mtp_logits, y)).backward(retain_graph=True)
        g = grads(tr.model)
        assert all(v is None or v.abs().sum() == 0 for n, v in g.items() if indexer(n))
        assert g["layers.0.self_attn.q_a_proj.weight"].abs().sum() > 0
        assert g["mtp.0.eh_proj.weight"].abs().sum() > 0
        tr.model.zero_grad(set_to_none=True)
        kl = sum(losses.indexer_kl_sparse(s, p, i) for s, p, i in zip(out.index_scores, out.attn_probs, out.topk_indices))
        kl.backward()
    g = grads(tr.model)
    assert all(v is None or v.abs().sum() == 0 for n, v in g.items() if not indexer(n))
    no_grad = [n for n, v in g.items() if indexer(n) and (v is None or v.abs().sum() == 0)]
    assert not no_grad


def test_stage2_clips_the_indexers_apart_from_the_rest(tmp_path):
    tr = trainer("dsa-sparse", tmp_path, grad_clip=1e-6)
    x, y = tr.data.batch(0, 2)
    tr.loss(x, y)[0].backward()
    groups = tr.clip_groups()
    assert {n for n, _ in groups["indexer_grad_norm"]} == {n for n, _ in tr.named if indexer(n)}
    norm = lambda group: torch.stack([p.grad.norm() for _, p in group if p.grad is not None]).norm()
    before = {k: norm(v) for k, v in groups.items()}
    norms = tr.clip_gradients()
    for k, group in groups.items():  # each group's own norm is reported and clipped to grad_clip
        assert norms[k] == pytest.approx(float(before[k]), rel=1e-5) and before[k] > 1e-5
        assert float(norm(group)) == pytest.approx(1e-6, rel=1e-2)  # (clip_grad_norm_ adds 1e-6 to the norm)
    assert set(trainer("pretrain", tmp_path / "p").clip_groups()) == {"grad_norm"}


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    whole = trainer("pretrain", tmp_path / "a", steps=6)
    whole.fit()
    crashy = trainer("pretrain", tmp_path / "b", steps=6, )
    crashy.cfg.checkpoint_every = 3
    real_step = crashy.train_step

    def dies_at_step_5():
        if crashy.step == 4:
            raise KeyboardInterrupt("killed")
        return real_step()

    crashy.train_step = dies_at_step_5
    with pytest.raises(KeyboardInterrupt):
        crashy.fit()
    resumed = trainer("pretrain", tmp_path / "b", steps=6)
    resumed.cfg.checkpoint_every = 3
    resumed.fit()
    assert resumed.step == 6
    for (n, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    # step 4 ran twice, before the kill and after: the resumed run cut it back to the checkpoint's 3
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=2, steps=12, min_lr_ratio=0.1)
    assert [round(lr_at(s, cfg), 4) for s in (0, 1, 2, 12)] == [0.5, 1.0, 1.0, 0.1]
    assert TrainConfig(stage="dsa-warmup").lr == 1e-3 and TrainConfig(stage="dsa-sparse").lr == 7.3e-6
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="finetune")


def test_pretraining_lowers_the_loss_and_balances(tmp_path):
    tr = trainer("pretrain", tmp_path, steps=30)
    tr.cfg.lr = 3e-3
    tr.data = PackedData((torch.arange(5000) * 7 % 61).numpy(), 32)  # a learnable periodic stream
    hist = tr.fit()
    assert hist[-1]["lm"] < hist[0]["lm"] - 1.0
    bias = tr.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the aux-loss-free update moved the selection bias


def test_fsdp2_on_two_cpu_processes_matches_one_process(tmp_path, torchrun):
    """2 ranks x 1 micro-batch see the same batches as 1 rank x 2 micro-batches."""
    r = torchrun(2, Path(__file__).parent / "_fsdp_worker.py", tmp_path / "fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    torch.manual_seed(0)
    cfg = TrainConfig(stage="pretrain", steps=4, batch_size=2, seq_len=32, out=str(tmp_path / "one"), warmup=1,
                      checkpoint_every=100, device="cpu", grad_accum=2)
    one = Trainer(cfg, Transformer(preset("tiny")), data())
    hist = one.fit(resume=False)
    dist_hist = json.loads((tmp_path / "fsdp" / "hist.json").read_text())
    for a, b in zip(hist, dist_hist):
        assert abs(a["lm"] - b["lm"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    # Adam turns float-summation noise in near-zero gradients into whole lr-sized steps of either
    # sign, so parameters agree to a few lr at worst and almost everywhere far better
    final = load_file(str(tmp_path / "fsdp" / "final.safetensors"))
    diff = torch.cat([(p - final[n]).abs().flatten() for n, p in one.model.state_dict().items()])
    assert diff.max() < 4 * cfg.lr and (diff > 1e-5).float().mean() < 0.05


def test_cli_stages_end_to_end(tmp_path):
    """tokenizer -> dense pretraining -> stage 1 -> stage 2 through `dsv32`, then generation
    from the exported model."""
    from dsv32.cli import main

    src = str(ROOT / "dsv32" / "model")
    assert main(["tokenizer", "train", "--files", src + "/mla.py", "--vocab-size", "400", "--out", str(tmp_path / "tok")]) == 0
    common = ["--data", src, "--steps", "3", "--seq-len", "64", "--batch-size", "2", "--device", "cpu"]
    assert main(["train", "pretrain", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "pre"), *common]) == 0
    assert main(["train", "dsa-warmup", "--model", str(tmp_path / "pre" / "model"), "--index-topk", "16",
                 "--out", str(tmp_path / "s1"), *common]) == 0
    assert main(["train", "dsa-sparse", "--model", str(tmp_path / "s1" / "model"), "--index-topk", "16",
                 "--out", str(tmp_path / "s2"), *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"lm", "indexer_kl"} <= set(rows[0])
    assert main(["generate", "def ", "--model", str(tmp_path / "s2" / "model"), "--max-new-tokens", "4"]) == 0
    assert main(["train", "pretrain", "--out", str(tmp_path / "x"), *common]) == 2  # no tokenizer: clear error


def test_cli_trains_a_converted_smollm2(tmp_path):
    """`dsv32 convert smollm2`, then stage 1 on it through `dsv32 train` (its own tokenizer)."""
    pytest.importorskip("gguf")
    import textwrap

    from dsv32 import load
    from dsv32.cli import main
    from dsv32.llama.model import LlamaDSA

    (tmp_path / "smol").mkdir()  # a directory that held a sharded model: convert leaves none of it
    (tmp_path / "smol" / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard")
    assert main(["convert", "smollm2", "--out", str(tmp_path / "smol")]) == 0
    assert [f.name for f in (tmp_path / "smol").glob("*.safetensors")] == ["model.safetensors"]
    assert main(["train", "dsa-warmup", "--model", str(tmp_path / "smol"), "--data", textwrap.__file__,
                 "--steps", "2", "--seq-len", "48", "--batch-size", "1", "--index-topk", "16",
                 "--device", "cpu", "--out", str(tmp_path / "s1")]) == 0
    (before, _), (after, _) = load(tmp_path / "smol", dtype="float32"), load(tmp_path / "s1" / "model", dtype="float32")
    assert isinstance(after, LlamaDSA)
    changed = {n for (n, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()) if not torch.equal(a, b)}
    assert changed and all(".indexer." in n for n in changed)  # stage 1 moved the indexers only
