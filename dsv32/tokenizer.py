"""Text <-> token ids through a Hugging Face `tokenizer.json` and the `tokenizers` library, and
generated ids -> streamed text (`Detokenizer`).

The official checkpoint ships its tokenizer.json (byte-level BPE). For the small models we train
ourselves, `train_tokenizer` (CLI: `dsv32 tokenizer train`) makes a byte-level BPE from local text
files, with the chat format's special tokens as its first ids.
"""

import argparse
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv32.chat import BOS, EOS, SPECIAL_TOKENS, StreamParser, encode_messages
from dsv32.chat.grammar import chat_grammar
from dsv32.preflight import positive_int, text_files

LONG_TEXT = 1 << 16  # characters beyond which encode releases the GIL (encode_ids)


class TooManyTokens(ValueError):
    """A text has more tokens than the caller's limit (found without making its list of ids)."""

    def __init__(self, n_tokens: int, limit: int):
        super().__init__(f"the text has {n_tokens} tokens, more than the limit of {limit}")
        self.n_tokens, self.limit = n_tokens, limit


def encode_ids(tok: HFTokenizer, text: str, limit: int | None = None) -> list[int]:
    """Token ids of text (no special tokens added). A long text goes through encode_batch, which
    releases the GIL while it works (encode does not), so that tokenising it in a worker thread
    stalls no other thread; one over `limit` tokens raises TooManyTokens before its ids become a
    Python list (millions of int objects for a text of megabytes)."""
    if len(text) > LONG_TEXT:
        enc = tok.encode_batch([text], add_special_tokens=False)[0]
        if limit is not None and len(enc) > limit:
            raise TooManyTokens(len(enc), limit)
        return enc.ids
    ids = tok.encode(text, add_special_tokens=False).ids
    if limit is not None and len(ids) > limit:
        raise TooManyTokens(len(ids), limit)
    return ids


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

    @classmethod
    def for_model(cls, path: str | Path, cfg) -> "Tokenizer":
        """The tokenizer at `path` for a model of config `cfg` (a family's tokenizer entry in
        `dsv32.registry`; V3.2's needs nothing from the config)."""
        return cls.from_file(path)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of text. Special tokens written in the text become their ids; no BOS is added
        (the chat template writes it). limit: raise TooManyTokens beyond it (encode_ids)."""
        return encode_ids(self.tok, text, limit)

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens included, so that the chat parsers see the markup."""
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], thinking_mode: str = "thinking", limit: int | None = None,
                            **kwargs) -> list[int]:
        """Token ids of the prompt for messages; kwargs as for `dsv32.chat.encode_messages`; limit as
        for encode."""
        return self.encode(encode_messages(messages, thinking_mode, **kwargs), limit)

    def reply_grammar(self, **request) -> str | None:
        """The grammar a chat request's reply must follow in this format (constrained decoding), or
        None if it is free; request: thinking, response_format, tools, tool_choice,
        parallel_tool_calls, as for `dsv32.chat.grammar.chat_grammar`."""
        return chat_grammar(self.special_ids, **request)

    def stream_parser(self, thinking_mode: str = "chat", lenient: bool = False, tools: bool = True,
                      tool_deltas: bool = False) -> StreamParser:
        """The parser of a reply in this vocabulary's chat format, fed decoded text as it streams
        (tools, tool_deltas: as for StreamParser)."""
        return StreamParser(thinking_mode, lenient=lenient, tools=tools, tool_deltas=tool_deltas)


class Detokenizer:
    """Token ids -> the text they add, once it can no longer change: the one place that turns a
    stream of generated ids into text (`LLM`, the server, the terminal chat, `dsv32 generate`).

    An incomplete UTF-8 character (a byte-level token ending mid-character) is held back until its
    last byte arrives, and so is text that may be the start of a stop string. The text ends before
    the first stop string to be completed (of two completed by the same character, the longer);
    `stopped` then says so, and the caller aborts the request. Special tokens are single ids and
    decode whole; markup spread over several tokens (the tool-call block) is held back by the chat
    StreamParser, not here. Decoding works on a short window of ids (as vLLM does), so a long reply
    costs no quadratic decode. tokenizer: anything with decode(ids) -> str.
    """

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0      # window start, and end of the ids whose text is final
        self.pending = ""                # final text held back for the stop strings
        self.stopped = False

    def feed(self, ids: list[int], final: bool = False) -> str:
        """The text ids add (final: the last ids of the stream; release everything held back)."""
        if self.stopped:
            return ""
        self.ids += ids
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if not text.endswith("\ufffd") or final:
            self.pending += text[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final)

    def _release(self, final: bool) -> str:
        # the held-back text has no stop string yet, and holds the start of any completed since
        hits = [(i + len(s), -len(s), i) for s in self.stop if (i := self.pending.find(s)) != -1]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)[2]], ""
            return out
        keep = 0 if final or not self.stop else max(map(len, self.stop)) - 1
        cut = max(0, len(self.pending) - keep)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


def train_tokenizer(files: list[str | Path], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE on text files (directories: their .txt, .md, .py, .jsonl files)
    and write `out_dir/tokenizer.json`.

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
    tok.train([str(f) for f in text_files([str(f) for f in files])], trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return Tokenizer(tok)


def main(argv: list[str] | None = None) -> None:
    """`dsv32 tokenizer train --files F [F ...] --vocab-size N --out DIR`."""
    parser = argparse.ArgumentParser(prog="dsv32 tokenizer")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE with the V3.2 special tokens")
    train.add_argument("--files", nargs="+", required=True, help="local text files to train on, or directories "
                       "(walked for .txt, .md, .py and .jsonl files)")
    train.add_argument("--vocab-size", type=positive_int, required=True,
                       help=f"tokens in the vocabulary, the {len(SPECIAL_TOKENS)} special tokens included")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    args = parser.parse_args(argv)
    tok = train_tokenizer(args.files, args.vocab_size, args.out)
    print(f"wrote {Path(args.out) / 'tokenizer.json'} with {tok.vocab_size} tokens")
