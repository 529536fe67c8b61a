"""The request bodies of the API (fields we do not know are ignored, as vLLM does), and what a
chat request says once read: its messages, thinking mode, tools, response schema and prefill.
Every problem is an APIError 400 naming the field."""

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from dsv32.engine import SamplingParams
from dsv32.server.errors import APIError


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[str, str]


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: str
    content: str | list[dict] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    prefix: bool | None = None          # DeepSeek's API: a final assistant message to continue


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both endpoints share. None (JSON null) means the default."""
    model_config = ConfigDict(allow_inf_nan=False)   # NaN / Infinity in a number field: a 400 naming it
    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)           # -1 or 0: off
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)   # int64, as OpenAI's
    stop: str | Annotated[list[str], Field(max_length=64)] | None = None
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None      # token id (as a string) -> bias in [-100, 100]
    # vLLM's extras
    repetition_penalty: float | None = Field(None, gt=0)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = False
    # accepted by OpenAI or vLLM but not served here: a 400 unless left at their no-op value
    best_of: int | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None

    def refuse_unserved(self) -> None:
        """Every parameter a request sets either acts or is refused: these are refused."""
        noop = {"best_of": (None, 1), "use_beam_search": (None, False), "length_penalty": (None, 1.0),
                "prompt_logprobs": (None,), "include_stop_str_in_output": (None, False),
                "allowed_token_ids": (None,), "bad_words": (None, [])}
        for name, values in noop.items():
            if getattr(self, name) not in values:
                raise APIError(400, f"{name} is not supported by this server", param=name)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        self.refuse_unserved()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        stop = [s for s in stop if s]  # an empty stop string would end every text at once: it stops nothing
        bias = {}
        for k, v in (self.logit_bias or {}).items():
            if not k.strip().isdigit():
                raise APIError(400, f"logit_bias keys must be token ids, got {k!r}", param="logit_bias")
            bias[int(k)] = v
        try:
            return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                                  top_p=self.top_p or 1.0, top_k=max(0, self.top_k or 0), max_tokens=max_tokens,
                                  seed=self.seed, stop=stop, logprobs=logprobs, ignore_eos=bool(self.ignore_eos),
                                  presence_penalty=self.presence_penalty or 0.0,
                                  frequency_penalty=self.frequency_penalty or 0.0,
                                  repetition_penalty=self.repetition_penalty or 1.0, min_p=self.min_p or 0.0,
                                  min_tokens=self.min_tokens or 0, logit_bias=bias)
        except ValueError as e:
            field = str(e).split(" ")[0].split("[")[0]
            raise APIError(400, str(e), param=field if field in type(self).model_fields else None) from None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None          # False: a forced call is one call
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict | None = None         # vLLM / SGLang: {"thinking": true}
    thinking: bool | dict | None = None              # true, or {"type": "enabled"}
    continue_final_message: bool | None = False      # vLLM: continue the final assistant message
    add_generation_prompt: bool | None = None         # vLLM: false only with continue_final_message


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None

    def refuse_unserved(self) -> None:
        super().refuse_unserved()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server (no fill-in-the-middle)", param="suffix")


# ---- request -> prompt ----
_SURROGATE = re.compile("[\ud800-\udfff]")


def find_surrogate(value, path: str = "") -> str | None:
    """The path (messages.0.content) of the first string in a request holding a lone UTF-16
    surrogate ("\\ud800" in JSON: no tokenizer can encode it), or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, BaseModel):
        value = {k: getattr(value, k) for k in type(value).model_fields}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        where = f"{path}.{k}" if path else str(k)
        if isinstance(k, str) and _SURROGATE.search(k):
            return where
        if (hit := find_surrogate(v, where)) is not None:
            return hit
    return None


def check_text(req: BaseModel) -> None:
    if (path := find_surrogate(req)) is not None:
        raise APIError(400, f"{path}: contains a lone UTF-16 surrogate; text must be valid Unicode", param=path)


def thinking_mode(req: ChatRequest) -> str:
    """Thinking is off unless asked for, in any of the conventions clients use."""
    kwargs = req.chat_template_kwargs or {}
    for v in (req.thinking, kwargs.get("thinking"), kwargs.get("enable_thinking")):
        if isinstance(v, dict):
            v = v.get("type") == "enabled"
        if v is not None:
            return "thinking" if v else "chat"
    return "chat"


def chat_messages(req: ChatRequest) -> list[dict]:
    """OpenAI messages -> the dicts the encoder takes (text parts joined; roles checked there)."""
    out = []
    for i, m in enumerate(req.messages):
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            if any(part.get("type") != "text" for part in m.content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported",
                               param=f"messages.{i}.content")
            msg["content"] = "".join(str(part.get("text", "")) for part in m.content)
        elif m.content is None and m.role in ("system", "assistant"):
            msg["content"] = ""
        out.append(msg)
    return out


def split_prefill(req: ChatRequest, messages: list[dict], mode: str) -> tuple[list[dict], str | None]:
    """(messages to render, the text the reply continues) for an assistant prefill: a final
    assistant message with `prefix: true`, or any final assistant message under
    `continue_final_message`. Its text is the open turn's start: the content (in thinking mode, the
    reasoning, closed by `</think>` when content follows)."""
    last = messages[-1]
    if not (req.continue_final_message or last.get("prefix")):
        return messages, None
    if last["role"] != "assistant" or last.get("tool_calls"):
        raise APIError(400, "an assistant prefill (continue_final_message, prefix) needs a final assistant message "
                       "without tool_calls", param=f"messages.{len(messages) - 1}")
    if len(messages) == 1:
        raise APIError(400, "an assistant prefill needs a message before it", param="messages")
    content, reasoning = last.get("content") or "", last.get("reasoning_content") or ""
    if mode == "thinking":
        return messages[:-1], f"{reasoning}</think>{content}" if content else reasoning
    return messages[:-1], content


def chat_tools(req: ChatRequest) -> list[dict] | None:
    """The tools to render. "none" renders none; "auto" and "required" render all; a named function
    renders only that one. "required" and a named function are enforced by the request's grammar
    (request_grammar)."""
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice) and not req.tools:
        raise APIError(400, "tool_choice names a function but no tools were given", param="tool_choice")
    if not req.tools or choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t["function"]["name"] == choice.function.get("name")]
        if not tools:
            raise APIError(400, f"tool_choice names {choice.function.get('name')!r}, which is not among the tools",
                           param="tool_choice")
    return tools


def response_schema(rf: ResponseFormat | None) -> dict | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "object"}
    schema = (rf.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                       param="response_format")
    return schema


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered as /v1/chat/completions renders them."""
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict | None = None
    thinking: bool | dict | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class ToolCallRequest(BaseModel):
    conversation: str
    arguments: dict | str = Field(default_factory=dict)
