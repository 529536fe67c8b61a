"""Every door of the `dsv32` command gives a clear answer: a known failure is one line and a
non-zero exit, told before any model loads; help names every flag's meaning and default; a rerun
resumes or says exactly why it will not."""

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch

import dsv32
from dsv32.cli import build_parser, main
from dsv32.rl import RLConfig
from dsv32.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "dsv32" / "model")   # a directory of Python files: tokenizer text
TEXT = str(ROOT / "dsv32" / "model" / "rope.py")  # one of them: training text


def door(argv, capsys):
    """(exit code, stdout, stderr) of `dsv32 ARGV`; argparse's exits included."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random model saved as a directory (no tokenizer: generate reads bytes)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    model, _ = dsv32.load("tiny")
    dsv32.save(model, path)
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    assert main(["tokenizer", "train", "--files", DATA, "--vocab-size", "300", "--out", str(path)]) == 0
    return path


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails the test: the door must answer before it."""
    import dsv32.loader
    import dsv32.server

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(dsv32.server, "load_engine", refuse)
    monkeypatch.setattr(dsv32.loader, "load", refuse)


# ---- generate ----

def test_an_unknown_preset_is_one_line(capsys, no_load):
    assert door(["generate", "hi", "--preset", "huge"], capsys) == \
        (2, "", "error: unknown preset 'huge': choose from deepseek-v3.2, tiny, small\n")


def test_a_device_name_torch_does_not_know_is_one_line(capsys, no_load):
    assert door(["generate", "hi", "--preset", "tiny", "--device", "gpu"], capsys) == \
        (2, "", "error: unknown device 'gpu': use cpu, cuda or cuda:N\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(capsys, no_load):
    code, out, err = door(["generate", "hi", "--preset", "tiny", "--device", "cuda"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --device cuda: ") and err.endswith("; use --device cpu\n")


def test_zero_new_tokens_is_refused_not_ignored(capsys, no_load):
    assert door(["generate", "hi", "--preset", "tiny", "--max-new-tokens", "0"], capsys) == \
        (2, "", "dsv32 generate: error: argument --max-new-tokens: must be at least 1, got 0 "
                "(see dsv32 generate --help)\n")



def test_a_repetition_penalty_that_is_not_positive_is_one_line(capsys, no_load):
    assert door(["generate", "hi", "--preset", "tiny", "--repetition-penalty", "0"], capsys) == \
        (2, "", "error: --repetition-penalty must be > 0 (1 = off), got 0.0\n")

def test_a_missing_model_is_named(capsys, no_load):
    assert door(["generate", "hi", "--model", "/nonexistent"], capsys) == \
        (2, "", "error: no model at /nonexistent: expected a model directory, a .gguf file, or a preset "
                "name (deepseek-v3.2, tiny, small)\n")


def test_a_truncated_safetensors_file_is_named(tiny_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:3000] if f.suffix == ".safetensors" else data)
    shard = next(broken.glob("*.safetensors"))
    code, out, err = door(["generate", "hi", "--model", str(broken)], capsys)
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert err.startswith(f"error: {shard} is not a readable safetensors file (3,000 bytes; a truncated")


def test_an_over_long_raw_prompt_is_refused_before_it_is_echoed(tiny_dir, capsys):
    prompt = "x" * 1100  # bytes are tokens here; the tiny context is 1024
    assert door(["generate", prompt, "--model", str(tiny_dir), "--raw"], capsys) == \
        (2, "", "error: the prompt has 1100 tokens, which leaves no room in the model's context of 1024 tokens\n")


# ---- serve and chat ----

def test_serve_names_a_missing_model(capsys):
    assert door(["serve", "--model", "/nonexistent", "--port", "0"], capsys) == \
        (2, "", "error: no model at /nonexistent: expected a model directory, a .gguf file, or a preset "
                "name (deepseek-v3.2, tiny, small)\n")


def test_serve_checks_the_port_before_the_model_loads(capsys, no_load):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert door(["serve", "--port", str(port)], capsys) == \
            (2, "", f"error: port {port} on 127.0.0.1 is in use or not available (Address already in use): "
                    "pick another with --port\n")


def test_chat_refuses_thinking_on_a_chatml_model_before_loading_it(capsys, no_load):
    assert door(["chat", "--thinking"], capsys) == \
        (2, "", "error: SmolLM2-135M-Instruct-DSA's chat format has no thinking mode: drop --thinking\n")


def test_the_served_model_id_is_the_model_as_given():
    from argparse import Namespace

    from dsv32.server import model_name

    assert model_name(Namespace(served_model_name=None, model="runs/s2/model/")) == "runs/s2/model"
    assert model_name(Namespace(served_model_name="mine", model="runs/s2/model")) == "mine"


# ---- tokenizer and convert ----

def test_tokenizer_trains_on_a_directory(tok_dir):
    from dsv32.tokenizer import Tokenizer

    assert Tokenizer.from_file(tok_dir).vocab_size == 300


def test_tokenizer_names_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "corpus.txt"
    assert door(["tokenizer", "train", "--files", str(missing), "--vocab-size", "300", "--out", str(tmp_path)],
                capsys) == (2, "", f"error: {missing} does not exist\n")


def test_saving_over_a_model_directory_leaves_no_stale_shards(tiny_dir, tmp_path):
    """What `convert --out` and `train`'s export do into a directory that held another model."""
    target = tmp_path / "m"
    dsv32.save(dsv32.load("tiny")[0], target)
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale shard of an older model")
    model, _ = dsv32.load("tiny", seed=1)
    dsv32.save(model, target)
    assert sorted(f.name for f in target.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    back, _ = dsv32.load(target, dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


# ---- train ----

@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "0", "steps must be at least 1, got 0"),
    ("--batch-size", "0", "batch_size must be at least 1, got 0"),
    ("--index-topk", "0", "index_topk must be at least 1 (or unset: the model's own), got 0"),
    ("--preset", "huge", "unknown preset 'huge': choose from deepseek-v3.2, tiny, small"),
    ("--device", "gpu", "unknown device 'gpu': use cpu, cuda or cuda:N"),
])
def test_train_refuses_bad_values_before_loading(flag, value, message, tmp_path, capsys, no_load):
    assert door(["train", "pretrain", "--data", DATA, "--out", str(tmp_path), flag, value], capsys) == \
        (2, "", f"error: {message}\n")


@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "0", "steps must be at least 1, got 0"),
    ("--max-new-tokens", "0", "max_new_tokens must be at least 1, got 0"),
    ("--preset", "huge", "unknown preset 'huge': choose from deepseek-v3.2, tiny, small"),
    ("--model", "/nonexistent", "no model at /nonexistent: expected a model directory, a .gguf file, or a preset "
                                "name (deepseek-v3.2, tiny, small)"),
])
def test_rl_refuses_bad_values_before_loading(flag, value, message, tmp_path, capsys, no_load):
    assert door(["rl", "--out", str(tmp_path), flag, value], capsys) == (2, "", f"error: {message}\n")


def test_stage_one_without_a_model_warns(tok_dir, tmp_path, capsys):
    code, _, err = door(["train", "dsa-warmup", "--tokenizer", str(tok_dir), "--data", TEXT, "--steps", "1",
                         "--seq-len", "32", "--batch-size", "1", "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "warning: dsa-warmup without --model trains the indexers of a RANDOM 'tiny' model: pass --model DIR" in err


def steps_logged(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ctrl_c_says_where_it_stopped_and_a_rerun_resumes_with_each_step_once(tok_dir, tmp_path, capsys,
                                                                                monkeypatch):
    from dsv32.train import Trainer

    out = tmp_path / "run"
    cmd = ["train", "pretrain", "--tokenizer", str(tok_dir), "--data", TEXT, "--steps", "4", "--seq-len", "32",
           "--batch-size", "2", "--checkpoint-every", "2", "--device", "cpu", "--out", str(out)]
    real = Trainer.train_step

    def ctrl_c_in_step_4(self):
        if self.step == 3:  # step 3 was logged, the checkpoint holds step 2
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_step_4)
    code, _, err = door(cmd, capsys)
    assert code == 130 and steps_logged(out) == [1, 2, 3]
    assert err.splitlines()[-1] == (f"interrupted: stopped at step 3 of 4; the last checkpoint is step 2 in "
                                    f"{out / 'checkpoint'}: rerun the same command to resume from it")
    monkeypatch.setattr(Trainer, "train_step", real)
    assert door(cmd, capsys)[0] == 0
    assert steps_logged(out) == [1, 2, 3, 4]  # step 3 ran twice, logged once

    code, _, err = door([*cmd, "--seq-len", "16", "--lr", "1e-3", "--steps", "6"], capsys)
    assert (code, err.splitlines()[-1]) == (2, (
        f"error: {out / 'checkpoint'} was written with another config (lr: 0.0003 -> 0.001; seq_len: 32 -> 16): "
        "rerun with --overwrite to start fresh, --no-resume to start fresh keeping the old checkpoint until the "
        "first new one, or the old values to resume"))
    assert door([*cmd, "--seq-len", "16", "--no-resume", "--steps", "1"], capsys)[0] == 0
    assert steps_logged(out) == [1]
    assert door([*cmd, "--seq-len", "24", "--overwrite", "--steps", "1"], capsys)[0] == 0
    assert steps_logged(out) == [1]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["config"]["seq_len"] == 24


# ---- help and --config ----

@pytest.mark.parametrize("command,cls", [("train", TrainConfig), ("rl", RLConfig)])
def test_every_train_and_rl_flag_has_help_and_its_default(command, cls):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        assert action.help and len(action.help) > 12, action.dest
        if action.dest in fields and action.dest != "stage":
            f = fields[action.dest]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ("none" if default in (None, []) else
                     " ".join(map(str, default)) if isinstance(default, list) else default)
            assert action.help.endswith(f"(default: {shown})"), (action.dest, action.help)
    text = sub.format_help()
    assert "tokens per training window (default: 256)" in text or command == "rl"


def test_generate_documents_its_prompt_top_k_and_seed():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    helps = {a.dest: a.help for a in sub._actions}
    assert all(helps[k] for k in ("prompt", "top_k", "seed"))


def test_field_docs_read_trailing_and_preceding_comments():
    from dsv32.flags import field_docs

    docs = field_docs(TrainConfig)
    assert docs["seq_len"] == "tokens per training window"
    assert docs["data"].startswith("text files, or directories of .txt")  # the comment block above it
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(field_docs(RLConfig)) == {f.name for f in dataclasses.fields(RLConfig)}


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_config_file_sets_options_and_flags_override_it(suffix, tmp_path, monkeypatch):
    import dsv32.train

    seen = {}
    monkeypatch.setattr(dsv32.train, "run", lambda cfg, resume: seen.update(cfg=cfg, resume=resume))
    file = tmp_path / f"run{suffix}"
    file.write_text('seq_len = 64\nlr = 0.002\ndata = ["a", "b"]\n' if suffix == ".toml"
                    else json.dumps({"seq-len": 64, "lr": 0.002, "data": ["a", "b"]}))
    assert main(["train", "sft", "--config", str(file), "--lr", "0.01", "--no-resume"]) == 0
    cfg = seen["cfg"]
    assert (cfg.stage, cfg.seq_len, cfg.lr, cfg.data, seen["resume"]) == ("sft", 64, 0.01, ["a", "b"], "no")


def test_a_config_file_with_an_unknown_or_mistyped_option_is_named(tmp_path, capsys, no_load):
    bad = tmp_path / "bad.toml"
    bad.write_text("seq_lenn = 64\n")
    code, _, err = door(["rl", "--config", str(bad)], capsys)
    assert code == 2 and err.startswith(f"error: --config {bad}: unknown option(s) seq_lenn (known: ")
    bad.write_text('steps = "ten"\n')
    assert door(["rl", "--config", str(bad)], capsys) == (2, "", f"error: --config {bad}: steps must be int, "
                                                                  "got 'ten'\n")


# ---- the Python API ----

def test_llm_text_ends_before_the_end_of_reply_token(tok_dir):
    """The tokenizer's stop ids end a reply by default, and the token that ended it stays in
    token_ids but not in text (SmolLM2's answers ended in '<|im_end|>')."""
    from dsv32.engine import LLM, SamplingParams
    from dsv32.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tok_dir)
    model, _ = dsv32.load("tiny", tokenizer=tok)
    tok.stop_ids = tuple(range(tok.vocab_size))  # whatever the random model says first ends the reply
    out = LLM(model, tokenizer=tok).generate("hello", SamplingParams(max_tokens=4))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "stop" and out.text == ""


def test_config_changes_name_each_changed_field_and_skip_free_and_newer_ones():
    from dsv32.train.resume import config_changes

    saved = {"seq_len": 256, "lr": 3e-4, "steps": 100, "data": ["a"]}
    now = {"seq_len": 128, "lr": 3e-4, "steps": 200, "data": ["a", "b"], "eval_every": 50}
    assert config_changes(saved, now) == ["data: ['a'] -> ['a', 'b']", "seq_len: 256 -> 128"]


def test_the_chat_banner_names_model_context_attention_and_load_time():
    from dsv32.engine import Engine, EngineConfig
    from dsv32.server.terminal import banner

    engine = Engine(dsv32.load("tiny")[0], EngineConfig(max_model_len=512, num_blocks=16))
    assert banner("tiny", engine, 1.25) == "tiny: 3 layers, context 512 tokens, DSA top-16; loaded in 1.2s on cpu"


def test_thinking_mode_is_known_from_the_family_before_loading(tiny_dir, tmp_path):
    from dsv32.preflight import has_thinking_mode

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama_dsa"}')
    assert has_thinking_mode(str(tiny_dir)) and has_thinking_mode("tiny")
    assert not has_thinking_mode(None) and not has_thinking_mode(str(llama)) and not has_thinking_mode("x.gguf")
