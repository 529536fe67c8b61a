"""Parse what the model generates after a V3.2 prompt: a strict parser and a streaming one.

A completion is, in thinking mode, `{reasoning}</think>`, then `{content}`, then optionally a
DSML tool-call block, then `<｜end▁of▁sentence｜>`. In chat mode the reasoning part is absent.

The strict parser accepts the same texts as the official one (including its whitespace rules and
its quirks: an invoke head may end in one or two newlines, a parameter value may be followed by
"<\\n" before its end tag, an empty block `\\n\\n<｜DSML｜function_calls>\\n</｜DSML｜function_calls>`
means no calls), but it is stricter in two ways, each an error here where the official parser
returns a result: a text cut off inside the tool-call block or after it without the final
end-of-sentence token, and a `string="false"` parameter whose value is not JSON (the official
parser would return arguments that are not JSON).
Reasoning and content may not contain BOS, EOS, `<think>`, `</think>` or the DSML marker.
"""

import json
import re

from dsv32.chat.format import (
    BOS, CALLS_END, CALLS_START, DSML, EOS, INVOKE_END, INVOKE_START, PARAM_END, PARAM_START,
    THINK_END, THINK_START, ChatFormatError, check_thinking_mode, to_json,
)

# Reasoning may not contain these; content may not contain them nor `</think>`.
_FORBIDDEN = (BOS, EOS, THINK_START, DSML)
_UNENDED = {
    "reasoning": "the reasoning is never closed by '</think>'",
    "content": "the completion does not end with the end-of-sentence token",
}
_INVOKE_HEAD = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
_PARAM_BODY = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.DOTALL)
_PARAM_HEAD = re.compile(r' name="([^"]*)" string="(true|false)">')


class Incomplete(ChatFormatError):
    """The text ends before the construct being parsed is complete: more text could fix it."""


def _expect(text: str, i: int, options: tuple[str, ...], where: str) -> str:
    """Which of `options` text continues with at i; Incomplete if the text is a prefix of one."""
    for opt in options:
        if text.startswith(opt, i):
            return opt
    if any(opt.startswith(text[i:]) for opt in options):
        raise Incomplete(f"text ends {where}", len(text))
    wanted = " or ".join(repr(o) for o in options)
    raise ChatFormatError(f"expected {wanted} {where}, found {text[i:i + 30]!r}", i)


def _find_first(text: str, i: int, stops: tuple[str, ...], where: str) -> tuple[int, str]:
    """Position and value of the earliest of `stops` at or after i; Incomplete if none."""
    hits = [(p, s) for s in stops if (p := text.find(s, i)) != -1]
    if not hits:
        raise Incomplete(f"text ends {where}", len(text))
    return min(hits)


def _json_arguments(params: dict[str, tuple[str, str, int]]) -> str:
    """The arguments JSON string: raw string values quoted, JSON values pasted as written."""
    items = []
    for key, (value, is_str, at) in params.items():
        if is_str == "false":
            try:
                json.loads(value)
            except json.JSONDecodeError:
                raise ChatFormatError(f'parameter {key!r} has string="false" but is not JSON', at) from None
        items.append(f"{to_json(key)}: {to_json(value) if is_str == 'true' else value}")
    return "{" + ", ".join(items) + "}"


def next_tool_call(text: str, i: int) -> tuple[dict | None, int]:
    """Parse from i (just after `<｜DSML｜function_calls` or an invoke's end tag) to the end of the
    next invoke, returning (call, end), or to the end of the block, returning (None, end).

    Raises Incomplete if the text stops first, ChatFormatError if it cannot be valid.
    """
    where = "inside the tool-call block"
    if _expect(text, i, (f">\n{INVOKE_START}", f">\n{CALLS_END}"), where) == f">\n{CALLS_END}":
        return None, i + 2 + len(CALLS_END)
    i += 2 + len(INVOKE_START)
    p, stop = _find_first(text, i, (PARAM_START, INVOKE_END), "inside an invoke head")
    head = _INVOKE_HEAD.fullmatch(text, i, p)
    if not head:
        raise ChatFormatError(f'malformed invoke head {text[i:p][:60]!r}, expected name="..."', i)
    name, params = head[1], {}
    while stop == PARAM_START:
        i = p + len(PARAM_START)
        p = _find_first(text, i, (PARAM_END,), "inside a parameter")[0]
        body = _PARAM_BODY.fullmatch(text, i, p)
        if not body:
            raise ChatFormatError(
                f'malformed parameter {text[i:p][:60]!r}, expected name="..." string="true|false">...<', i
            )
        if body[1] in params:
            raise ChatFormatError(f"duplicate parameter {body[1]!r}", i)
        params[body[1]] = (body[3], body[2], i)
        i = p + len(PARAM_END)
        stop = _expect(text, i, (f">\n{PARAM_START}", f">\n{INVOKE_END}"), "after a parameter")[2:]
        p = i + 2
    call = {"type": "function", "function": {"name": name, "arguments": _json_arguments(params)}}
    return call, p + len(INVOKE_END)


# How a string parameter's value may end: "<", an optional newline, then the end tag.
_VALUE_ENDS = (f"<\n{PARAM_END}", f"<{PARAM_END}")


def peek_tool_call(text: str, i: int) -> tuple[str | None, str]:
    """What is certain so far of the invoke that starts at i (as for next_tool_call) in a text that
    stops inside it: (its name, or None before its head is complete; the prefix of its arguments
    JSON string that no later text can change). The prefix holds every complete parameter and, of a
    string parameter still being written, its key and the characters of its value that cannot be
    the start of its end tag; it only grows as the text does, and the whole call's arguments start
    with it. A string="false" value shows once complete and valid JSON; one that is not JSON (the
    call will not parse) ends the peek."""
    head_at = f">\n{INVOKE_START}"
    if not text.startswith(head_at, i):
        return None, ""
    i += len(head_at)
    hits = [(p, s) for s in (PARAM_START, INVOKE_END) if (p := text.find(s, i)) != -1]
    if not hits:
        return None, ""
    p, stop = min(hits)
    head = _INVOKE_HEAD.fullmatch(text, i, p)
    if not head:
        return None, ""
    out, seen = "", set()
    while stop == PARAM_START:
        i = p + len(PARAM_START)
        sep = "{" if not seen else ", "
        p = text.find(PARAM_END, i)
        if p == -1:  # the last parameter, still being written: its certain part, if it is a string
            open_head = _PARAM_HEAD.match(text, i)
            if open_head and open_head[2] == "true" and open_head[1] not in seen:
                value = text[open_head.end():]
                cut = next((q for q in range(max(0, len(value) - len(_VALUE_ENDS[0])), len(value))
                            if value[q] == "<" and any(e.startswith(value[q:]) for e in _VALUE_ENDS)), len(value))
                out += f"{sep}{to_json(open_head[1])}: {to_json(value[:cut])[:-1]}"
            break
        body = _PARAM_BODY.fullmatch(text, i, p)
        if body is None or body[1] in seen:
            break
        key, is_str, value = body[1], body[2], body[3]
        if is_str == "false":
            try:
                json.loads(value)
            except json.JSONDecodeError:
                break
        seen.add(key)
        out += f"{sep}{to_json(key)}: {to_json(value) if is_str == 'true' else value}"
        i = p + len(PARAM_END)
        if not text.startswith(f">\n{PARAM_START}", i):
            break
        p = i + 2
    return head[1], out


def _check_plain(text: str, start: int, end: int, forbidden: tuple[str, ...], what: str) -> None:
    """Raise at the first special token in text[start:end]."""
    hits = [(p, t) for t in forbidden if (p := text.find(t, start, end)) != -1]
    if hits:
        p, token = min(hits)
        raise ChatFormatError(f"special token {token!r} inside the {what}", p)


def parse_completion(text: str, thinking_mode: str = "thinking") -> dict:
    """Parse a whole completion (ending with the end-of-sentence token) into an OpenAI message.

    Returns {"role": "assistant", "content": str, "reasoning_content": str, "tool_calls": list}
    with tool-call arguments as JSON strings. Raises ChatFormatError on malformed markup.
    """
    i, reasoning = 0, ""
    if check_thinking_mode(thinking_mode):
        end = text.find(THINK_END)
        if end == -1:
            raise ChatFormatError(_UNENDED["reasoning"], len(text))
        _check_plain(text, 0, end, _FORBIDDEN, "reasoning")
        reasoning, i = text[:end], end + len(THINK_END)
    p, stop = min([(p, s) for s in (EOS, CALLS_START) if (p := text.find(s, i)) != -1], default=(-1, None))
    if stop is None:
        raise ChatFormatError(_UNENDED["content"], len(text))
    _check_plain(text, i, p, _FORBIDDEN + (THINK_END,), "content")
    content, tool_calls, i = text[i:p], [], p + len(stop)
    if stop == CALLS_START:
        call, i = next_tool_call(text, i)
        while call is not None:
            tool_calls.append(call)
            call, i = next_tool_call(text, i)
        if not text.startswith(EOS, i):
            raise ChatFormatError("expected the end-of-sentence token after the tool-call block", i)
        i += len(EOS)
    if i != len(text):
        raise ChatFormatError("unexpected text after the end-of-sentence token", i)
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}


# The text states: the markers that end each (and the state that follows), and all it watches for.
_ENDS = {"reasoning": {THINK_END: "content"}, "content": {EOS: "done", CALLS_START: "tools"}}
_MARKERS = {"reasoning": (THINK_END, *_FORBIDDEN), "content": (CALLS_START, THINK_END, *_FORBIDDEN)}


def _partial_start(buf: str, markers: tuple[str, ...]) -> int:
    """First position from which buf ends in a proper prefix of a marker (len(buf) if none)."""
    longest = max(map(len, markers))
    for q in range(max(0, len(buf) - longest + 1), len(buf)):
        if any(len(buf) - q < len(m) and m.startswith(buf[q:]) for m in markers):
            return q
    return len(buf)


def _scan(buf: str, markers: tuple[str, ...], final: bool) -> tuple[int | None, str | int]:
    """(p, marker) for the first marker in buf, or (None, n) with buf[:n] certain to hold none,
    whatever text comes next."""
    hits = [(p, m) for m in markers if (p := buf.find(m)) != -1]
    safe = len(buf) if final else _partial_start(buf, markers)
    if hits and min(hits)[0] < safe:
        return min(hits)
    return None, safe


class StreamParser:
    """Parse a completion that arrives as text deltas of any size.

    feed() returns the events that have become certain: ("reasoning", text), ("content", text),
    and ("tool_call", call) as soon as an invoke closes. A special token split across deltas is
    held back until it is complete. After finish(), `message` equals what parse_completion returns
    for the whole text (and both raise ChatFormatError on the same texts).

    With lenient=True (for serving), a format error is stored in `error` instead of raised, and
    everything not yet emitted, then all later text, is passed on as content, minus
    end-of-sentence tokens; a completion cut off inside the tool-call block (max_tokens, a stop
    string) sets `truncated` and drops the unfinished invoke instead of passing it on.

    tools=False (no tools declared, tool_choice "none"): a tool-call block is not markup but
    content, DSML and all. tool_deltas=True: an invoke also streams as it is generated,
    ("tool_call_start", name) once its head is complete, then ("tool_call_arguments", fragment) as
    its arguments JSON grows (a string value character by character, peek_tool_call), the
    fragments concatenating to a prefix of the ("tool_call", call) arguments that close it.
    """

    def __init__(self, thinking_mode: str = "thinking", lenient: bool = False, tools: bool = True,
                 tool_deltas: bool = False):
        self.lenient, self.tool_deltas = lenient, tool_deltas
        self.error: ChatFormatError | None = None
        self.truncated = False
        self.message = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
        self._state = "reasoning" if check_thinking_mode(thinking_mode) else "content"
        self._markers = dict(_MARKERS) if tools else {**_MARKERS, "content": (THINK_END, BOS, EOS, THINK_START)}
        self._open: str | None = None  # the name of the invoke being streamed (tool_deltas)
        self._sent, self._sent_text = 0, ""  # its arguments streamed so far (length, text)
        self._buf, self._base = "", 0  # the text not yet consumed, and its offset in the completion

    def feed(self, delta: str) -> list[tuple[str, str | dict]]:
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[tuple[str, str | dict]]:
        """End of the completion: flush what is left, or raise if the completion is incomplete."""
        return self._run(final=True)

    def _run(self, final: bool) -> list[tuple[str, str | dict]]:
        events = []
        try:
            while self._step(events, final):
                pass
        except ChatFormatError as e:
            e = type(e)(e.what, e.offset + self._base)
            if not self.lenient:
                raise e from None
            if final and isinstance(e, Incomplete) and self._state == "tools":  # cut off inside the block
                self.error, self.truncated, self._state = e, True, "done"
                self._consume(len(self._buf))
            else:
                self.error, self._state = e, "raw"
                while self._step(events, final):
                    pass
        for kind, value in events:
            if kind == "tool_call":
                self.message["tool_calls"].append(value)
            elif kind in ("tool_call_start", "tool_call_arguments"):
                pass
            else:
                self.message["reasoning_content" if kind == "reasoning" else "content"] += value
        return events

    def _consume(self, n: int) -> str:
        text, self._buf, self._base = self._buf[:n], self._buf[n:], self._base + n
        return text

    def _emit(self, events: list, kind: str, n: int) -> None:
        if text := self._consume(n):
            events.append((kind, text))

    def _stream_invoke(self, events: list, buf: str) -> None:
        """The start of the invoke buf holds, and what its arguments gained (tool_deltas)."""
        name, certain = peek_tool_call(buf, 0)
        if name is None:
            return
        if self._open is None:
            self._open = name
            events.append(("tool_call_start", name))
        if len(certain) > self._sent and certain.startswith(self._sent_text):
            events.append(("tool_call_arguments", certain[self._sent:]))
            self._sent, self._sent_text = len(certain), certain

    def _step(self, events: list, final: bool) -> bool:
        """Advance as far as one state allows; return whether to keep going."""
        state, buf = self._state, self._buf
        if state in _MARKERS:
            q = len(buf)
            if final and self.lenient and state == "content" and CALLS_START in self._markers[state]:
                q = _partial_start(buf, (CALLS_START,))  # a block cut off in its first marker
                if "<" not in buf[q:]:
                    q = len(buf)  # only blank lines: content
            p, marker = _scan(buf[:q], self._markers[state], final)
            if p is None:
                self._emit(events, state, marker)
                if q < len(buf):
                    self.error = Incomplete("text ends inside the tool-call block", self._base + len(buf))
                    self.truncated, self._state = True, "done"
                    self._consume(len(self._buf))
                    return False
                if final:
                    raise Incomplete(_UNENDED[state], len(self._buf))
                return False
            self._emit(events, state, p)
            if marker not in _ENDS[state]:
                raise ChatFormatError(f"special token {marker!r} inside the {state}", 0)
            self._consume(len(marker))
            self._state = _ENDS[state][marker]
        elif state == "tools":
            try:
                call, end = next_tool_call(buf, 0)
            except Incomplete:
                if final:
                    raise
                if self.tool_deltas:
                    self._stream_invoke(events, buf)
                return False
            self._consume(end)
            if call is None:
                self._state = "eos"
            else:
                if self.tool_deltas:
                    self._stream_invoke(events, buf[:end])
                events.append(("tool_call", call))
                self._open, self._sent, self._sent_text = None, 0, ""
        elif state == "eos":
            if not buf.startswith(EOS):
                if EOS.startswith(buf) and not final:
                    return False
                raise ChatFormatError("expected the end-of-sentence token after the tool-call block", 0)
            self._consume(len(EOS))
            self._state = "done"
        elif state == "done":
            if buf:
                raise ChatFormatError("unexpected text after the end-of-sentence token", 0)
            return False
        else:  # raw: after an error in lenient mode
            p, safe = _scan(buf, (EOS,), final)
            self._emit(events, "content", safe if p is None else p)
            if p is None:
                return False
            self._consume(len(EOS))
        return True
