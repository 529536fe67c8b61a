"""OpenAI-style messages to the exact DeepSeek-V3.2 prompt string.

Roles render as follows (T is `<think>` in thinking mode for the last user turn, else `</think>`):
  system     its content, then the tools and response-format sections; no token of its own
  user       <｜User｜>{content}<｜Assistant｜>T
  developer  like user, with the sections and "# The user's message is: " inside the user turn
  assistant  [{reasoning}</think>]{content}[tool calls]<｜end▁of▁sentence｜>
  tool       results are appended to the assistant turn, one <function_results> block per call
             batch, followed by T: the model keeps going within the same turn.
The thinking block of an assistant message is rendered only after the last user (or developer)
message; earlier turns show their answer, tool calls and tool results but not their reasoning.
That is the V3.2 thinking-context rule: reasoning survives tool round trips, not a new user turn.

`drop_thinking=False` instead renders every turn as it was when the model generated it (each
user turn opens a thinking block, each reply shows its reasoning): one sequence holding all the
reasoning of a multi-turn trajectory, for training. The official encoder has the flag but its
output does not change with it (its drop step also omits earlier developer messages, and then
fails with an index error; we keep them).
"""

import json

from dsv32.chat.format import (
    ASSISTANT, BOS, CALLS_END, CALLS_START, DSML, EOS, RESPONSE_FORMAT_SECTION, THINK_END,
    THINK_START, TOOLS_SECTION, USER, ChatFormatError, check_thinking_mode, to_json,
)

ROLES = ("system", "developer", "user", "assistant", "tool")


def render_tools(tools: list[dict]) -> str:
    """The `## Tools` section for OpenAI-format tools ({"type": "function", "function": {...}})."""
    return TOOLS_SECTION.format(schemas="\n".join(to_json(tool["function"]) for tool in tools))


def _sections(msg: dict) -> str:
    """The tools and response-format sections a system or developer message carries."""
    out = ""
    if msg.get("tools"):
        out += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT_SECTION.format(schema=to_json(msg["response_format"]))
    return out


def _arguments(call: dict) -> dict:
    """A tool call's arguments as a dict; OpenAI sends them as a JSON string."""
    name, args = call["function"]["name"], call["function"]["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"tool call {name!r}: arguments are not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ChatFormatError(f"tool call {name!r}: arguments must be a JSON object, got {args!r}")
    return args


def render_tool_calls(tool_calls: list[dict]) -> str:
    """The DSML block for OpenAI-format tool calls: strings raw with string="true", else JSON."""
    invokes = []
    for call in tool_calls:
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else to_json(v)}</{DSML}parameter>"
            for k, v in _arguments(call).items()
        )
        invokes.append(f'<{DSML}invoke name="{call["function"]["name"]}">\n{params}\n</{DSML}invoke>')
    return f"{CALLS_START}>\n" + "\n".join(invokes) + f"\n{CALLS_END}"


def encode_completion(message: dict, thinking_mode: str = "thinking") -> str:
    """What the model generates for an assistant message after the prompt (a training target).

    In thinking mode the prompt ends inside the thinking block, so the completion starts with
    the reasoning and closes it with `</think>`.
    """
    thinking = check_thinking_mode(thinking_mode)
    reasoning = (message.get("reasoning_content") or "") + THINK_END if thinking else ""
    calls = render_tool_calls(message["tool_calls"]) if message.get("tool_calls") else ""
    return f"{reasoning}{message.get('content') or ''}{calls}{EOS}"


def _text(msg: dict, i: int) -> str:
    content = msg.get("content")
    if not isinstance(content, str):
        raise ChatFormatError(f"messages[{i}] ({msg['role']}): content must be a string, got {content!r}")
    return content


def last_user_index(messages: list[dict]) -> int:
    """Index of the last user or developer message, -1 if there is none."""
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _with_request_fields(messages: list[dict], tools, response_format) -> list[dict]:
    """Put request-level tools / response_format on the system message, adding one if needed."""
    extra = {k: v for k, v in (("tools", tools), ("response_format", response_format)) if v}
    if not extra:
        return messages
    if messages and messages[0]["role"] == "system":
        if any(messages[0].get(k) for k in extra):
            raise ChatFormatError(f"{'/'.join(extra)} given both as argument and on the system message")
        return [{**messages[0], **extra}, *messages[1:]]
    return [{"role": "system", "content": "", **extra}, *messages]


def encode_messages(
    messages: list[dict],
    thinking_mode: str = "thinking",
    drop_thinking: bool = True,
    add_bos: bool = True,
    tools: list[dict] | None = None,
    response_format: dict | None = None,
) -> str:
    """Render a conversation to the prompt string of the official V3.2 format.

    Tools and response_format go on the system (or developer) message as in the official encoder,
    or as arguments here, which puts them on the system message (created if absent).
    """
    thinking = check_thinking_mode(thinking_mode)
    for i, msg in enumerate(messages):
        if msg.get("role") not in ROLES:
            raise ChatFormatError(f"messages[{i}]: unknown role {msg.get('role')!r}")
    messages = _with_request_fields(messages, tools, response_format)
    # Turns after last_user are rendered with their reasoning; -1 makes every turn such a turn.
    last_user = last_user_index(messages) if drop_thinking else -1

    out = [BOS] if add_bos else []
    calls = results = 0  # tool calls of the latest assistant message, and results seen for them
    for i, msg in enumerate(messages):
        role = msg["role"]
        think = THINK_START if thinking and i >= last_user else THINK_END
        if role != "tool" and 0 < results < calls:
            raise ChatFormatError(f"messages[{i}]: only {results} of {calls} tool results precede it")
        if role == "system":
            out.append((msg.get("content") or "") + _sections(msg))
        elif role == "user":
            out.append(f"{USER}{_text(msg, i)}{ASSISTANT}{think}")
        elif role == "developer":
            if not msg.get("content"):
                raise ChatFormatError(f"messages[{i}] (developer): content must be a non-empty string")
            body = f"{_sections(msg)}\n\n# The user's message is: {_text(msg, i)}"
            out.append(f"{USER}{body}{ASSISTANT}{think}")
        elif role == "assistant":
            in_thinking = thinking and i > last_user
            if in_thinking and not (msg.get("reasoning_content") or msg.get("tool_calls")):
                raise ChatFormatError(
                    f"messages[{i}] (assistant): in thinking mode, a reply after the last user "
                    "message needs reasoning_content or tool_calls"
                )
            out.append(encode_completion(msg, "thinking" if in_thinking else "chat"))
        elif role == "tool":
            if results == calls:
                raise ChatFormatError(f"messages[{i}]: tool result without a matching tool call")
            results += 1
            head = "\n\n<function_results>" if results == 1 else ""
            tail = f"\n</function_results>\n\n{think}" if results == calls else ""
            out.append(f"{head}\n<result>{_text(msg, i)}</result>{tail}")
        if role == "assistant":
            calls, results = len(msg.get("tool_calls") or []), 0
        elif role != "tool":
            calls = results = 0
    if 0 < results < calls:
        raise ChatFormatError(f"the conversation ends after only {results} of {calls} tool results")
    return "".join(out)
