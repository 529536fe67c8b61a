"""Prompt helpers: the math template of the V3.2 evaluations, `\\boxed{}` answers, Speciale."""

from dataclasses import dataclass

from dsv32.chat.encode import encode_messages
from dsv32.chat.format import ChatFormatError
from dsv32.chat.parse import parse_completion

MATH_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def math_prompt(question: str) -> str:
    """The user message the paper uses for AIME, HMMT, IMOAnswerBench and HLE."""
    return MATH_TEMPLATE.format(question=question)


def extract_boxed(text: str) -> str | None:
    """The contents of the last complete `\\boxed{...}` in text, nested braces included.

    Escaped braces (`\\{`, `\\}`) do not count. None if there is no complete box.
    """
    start = len(text)
    while (start := text.rfind("\\boxed{", 0, start)) != -1:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 1
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len("\\boxed{"):i]
            i += 1
    return None


@dataclass(frozen=True)
class ChatProfile:
    """What a model variant accepts: V3.2 does tool calling; Speciale (reasoning only) does not."""

    name: str
    tools: bool

    def check(self, messages: list[dict], tools: list[dict] | None = None) -> None:
        """Reject tools, tool calls and tool results for a variant without tool calling."""
        if self.tools:
            return
        if tools or any(m.get("tools") or m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            raise ChatFormatError(f"{self.name} does not support tool calling, but tools were given")

    def encode(self, messages: list[dict], thinking_mode: str = "thinking", **kwargs) -> str:
        self.check(messages, kwargs.get("tools"))
        return encode_messages(messages, thinking_mode, **kwargs)

    def parse(self, text: str, thinking_mode: str = "thinking") -> dict:
        message = parse_completion(text, thinking_mode)
        if message["tool_calls"] and not self.tools:
            raise ChatFormatError(f"{self.name} does not support tool calling, but the completion calls a tool")
        return message


V32 = ChatProfile("DeepSeek-V3.2", tools=True)
SPECIALE = ChatProfile("DeepSeek-V3.2-Speciale", tools=False)
