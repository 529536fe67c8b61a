"""The DeepSeek-V3.2 chat format: encoder, strict and streaming parsers. Standard library only."""

from dsv32.chat.encode import encode_completion, encode_messages, render_tool_calls, render_tools
from dsv32.chat.format import (
    ASSISTANT, BOS, DSML, EOS, SPECIAL_TOKENS, THINK_END, THINK_START, USER, ChatFormatError,
)
from dsv32.chat.parse import StreamParser, parse_completion
from dsv32.chat.prompts import SPECIALE, V32, ChatProfile, extract_boxed, math_prompt

__all__ = [
    "ASSISTANT", "BOS", "DSML", "EOS", "SPECIAL_TOKENS", "THINK_END", "THINK_START", "USER",
    "ChatFormatError", "ChatProfile", "SPECIALE", "StreamParser", "V32", "encode_completion",
    "encode_messages", "extract_boxed", "math_prompt", "parse_completion", "render_tool_calls",
    "render_tools",
]
