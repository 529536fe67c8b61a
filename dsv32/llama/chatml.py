"""The ChatML format of SmolLM2-Instruct: encoder and streaming parser. Standard library only.

SmolLM2 ships its format as a Jinja template (`tokenizer.chat_template` in the GGUF metadata);
`encode_chatml` renders the same bytes:

    [<|im_start|>system\\n{DEFAULT_SYSTEM}<|im_end|>\\n]    if the first message is not a system one
    <|im_start|>{role}\\n{content}<|im_end|>\\n             for each message
    <|im_start|>assistant\\n                               add_generation_prompt

A reply is `{content}<|im_end|>`. Unlike V3.2's format there is no reasoning, no tool call and no
response-format section: asking for one is a ChatFormatError, never a silently different prompt.
Other ChatML models differ in their default system prompt: `default_system` sets it (None: none).
"""

from dsv32.chat.format import ChatFormatError
from dsv32.chat.parse import _scan

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROLES = ("system", "user", "assistant")
NO_TOOLS = "this model's chat format (ChatML) has no tool calls"
NO_THINKING = "this model's chat format (ChatML) has no thinking mode"


def encode_chatml(messages: list[dict], thinking_mode: str = "chat", tools: list[dict] | None = None,
                  response_format: dict | None = None, add_generation_prompt: bool = True,
                  default_system: str | None = SMOLLM2_SYSTEM) -> str:
    """Render a conversation as SmolLM2's template does. thinking_mode, tools and response_format
    exist to say clearly that this format has none of them."""
    if thinking_mode != "chat":
        raise ChatFormatError(f"{NO_THINKING} (thinking_mode={thinking_mode!r}); use 'chat'")
    if tools:
        raise ChatFormatError(NO_TOOLS)
    if response_format:
        raise ChatFormatError("this model's chat format (ChatML) has no response-format section")
    out = []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role == "tool" or msg.get("tool_calls"):
            raise ChatFormatError(f"messages[{i}]: {NO_TOOLS}")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}]: role {role!r} is not one of ChatML's {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{i}]: content must be a string, got {type(content).__name__}")
        if i == 0 and role != "system" and default_system is not None:
            out.append(f"{IM_START}system\n{default_system}{IM_END}\n")
        out.append(f"{IM_START}{role}\n{content}{IM_END}\n")  # reasoning_content is not rendered
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


class ChatMLStreamParser:
    """Parse a ChatML reply arriving as text deltas; the interface of `dsv32.chat.StreamParser`.

    feed() returns ("content", text) events; a marker split across deltas is held back until it is
    complete. `<|im_end|>` (or `<|endoftext|>`) ends the reply. Strict mode raises ChatFormatError
    for a reply that never ends, text after the end, or `<|im_start|>` inside the reply; lenient
    mode (serving) stores the error in `error` and passes such text on as content, minus end markers.
    """

    def __init__(self, thinking_mode: str = "chat", lenient: bool = False):
        if thinking_mode != "chat":
            raise ChatFormatError(f"{NO_THINKING} (thinking_mode={thinking_mode!r})")
        self.lenient = lenient
        self.error: ChatFormatError | None = None
        self.message = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
        self._buf, self._base, self._done = "", 0, False

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[tuple[str, str]]:
        """End of the reply: flush what is left, or raise if it is incomplete (strict mode)."""
        events = self._run(final=True)
        if not self._done:
            self._fail(ChatFormatError(f"the reply does not end with {IM_END}", self._base))
        return events

    def _fail(self, e: ChatFormatError) -> None:
        if not self.lenient:
            raise e
        self.error = self.error or e

    def _run(self, final: bool) -> list[tuple[str, str]]:
        events = []
        while True:
            p, marker = _scan(self._buf, (IM_END, ENDOFTEXT, IM_START), final)
            n = marker if p is None else p
            if n and self._done:
                self._fail(ChatFormatError("unexpected text after the end of the reply", self._base))
            self._emit(events, self._take(n))
            if p is None:
                return events
            self._take(len(marker))
            if marker == IM_START:  # lenient: shown as text
                self._fail(ChatFormatError(f"{IM_START} inside the reply", self._base - len(marker)))
                self._emit(events, marker)
            else:
                self._done = True

    def _take(self, n: int) -> str:
        text, self._buf, self._base = self._buf[:n], self._buf[n:], self._base + n
        return text

    def _emit(self, events: list, text: str) -> None:
        if text:
            events.append(("content", text))
            self.message["content"] += text
