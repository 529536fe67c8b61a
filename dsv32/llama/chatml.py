"""The ChatML format of SmolLM2-Instruct: encoder and streaming parser. Standard library only.

SmolLM2 ships its format as a Jinja template (`tokenizer.chat_template` in the GGUF metadata);
`encode_chatml` renders the same bytes:

    [<|im_start|>system\\n{DEFAULT_SYSTEM}<|im_end|>\\n]    if the first message is not a system one
    <|im_start|>{role}\\n{content}<|im_end|>\\n             for each message
    <|im_start|>assistant\\n                               add_generation_prompt

A reply is `{content}<|im_end|>`. There is no reasoning and no response-format section: asking for
either is a ChatFormatError, never a silently different prompt. Tools take the form SmolLM2 was
trained on (its function-calling template): with `tools`, the system message lists them as JSON in
`<tools>...</tools>` and says how to call them; a call is

    <tool_call>[\\n{"name": "f", "arguments": {...}},\\n...\\n]</tool_call>

at the end of the reply, and a tool result comes back as a user message
`<tool_response>\\n{content}\\n</tool_response>`.
Other ChatML models differ in their default system prompt: `default_system` sets it (None: none).
"""

import json

from dsv32.chat.format import ChatFormatError
from dsv32.chat.parse import _scan

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ROLES = ("system", "user", "assistant", "tool")
NO_THINKING = "this model's chat format (ChatML) has no thinking mode"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOLS_SECTION = """You can call functions to answer the user. These are the functions, in JSON schema:
<tools>{tools}</tools>
To call functions, end your reply with a list of calls in this exact form, arguments as JSON:
<tool_call>[
{{"name": "function_name", "arguments": {{"argument": "value"}}}}
]</tool_call>"""


def render_chatml_tool_calls(tool_calls: list[dict]) -> str:
    """The <tool_call> block of OpenAI-format tool calls (arguments a dict or its JSON string)."""
    calls = []
    for call in tool_calls:
        name, args = call["function"]["name"], call["function"].get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ChatFormatError(f"tool call {name!r}: arguments are not JSON ({e})") from None
        calls.append(json.dumps({"name": name, "arguments": args}, ensure_ascii=False))
    return TOOL_CALL_START + "[\n" + ",\n".join(calls) + "\n]" + TOOL_CALL_END


def encode_chatml(messages: list[dict], thinking_mode: str = "chat", tools: list[dict] | None = None,
                  response_format: dict | None = None, add_generation_prompt: bool = True,
                  default_system: str | None = SMOLLM2_SYSTEM) -> str:
    """Render a conversation as SmolLM2's template does (its tool template when `tools` are given,
    OpenAI-format). thinking_mode and response_format exist to say clearly that this format has neither."""
    if thinking_mode != "chat":
        raise ChatFormatError(f"{NO_THINKING} (thinking_mode={thinking_mode!r}); use 'chat'")
    if response_format:
        raise ChatFormatError("this model's chat format (ChatML) has no response-format section")
    out = []
    if tools:
        schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        system = TOOLS_SECTION.format(tools=schemas)
        if messages and messages[0].get("role") == "system":
            system += "\n\n" + str(messages[0].get("content") or "")
            messages = messages[1:]
        out.append(f"{IM_START}system\n{system}{IM_END}\n")
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}]: role {role!r} is not one of ChatML's {', '.join(ROLES)}")
        if content is None and role == "assistant" and msg.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{i}]: content must be a string, got {type(content).__name__}")
        if i == 0 and not tools and role != "system" and default_system is not None:
            out.append(f"{IM_START}system\n{default_system}{IM_END}\n")
        if role == "tool":
            out.append(f"{IM_START}user\n<tool_response>\n{content}\n</tool_response>{IM_END}\n")
            continue
        if msg.get("tool_calls"):
            if role != "assistant":
                raise ChatFormatError(f"messages[{i}]: only an assistant message has tool_calls")
            content += render_chatml_tool_calls(msg["tool_calls"])
        out.append(f"{IM_START}{role}\n{content}{IM_END}\n")  # reasoning_content is not rendered
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def parse_chatml_tool_calls(body: str) -> list[dict]:
    """The calls of a <tool_call> block's body (a JSON list of {"name", "arguments"}, or one such
    object) as OpenAI tool calls, arguments a JSON string."""
    try:
        calls = json.loads(body)
    except json.JSONDecodeError as e:
        raise ChatFormatError(f"the tool-call block is not JSON ({e})") from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list):
        raise ChatFormatError("the tool-call block must hold a JSON list of calls")
    out = []
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            raise ChatFormatError(f'a tool call must be {{"name": str, "arguments": object}}, got {call!r}')
        args = json.dumps(call.get("arguments", {}), ensure_ascii=False)
        out.append({"type": "function", "function": {"name": call["name"], "arguments": args}})
    return out


class ChatMLStreamParser:
    """Parse a ChatML reply arriving as text deltas; the interface of `dsv32.chat.StreamParser`.

    feed() returns ("content", text) events, and ("tool_call", call) once a <tool_call> block
    closes; a marker split across deltas is held back until it is complete. `<|im_end|>` (or
    `<|endoftext|>`) ends the reply. Strict mode raises ChatFormatError
    for a reply that never ends, text after the end, or `<|im_start|>` inside the reply; lenient
    mode (serving) stores the error in `error` and passes such text on as content, minus end markers.
    """

    def __init__(self, thinking_mode: str = "chat", lenient: bool = False):
        if thinking_mode != "chat":
            raise ChatFormatError(f"{NO_THINKING} (thinking_mode={thinking_mode!r})")
        self.lenient = lenient
        self.error: ChatFormatError | None = None
        self.message = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
        self._buf, self._base, self._done, self._in_call = "", 0, False, False

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

    def _run(self, final: bool) -> list[tuple[str, str | dict]]:
        events = []
        while True:
            if self._in_call and not self._call(events, final):
                return events
            p, marker = _scan(self._buf, (IM_END, ENDOFTEXT, IM_START, TOOL_CALL_START), final)
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
            elif marker == TOOL_CALL_START:
                self._in_call = True
            else:
                self._done = True

    def _call(self, events: list, final: bool) -> bool:
        """Inside a <tool_call> block: once it closes, its calls as ("tool_call", call) events
        (lenient: a broken block as text); return whether the block is done with."""
        p = self._block_end(final)
        if p is None:
            return False
        self._in_call, at = False, self._base
        body = self._take(len(self._buf) if p == -1 else p)
        try:
            if p == -1:
                raise ChatFormatError(f"the reply ends inside a {TOOL_CALL_START} block")
            calls = parse_chatml_tool_calls(body)
        except ChatFormatError as e:
            self._fail(ChatFormatError(e.what, at))
            self._emit(events, TOOL_CALL_START + body + (TOOL_CALL_END if p != -1 else ""))
        else:
            events += [("tool_call", c) for c in calls]
            self.message["tool_calls"] += calls
        if p != -1:
            self._take(len(TOOL_CALL_END))
        return True

    def _block_end(self, final: bool) -> int | None:
        """Where the open block's body ends: at the first </tool_call> before which the body is
        whole JSON (a string value may hold the marker's text); None while no such one has arrived;
        at the reply's end, the first marker (a broken block) or -1 (none)."""
        first = p = self._buf.find(TOOL_CALL_END)
        while p != -1:
            try:
                json.loads(self._buf[:p])
                return p
            except json.JSONDecodeError:
                p = self._buf.find(TOOL_CALL_END, p + 1)
        return first if final else None

    def _take(self, n: int) -> str:
        text, self._buf, self._base = self._buf[:n], self._buf[n:], self._base + n
        return text

    def _emit(self, events: list, text: str) -> None:
        if text:
            events.append(("content", text))
            self.message["content"] += text
