"""Text <-> token ids through a Hugging Face `tokenizer.json` and the `tokenizers` library.

The official checkpoint ships its tokenizer.json (byte-level BPE). For the small models we train
ourselves, `train_tokenizer` (CLI: `dsv32 tokenizer train`) makes a byte-level BPE from local text
files, with the chat format's special tokens as its first ids.
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv32.chat import BOS, EOS, SPECIAL_TOKENS, encode_messages
from dsv32.chat.chatml import ENDOFTEXT, IM_END, IM_START, SMOLLM2_SYSTEM, encode_chatml


class Tokenizer:
    """Encode, decode and apply the V3.2 chat template, special tokens each one id."""

    chat_format = "v32"

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        # Special token -> id; None where the file lacks it as a single token.
        self.special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id, self.eos_id = self.special_ids[BOS], self.special_ids[EOS]
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("tokenizer has no single-token BOS/EOS for the V3.2 chat format")
        self.stop_ids = (self.eos_id,)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer.json, or the tokenizer.json inside a directory."""
        path = Path(path)
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text. Special tokens written in the text become their ids; no BOS is added
        (the chat template writes it)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens included, so that the chat parsers see the markup."""
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], thinking_mode: str = "thinking", **kwargs) -> list[int]:
        """Token ids of the prompt for messages; kwargs as for `dsv32.chat.encode_messages`."""
        return self.encode(encode_messages(messages, thinking_mode, **kwargs))


class PlainTokenizer:
    """Encode and decode with a tokenizer.json that lacks the V3.2 chat tokens, such as an imported
    Llama-family model's (`dsv32.gguf_import`); its BOS/EOS ids come from the model's config.

    `chat_format` is "chatml" when the vocabulary has `<|im_start|>` and `<|im_end|>` (SmolLM2's
    format, `dsv32.chat.chatml`), else None: such a model takes plain text only. `stop_ids` end a
    reply: EOS, and in ChatML `<|im_end|>` and `<|endoftext|>`.
    """

    def __init__(self, tok: HFTokenizer, bos_id: int, eos_id: int, default_system: str | None = SMOLLM2_SYSTEM):
        self.tok, self.bos_id, self.eos_id, self.default_system = tok, bos_id, eos_id, default_system
        chatml = all(tok.token_to_id(t) is not None for t in (IM_START, IM_END))
        self.chat_format = "chatml" if chatml else None
        ends = [tok.token_to_id(t) for t in (IM_END, ENDOFTEXT)] if chatml else []
        self.stop_ids = tuple(dict.fromkeys(i for i in [eos_id, *ends] if i is not None))

    @classmethod
    def from_file(cls, path: str | Path, bos_id: int, eos_id: int) -> "PlainTokenizer":
        path = Path(path)
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)), bos_id, eos_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text, special tokens written in it included; no BOS is added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], thinking_mode: str = "chat", **kwargs) -> list[int]:
        """Token ids of the ChatML prompt for messages; kwargs as for `dsv32.chat.encode_chatml`
        (tools or thinking raise ChatFormatError: the format has neither)."""
        if self.chat_format is None:
            raise ValueError(f"this vocabulary has no chat tokens ({IM_START}, {IM_END}, or V3.2's): "
                             "the model takes plain text only")
        kwargs.setdefault("default_system", self.default_system)
        return self.encode(encode_chatml(messages, thinking_mode, **kwargs))


def load_tokenizer(model_dir: str | Path) -> "Tokenizer | PlainTokenizer":
    """The tokenizer of a model directory: a converted Llama-family model (config model_type
    llama_dsa) gets a PlainTokenizer with its config's BOS/EOS, one of ours the V3.2 Tokenizer."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}
    if config.get("model_type") == "llama_dsa":  # dsv32.model.llama.MODEL_TYPE (that module needs torch)
        return PlainTokenizer.from_file(model_dir, config.get("bos_token_id", 1), config.get("eos_token_id", 2))
    return Tokenizer.from_file(model_dir)


def train_tokenizer(files: list[str | Path], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE on text files and write `out_dir/tokenizer.json`.

    Byte-level means every string encodes (no unknown token) and decodes back exactly.
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return Tokenizer(tok)


def main(argv: list[str] | None = None) -> None:
    """`dsv32 tokenizer train --files F [F ...] --vocab-size N --out DIR`."""
    parser = argparse.ArgumentParser(prog="dsv32 tokenizer")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE with the V3.2 special tokens")
    train.add_argument("--files", nargs="+", required=True, help="local text files to train on")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    args = parser.parse_args(argv)
    tok = train_tokenizer(args.files, args.vocab_size, args.out)
    print(f"wrote {Path(args.out) / 'tokenizer.json'} with {tok.vocab_size} tokens")
