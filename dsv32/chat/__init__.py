"""Chat formats: DeepSeek-V3.2's (encoder, strict and streaming parsers) and ChatML (SmolLM2's).
Standard library only."""

from dsv32.chat.chatml import IM_END, IM_START, ChatMLStreamParser, encode_chatml
from dsv32.chat.encode import encode_completion, encode_messages, render_tool_calls, render_tools
from dsv32.chat.format import (
    ASSISTANT, BOS, DSML, EOS, SPECIAL_TOKENS, THINK_END, THINK_START, USER, ChatFormatError,
)
from dsv32.chat.parse import StreamParser, parse_completion
from dsv32.chat.prompts import SPECIALE, V32, ChatProfile, extract_boxed, math_prompt

PARSERS = {"v32": StreamParser, "chatml": ChatMLStreamParser}  # a tokenizer's chat_format -> its parser


def stream_parser(chat_format: str, thinking_mode: str = "chat", lenient: bool = False):
    """The streaming parser of a chat format: "v32" or "chatml"."""
    if chat_format not in PARSERS:
        raise ChatFormatError(f"chat format {chat_format!r} is not one of {', '.join(PARSERS)}")
    return PARSERS[chat_format](thinking_mode, lenient=lenient)


__all__ = [
    "ASSISTANT", "BOS", "DSML", "EOS", "IM_END", "IM_START", "PARSERS", "SPECIAL_TOKENS", "THINK_END",
    "THINK_START", "USER", "ChatFormatError", "ChatMLStreamParser", "ChatProfile", "SPECIALE", "StreamParser",
    "V32", "encode_chatml", "encode_completion", "encode_messages", "extract_boxed", "math_prompt",
    "parse_completion", "render_tool_calls", "render_tools", "stream_parser",
]
