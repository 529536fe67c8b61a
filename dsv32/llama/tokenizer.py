"""The tokenizer of a Llama-family model: a tokenizer.json without V3.2's chat tokens."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from dsv32.chat import SPECIAL_TOKENS, ChatFormatError
from dsv32.llama.chatml import ENDOFTEXT, IM_END, IM_START, SMOLLM2_SYSTEM, ChatMLStreamParser, encode_chatml
from dsv32.llama.grammar import chatml_grammar
from dsv32.tokenizer import Tokenizer, encode_ids


class PlainTokenizer:
    """Encode and decode with a tokenizer.json that lacks the V3.2 chat tokens, such as an imported
    Llama-family model's (`dsv32.llama.gguf`); its BOS/EOS ids come from the model's config.

    `chat_format` is "chatml" when the vocabulary has `<|im_start|>` and `<|im_end|>` (SmolLM2's
    format, `dsv32.llama.chatml`), else None: such a model takes plain text only. `stop_ids` end a
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

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of text, special tokens written in it included; no BOS is added (limit: as for
        dsv32.tokenizer.encode_ids)."""
        return encode_ids(self.tok, text, limit)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], thinking_mode: str = "chat", limit: int | None = None,
                            **kwargs) -> list[int]:
        """Token ids of the ChatML prompt for messages; kwargs as for `encode_chatml`
        (tools or thinking raise ChatFormatError: the format has neither)."""
        if self.chat_format is None:
            raise ValueError(f"this vocabulary has no chat tokens ({IM_START}, {IM_END}, or V3.2's): "
                             "the model takes plain text only")
        kwargs.setdefault("default_system", self.default_system)
        return self.encode(encode_chatml(messages, thinking_mode, **kwargs), limit)

    def reply_grammar(self, **request) -> str | None:
        """The grammar a chat request's reply must follow in ChatML (constrained decoding), or None
        if it is free; request as for `dsv32.llama.grammar.chatml_grammar`."""
        if self.chat_format is None:
            raise ChatFormatError("this model's vocabulary has no chat tokens: it takes plain text only")
        return chatml_grammar({IM_END: self.tok.token_to_id(IM_END)}, **request)

    def stream_parser(self, thinking_mode: str = "chat", lenient: bool = False, tools: bool = True,
                      tool_deltas: bool = False) -> ChatMLStreamParser:
        """The parser of a reply in ChatML, fed decoded text as it streams (ChatML has no tool calls:
        tools and tool_deltas change nothing)."""
        if self.chat_format is None:
            raise ChatFormatError("this model's vocabulary has no chat tokens: it takes plain text only")
        return ChatMLStreamParser(thinking_mode, lenient=lenient)


def for_model(path: str | Path, cfg) -> PlainTokenizer | Tokenizer:
    """The tokenizer of a Llama-family model directory: V3.2's `Tokenizer` when its tokenizer.json
    holds all of V3.2's special tokens (a model given V3.2's format, `dsv32.llama.v32_chat`), else
    a `PlainTokenizer` (ChatML or plain text) with the config's BOS and EOS."""
    path = Path(path)
    hf = HFTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    if all(hf.token_to_id(t) is not None for t in SPECIAL_TOKENS):
        return Tokenizer(hf)
    return PlainTokenizer(hf, cfg.bos_token_id, cfg.eos_token_id)
