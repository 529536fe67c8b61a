"""A generated reply in OpenAI's shapes: engine deltas -> Detokenizer -> the format's streaming
parser -> OpenAI deltas (chat) or text (completions), with usage and log-probs."""

import uuid

from dsv32.chat import render_tool_calls
from dsv32.server.runner import Delta
from dsv32.tokenizer import Detokenizer


class Reply:
    """One generated reply: counts tokens for usage and collects log-probs (taken by each
    streamed chunk, or all at the end)."""

    def __init__(self, tokenizer, stop: list[str], logprobs: bool, hidden: tuple[int, ...] = ()):
        self.tok, self.want_logprobs, self.hidden = tokenizer, logprobs, hidden
        self.detok = Detokenizer(tokenizer, stop)
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[tuple] = []          # (token id, logprob, [(id, logprob)])
        self.taken = 0

    def track(self, d: Delta) -> str:
        """Account for d; return the text it adds."""
        self.prompt_tokens, self.cached_tokens = d.prompt_len, d.num_cached
        self.completion_tokens += len(d.token_ids)
        if self.want_logprobs:
            tops = d.top_logprobs or [[]] * len(d.token_ids)
            self.logprobs += zip(d.token_ids, d.logprobs, tops)
        self.finish_reason = d.finish_reason
        text_ids = [t for t in d.token_ids if t not in self.hidden]
        text = self.detok.feed(text_ids, final=d.finish_reason is not None)
        if self.detok.stopped:  # a stop string ended the text: the request is aborted (ServerState.generate)
            self.finish_reason = "stop"
        return text

    def take_logprobs(self) -> list[tuple]:
        new, self.taken = self.logprobs[self.taken:], len(self.logprobs)
        return new

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def piece(self, token_id: int) -> str:
        return self.tok.decode([token_id])


class ChatReply(Reply):
    """An assistant reply parsed as it streams; `feed` returns the OpenAI deltas a delta adds."""

    def __init__(self, tokenizer, mode: str, stop: list[str], logprobs: bool, prefill: str | None = None,
                 tools: list[str] | None = None):
        """tools: the names of the request's tools (None or empty: no tools, or tool_choice "none": a
        tool-call block the model writes is content). A call of any other tool is left in the
        content as the model wrote it (re-rendered in the format's markup), not returned as a call."""
        super().__init__(tokenizer, stop, logprobs)
        self.mode, self.calls, self.tools = mode, [], set(tools or ())
        self.parser = tokenizer.stream_parser(mode, lenient=True, tools=bool(self.tools), tool_deltas=True)
        self.open: dict | None = None   # the call being streamed: {"index", "id", "sent", "shown"}
        if prefill:  # the parser reads the open turn's start (its state: reasoning or content); the reply is the rest
            self.parser.feed(prefill)
            self.parser.message.update(content="", reasoning_content="")

    def feed(self, d: Delta) -> list[dict]:
        events = self.parser.feed(self.track(d))
        if self.finish_reason is not None:
            events += self.parser.finish()
        deltas = []
        for kind, value in events:
            if kind in ("reasoning", "content"):
                deltas.append({"reasoning_content" if kind == "reasoning" else "content": value})
            elif kind == "tool_call_start":
                # OpenAI's convention: id, type and name first, then the arguments as string deltas
                self.open = {"index": len(self.calls), "id": f"call_{uuid.uuid4().hex[:24]}", "sent": "",
                             "shown": value in self.tools}
                if self.open["shown"]:
                    deltas.append({"tool_calls": [{"index": self.open["index"], "id": self.open["id"],
                                                   "type": "function", "function": {"name": value, "arguments": ""}}]})
            elif kind == "tool_call_arguments":
                if self.open["shown"]:
                    self.open["sent"] += value
                    deltas.append({"tool_calls": [{"index": self.open["index"], "function": {"arguments": value}}]})
            else:
                deltas += self._close_call(value)
        return deltas

    def _close_call(self, value: dict) -> list[dict]:
        """The deltas that complete a tool call: the rest of its arguments (all of them for a call
        that arrived whole), or, for a tool the request did not declare, its markup as content."""
        name, args = value["function"]["name"], value["function"]["arguments"]
        opened, self.open = self.open or {"index": len(self.calls), "id": f"call_{uuid.uuid4().hex[:24]}",
                                          "sent": None, "shown": name in self.tools}, None
        if not opened["shown"]:
            text = render_tool_calls([value])
            self.parser.message["content"] += text
            return [{"content": text}]
        call = {"id": opened["id"], **value}
        self.calls.append(call)
        deltas = []
        if opened["sent"] is None:
            deltas.append({"tool_calls": [{"index": opened["index"], "id": call["id"], "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
        rest = args[len(opened["sent"] or ""):]
        if rest:
            deltas.append({"tool_calls": [{"index": opened["index"], "function": {"arguments": rest}}]})
        return deltas

    def openai_finish_reason(self) -> str | None:
        """tool_calls when calls end the reply; length when a tool-call block was cut off (by
        max_tokens or a stop string: the unfinished call is dropped, never passed on as content)."""
        if getattr(self.parser, "truncated", False):  # (ChatML's parser has no tool calls to cut off)
            return "length"
        return "tool_calls" if self.calls and self.finish_reason == "stop" else self.finish_reason

    def message(self) -> dict:
        m = self.parser.message
        msg = {"role": "assistant", "content": m["content"] or (None if self.calls else "")}
        if self.mode == "thinking":
            msg["reasoning_content"] = m["reasoning_content"]
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg

    def format_logprobs(self, items: list[tuple]) -> dict | None:
        if not self.want_logprobs:
            return None

        def entry(token_id, logprob):
            s = self.piece(token_id)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(*x) for x in top]} for t, lp, top in items]}


class TextReply(Reply):
    def format_logprobs(self, items: list[tuple]) -> dict | None:
        if not self.want_logprobs:
            return None
        return {"tokens": [self.piece(t) for t, _, _ in items], "token_logprobs": [lp for _, lp, _ in items],
                "top_logprobs": [{self.piece(i): v for i, v in top} for _, _, top in items]}


def usage(replies: list[Reply]) -> dict:
    """Usage of a request's choices: the prompt counted once, the completions summed."""
    u = replies[0].usage()
    u["completion_tokens"] = sum(r.completion_tokens for r in replies)
    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    return u
