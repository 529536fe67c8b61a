"""DeepSeek-V3.2's chat format: encoder, strict and streaming parsers, prompts. Standard library only.

A tokenizer carries its model's format: `tokenizer.stream_parser(mode)` gives the parser of its replies
(V3.2's here; another family's format lives with that family)."""

from dsv32.chat.encode import encode_completion, encode_messages, render_tool_calls, render_tools
from dsv32.chat.format import (
    ASSISTANT, BOS, DSML, EOS, SPECIAL_TOKENS, THINK_END, THINK_START, USER, ChatFormatError,
)
from dsv32.chat.parse import StreamParser, parse_completion
from dsv32.chat.prompts import SPECIALE, V32, ChatProfile, extract_boxed, math_prompt

__all__ = [
    "ASSISTANT", "BOS", "DSML", "EOS", "SPECIAL_TOKENS", "THINK_END",
    "THINK_START", "USER", "ChatFormatError", "ChatProfile", "SPECIALE", "StreamParser",
    "V32", "encode_completion", "encode_messages", "extract_boxed", "math_prompt",
    "parse_completion", "render_tool_calls", "render_tools",
]
