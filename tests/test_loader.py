"""`dsv32.load` / `dsv32.save`: every kind of source, the errors a user meets at the front door,
and every entry point going through them."""

import io
import json
import re
import tokenize
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import dsv32
from dsv32.checkpoint import CheckpointError
from dsv32.config import preset
from dsv32.llama.model import LlamaConfig, LlamaDSA
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.model import Transformer
from dsv32.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS_FILE = ROOT / "dsv32" / "model" / "mla.py"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def v32_tok(tmp_path_factory):
    return train_tokenizer([CORPUS_FILE], 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chatml_tok():
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(CORPUS_FILE)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def tiny_llama(vocab: int) -> LlamaDSA:
    torch.manual_seed(0)
    return LlamaDSA(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                                index_n_heads=2, index_head_dim=16, index_topk=8, bos_token_id=1, eos_token_id=0))


# ---- each kind of source ----

def test_a_preset_is_a_seeded_random_v32_model_sized_to_a_tokenizer(v32_tok, tmp_path):
    a, tok = dsv32.load("tiny", device="cpu", seed=3)
    b, _ = dsv32.load("tiny", device="cpu", seed=3)
    assert isinstance(a, Transformer) and tok is None and not a.training
    assert a.cfg == preset("tiny") and same_weights(a, b)
    c, tok = dsv32.load("tiny", device="cpu", tokenizer=v32_tok)
    assert tok is v32_tok and (c.cfg.vocab_size, c.cfg.eos_token_id) == (v32_tok.vocab_size, v32_tok.eos_id)
    v32_tok.tok.save(str(tmp_path / "tokenizer.json"))  # by path, as the CLI passes it
    d, tok = dsv32.load("tiny", device="cpu", tokenizer=str(tmp_path))
    assert d.cfg == c.cfg and tok.encode("def f(x):") == v32_tok.encode("def f(x):")


def test_a_v32_directory_round_trips_with_its_tokenizer(tmp_path, v32_tok):
    model, _ = dsv32.load("tiny", device="cpu", tokenizer=v32_tok)
    dsv32.save(model, tmp_path, tokenizer=v32_tok)
    back, tok = dsv32.load(tmp_path, device="cpu")
    assert isinstance(back, Transformer) and back.cfg == model.cfg and same_weights(back, model)
    assert isinstance(tok, Tokenizer) and tok.encode("def f(x):") == v32_tok.encode("def f(x):")
    assert back.embed_tokens.weight.dtype == torch.float32  # "auto": the config's torch_dtype
    assert dsv32.load(tmp_path, device="cpu", dtype="bfloat16")[0].embed_tokens.weight.dtype == torch.bfloat16


def test_a_llama_directory_loads_as_its_family_with_a_chatml_tokenizer(tmp_path, chatml_tok):
    model = tiny_llama(chatml_tok.get_vocab_size())
    dsv32.save(model, tmp_path, tokenizer=chatml_tok)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama_dsa"
    back, tok = dsv32.load(tmp_path, device="cpu", dtype="float32")
    assert isinstance(back, LlamaDSA) and same_weights(back, model)
    assert isinstance(tok, PlainTokenizer) and tok.chat_format == "chatml" and tok.bos_id == model.cfg.bos_token_id
    x = torch.tensor([tok.encode("def load(source):")])
    with torch.no_grad():
        assert torch.equal(back(x).logits, model.eval()(x).logits)


def test_a_gguf_file_loads_dense_with_its_own_tokenizer():
    pytest.importorskip("gguf")
    from dsv32.llama.gguf import smollm2_gguf

    model, tok = dsv32.load(smollm2_gguf(), device="cpu")
    assert isinstance(model, LlamaDSA) and model.cfg.num_hidden_layers == 30
    assert model.cfg.index_topk == model.cfg.max_position_embeddings  # new indexers: every key selected
    assert tok.chat_format == "chatml" and tok.decode(tok.encode("Hello, world")) == "Hello, world"


def test_save_copies_a_tokenizer_file_given_by_path(tmp_path, v32_tok, tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    v32_tok.tok.save(str(src / "tokenizer.json"))
    model, _ = dsv32.load("tiny", device="cpu", tokenizer=v32_tok)
    dsv32.save(model, tmp_path / "m", tokenizer=src)
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


# ---- the errors a user meets ----

def write_model(path: Path, tok) -> Path:
    model, _ = dsv32.load("tiny", device="cpu", tokenizer=tok)
    dsv32.save(model, path, tokenizer=tok)
    return path


def test_errors_name_what_is_wrong_with_the_source(tmp_path, v32_tok):
    with pytest.raises(FileNotFoundError, match=r"no model at .*nowhere.*a preset name \(deepseek-v3.2, tiny, small\)"):
        dsv32.load(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is a file but not a .gguf one"):
        dsv32.load(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        dsv32.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        dsv32.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        dsv32.load(tmp_path / "empty")
    d = write_model(tmp_path / "m", v32_tok)
    with pytest.raises(ValueError, match="dtype 'float64x' is not a torch dtype"):
        dsv32.load(d, dtype="float64x")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba' is not a model family dsv32 knows"):
        dsv32.load(d)


def test_a_truncated_safetensors_file_is_named(tmp_path, v32_tok):
    d = write_model(tmp_path / "m", v32_tok)
    (shard,) = d.glob("*.safetensors")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(CheckpointError, match=rf"{shard.name} is not a readable safetensors file .*truncated"):
        dsv32.load(d, device="cpu")


def test_a_tokenizer_bigger_than_the_model_is_refused(tmp_path, v32_tok):
    d = write_model(tmp_path / "m", v32_tok)
    big = train_tokenizer([CORPUS_FILE, ROOT / "dsv32" / "model" / "transformer.py"], 700, tmp_path / "big")
    assert big.vocab_size > v32_tok.vocab_size
    with pytest.raises(ValueError, match="more than the model's vocab_size"):
        dsv32.load(d, device="cpu", tokenizer=tmp_path / "big")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        dsv32.load(d, device="cpu", tokenizer=tmp_path / "bad")


def test_save_refuses_a_model_of_no_family(tmp_path):
    with pytest.raises(TypeError, match="Linear is not the model of a family"):
        dsv32.save(torch.nn.Linear(2, 2), tmp_path)


# ---- every entry point loads through dsv32.load ----

class Loaded(Exception):
    """Raised by the stand-in for dsv32.load, carrying the source it was asked for."""


@pytest.fixture
def spy(monkeypatch):
    import dsv32.loader

    def load(source=None, **kw):
        raise Loaded(source)

    monkeypatch.setattr(dsv32.loader, "load", load)


@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--model", "SRC"],
    ["chat", "--model", "SRC"],
    ["serve", "--model", "SRC", "--port", "0"],
    ["train", "pretrain", "--model", "SRC", "--data", "x.txt"],
    ["rl", "--model", "SRC"],
    ["eval", "--tasks", "TASKS", "--model", "SRC", "--out", "OUT"],
    ["agent", "say hi", "--model", "SRC", "--tools", "bash", "--unsafe-no-sandbox"],
])
def test_every_cli_command_loads_its_model_through_dsv32_load(spy, argv, tmp_path):
    from dsv32.cli import main

    (tmp_path / "tasks.jsonl").write_text('{"id": "t", "prompt": "1+1?", "answer": "2"}\n')
    (tmp_path / "SRC").mkdir()  # the commands check that a model path exists before loading it
    names = {"TASKS": tmp_path / "tasks.jsonl", "OUT": tmp_path / "out", "SRC": tmp_path / "SRC"}
    argv = [str(names[a]) if a in names else a for a in argv]
    with pytest.raises(Loaded, match="SRC"):
        main(argv)


def test_the_library_entry_points_load_through_dsv32_load(spy):
    from dsv32.engine import LLM
    from dsv32.train import TrainConfig, Trainer

    with pytest.raises(Loaded, match="SRC"):
        LLM("SRC")
    with pytest.raises(Loaded, match="SRC"):
        Trainer(TrainConfig(model="SRC", device="cpu"), data=None)


def code_names(path: Path) -> list[str]:
    """Identifiers and string literals of a Python file, comments and docstrings left out."""
    out, prev = [], tokenize.INDENT
    for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if t.type == tokenize.NAME or (t.type == tokenize.STRING and prev not in (tokenize.INDENT, tokenize.NEWLINE,
                                                                                  tokenize.NL, tokenize.DEDENT)):
            out.append(t.string)
        if t.type not in (tokenize.COMMENT,):
            prev = t.type
    return out


def test_the_second_family_is_named_only_in_its_folder_and_the_registry():
    """Code outside dsv32/llama/ and dsv32/registry.py reaches that family only through the registry:
    no identifier or string of its own (docs and comments may mention it)."""
    family = re.compile(r"llama|smollm|chatml|plaintokenizer", re.I)
    own = {ROOT / "dsv32" / "registry.py"}
    offenders = {}
    for path in sorted((ROOT / "dsv32").rglob("*.py")):
        if path in own or (ROOT / "dsv32" / "llama") in path.parents:
            continue
        hits = sorted({n for n in code_names(path) if family.search(n)})
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}
