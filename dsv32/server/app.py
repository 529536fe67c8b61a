"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics; and the web chat page at / (web.py).

A chat request is rendered in the model's chat format (the tokenizer's `chat_format`: V3.2's, or
ChatML for a converted SmolLM2, which has no thinking: asking for it is a 400) and
its reply parsed back by that format's streaming parser; streamed and non-streamed replies take
the same path (engine deltas -> Detokenizer -> parser -> OpenAI deltas), a non-streamed reply
being the deltas accumulated. Errors use
OpenAI's shape, {"error": {"message", "type", "param", "code"}}; no request can stop the server.
`response_format` and a forced `tool_choice` are held by constrained decoding (request_grammar;
docs/structured-outputs.md). The request bodies are in bodies.py, the reply's shapes in reply.py,
the error shape in errors.py; this module holds the server's state and its routes.
"""

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from dsv32 import __version__
from dsv32.chat import ChatFormatError
from dsv32.engine import SamplingParams
from dsv32.engine.grammar import Grammar, GrammarError, GrammarVocab
from dsv32.server.bodies import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    NamedToolChoice,
    Sampling,
    TokenizeRequest,
    ToolCallRequest,
    chat_messages,
    chat_tools,
    check_text,
    response_schema,
    split_prefill,
    thinking_mode,
)
from dsv32.server.config import ServerConfig
from dsv32.server.errors import APIError, ClientGone, error_response
from dsv32.server.middleware import ApiKey, BodyLimit, Latency, ReleaseMemory
from dsv32.server.prompts import PromptEncoder
from dsv32.server.reply import ChatReply, Reply, TextReply, usage
from dsv32.server.runner import SHUTTING_DOWN, EngineRunner, Overloaded
from dsv32.server.web import add_web_page
from dsv32.tokenizer import TooManyTokens

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


async def request_grammar(state: "ServerState", req: ChatRequest, mode: str) -> Grammar | None:
    """The grammar response_format or a forced tool_choice constrains the reply to (constrained
    decoding, dsv32.chat.grammar), compiled off the event loop; None when the reply is free."""
    tok = state.tokenizer
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
    rf = req.response_format.model_dump(exclude_none=True) if req.response_format else None
    param = "response_format" if rf and rf["type"] != "text" else "tool_choice"
    try:
        text = tok.reply_grammar(thinking=mode == "thinking", response_format=rf,
                                 tools=[t.model_dump(exclude_none=True) for t in req.tools or []], tool_choice=choice,
                                 parallel_tool_calls=req.parallel_tool_calls is not False)
        if text is None:
            return None
        return await asyncio.to_thread(lambda: Grammar.compile(text, state.grammar_vocab()))
    except (ChatFormatError, GrammarError) as e:
        raise APIError(400, str(e), param=param) from None


# ---- the server state and routes ----
class ServerState:
    def __init__(self, runner: EngineRunner, tokenizer, model_name: str, config: ServerConfig):
        self.runner, self.tokenizer, self.model_name, self.config = runner, tokenizer, model_name, config
        self.prompts = PromptEncoder(tokenizer)
        self.max_model_len = runner.engine.max_model_len
        fmt = tokenizer.chat_format
        # constrained decoding: the vocabulary grammars compile against, built on first use
        self._grammar_vocab: GrammarVocab | None = None
        # /v1/models extras (as vLLM adds max_model_len), read by the web page: the context, whether
        # DSA selects keys (past index_topk of them; None: dense), what the chat format can do
        self.card = {"max_model_len": self.max_model_len,
                     "index_topk": getattr(runner.engine.runner.model.cfg, "index_topk", None), "chat_format": fmt,
                     "supports_thinking": fmt == "v32", "supports_tools": fmt is not None}

    def grammar_vocab(self) -> GrammarVocab:
        """The vocabulary grammars compile against (built once: ~0.5 s for a 50k vocabulary)."""
        if self._grammar_vocab is None:
            self._grammar_vocab = GrammarVocab(self.tokenizer.tok.to_str(), list(self.tokenizer.stop_ids),
                                               self.runner.engine.vocab_size)
        return self._grammar_vocab

    def check(self, req: Sampling) -> None:
        check_text(req)
        if req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server has {self.model_name!r}",
                           param="model", code="model_not_found")
        if req.n is not None and not 1 <= req.n <= self.config.max_n:
            raise APIError(400, f"n must be in [1, {self.config.max_n}] (the server's --max-n), got {req.n}",
                           param="n")

    async def render(self, messages: list[dict], mode: str, tools: list[dict] | None = None,
                     response_format: dict | None = None, prefill: str | None = None) -> list[int]:
        """The chat prompt's token ids (then the prefill's), rendered and tokenised off the event
        loop (a worker thread, or for a long prompt a child process: PromptEncoder)."""
        tok = self.tokenizer
        if tok.chat_format is None:
            raise APIError(400, "this model has no chat format (its vocabulary has no chat tokens): "
                           "use /v1/completions", param="messages")

        try:
            return await self.prompts.chat(messages, mode, tools, response_format, prefill, self.max_model_len - 1)
        except ChatFormatError as e:  # for ChatML also: tools, thinking, tool messages
            raise APIError(400, str(e), param="messages" if str(e).startswith("messages") else None) from None
        except TooManyTokens as e:
            raise self.too_long(e.n_tokens, "messages") from None

    async def encode(self, text: str, param: str = "prompt") -> list[int]:
        """A prompt's token ids, tokenised off the event loop (see render)."""
        try:
            return await self.prompts.encode(text, self.max_model_len - 1)
        except TooManyTokens as e:
            raise self.too_long(e.n_tokens, param) from None

    def too_long(self, n_tokens: int, param: str) -> APIError:
        return APIError(400, f"the prompt has {n_tokens} tokens; the context is {self.max_model_len} tokens, "
                        "leaving no room to generate", param=param, code="context_length_exceeded")

    def default_max_tokens(self, prompt: list[int]) -> int:
        return max(1, self.max_model_len - len(prompt))

    async def generate(self, prompt: list[int], params: SamplingParams, reply: Reply):
        """The engine's deltas for one request, errors as APIError, until it or the reply they
        feed (a stop string) finishes; aborted if left unfinished (a client that went away, a stop
        string: its blocks are freed)."""
        try:
            stream = self.runner.submit(prompt, params)
        except Overloaded as e:
            raise APIError(503, str(e), "server_error", code="overloaded",
                           headers={"Retry-After": str(self.config.retry_after)}) from None
        done = False
        try:
            while not done:
                d = await stream.get()
                done = d.finish_reason is not None
                if d.error is not None:
                    e = d.error
                    status = 400 if e.client_error else 503 if e.code == SHUTTING_DOWN else 500
                    raise APIError(status, str(e), "invalid_request_error" if e.client_error else "server_error",
                                   code=e.code)
                yield d
                if reply.finish_reason is not None:
                    break
        finally:
            if not done:
                self.runner.abort(stream.request_id)

    async def start(self, prompt: list[int], params: SamplingParams, reply: Reply, request: Request | None = None):
        """Submit and wait for the first delta, so that errors before any token get their status.
        While it waits (queued behind others), a client that hangs up is noticed: the request
        leaves the queue (ClientGone) instead of being prefilled for nobody."""
        deltas = self.generate(prompt, params, reply)
        first_delta = asyncio.ensure_future(anext(deltas))
        while request is not None and not (await asyncio.wait([first_delta], timeout=0.25))[0]:
            if await request.is_disconnected():
                first_delta.cancel()
                await asyncio.gather(first_delta, return_exceptions=True)
                await deltas.aclose()
                raise ClientGone()
        first = await first_delta

        async def all_deltas():
            try:
                yield first
                async for d in deltas:
                    yield d
            finally:
                await deltas.aclose()

        return all_deltas()

    async def start_n(self, prompt: list[int], params: SamplingParams, replies: list[Reply],
                      request: Request | None = None) -> list:
        """The n = len(replies) choices of one request: n sequences of the prompt, the i-th seeded
        with seed + i (a seeded request is reproducible). The first runs alone until its first
        token, by when its prefill has registered the prompt's full blocks in the prefix cache: the
        other n - 1 share those blocks and compute only the last, partial one."""
        first = await self.start(prompt, params, replies[0], request)
        seeds = [None if params.seed is None else params.seed + i for i in range(1, len(replies))]
        rest = await asyncio.gather(*(self.start(prompt, replace(params, seed=seed), reply, request)
                                      for seed, reply in zip(seeds, replies[1:])), return_exceptions=True)
        started = [first, *(r for r in rest if not isinstance(r, BaseException))]
        if len(started) < len(replies):
            for deltas in started:
                await deltas.aclose()
            raise next(r for r in rest if isinstance(r, BaseException))
        return started


async def merged(streams: list):
    """(i, item) from n async iterators as they come; if one raises, the others are closed and
    the error goes on. An iterator is asked for its next item only once its last one has been
    consumed (a reply fed with a delta may end its stream: a stop string)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, it):
        try:
            async for x in it:
                done = asyncio.Event()
                await queue.put((i, x, None, done))
                await done.wait()
            await queue.put((i, None, None, None))
        except Exception as e:  # noqa: BLE001 (handed on to the consumer)
            await queue.put((i, None, e, None))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, x, err, done = await queue.get()
            if err is not None:
                raise err
            if x is None:
                left -= 1
                continue
            yield i, x
            done.set()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in streams:
            await it.aclose()


async def consume(request: Request, deltas, feed) -> bool:
    """Feed every delta of a non-streamed reply; if the client hangs up first, stop (the request
    is aborted, its blocks freed) and return False."""
    async def run():
        async for d in deltas:
            feed(d)

    task = asyncio.ensure_future(run())
    while not (await asyncio.wait([task], timeout=0.5))[0]:
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
    task.result()
    return True


router = APIRouter()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_stream(chunks):
    """Chunks as server-sent events; an error mid-stream becomes an error event."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except APIError as e:
        yield sse(e.body)
    except Exception as e:
        log.exception("error while streaming")
        yield sse(APIError(500, f"internal error: {e}", "server_error").body)
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    t0 = time.perf_counter()
    state: ServerState = request.app.state.server
    state.check(req)
    mode, tok = thinking_mode(req), state.tokenizer
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.add_generation_prompt is False and not req.continue_final_message:
        raise APIError(400, "add_generation_prompt: false is supported only with continue_final_message: true "
                       "(the prompt always ends with the assistant's turn)", param="add_generation_prompt")
    messages, prefill = split_prefill(req, chat_messages(req), mode)
    # ChatML has no response-format section: its grammar alone holds the reply to the schema
    shown_format = response_schema(req.response_format) if tok.chat_format == "v32" else None
    prompt = await state.render(messages, mode, chat_tools(req), shown_format, prefill)
    max_tokens = req.max_completion_tokens or req.max_tokens or state.default_max_tokens(prompt)
    params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    # ChatML: <|im_end|> ends the reply too; ignore_eos keeps going past the end-of-sentence token only
    params.stop_token_ids = [t for t in tok.stop_ids if not (params.ignore_eos and t == tok.eos_id)]
    params.grammar = await request_grammar(state, req, mode)
    tool_names = [t["function"]["name"] for t in tools] if (tools := chat_tools(req)) else None
    replies = [ChatReply(state.tokenizer, mode, params.stop, bool(req.logprobs), prefill, tool_names)
               for _ in range(req.n or 1)]
    streams = await state.start_n(prompt, params, replies, request)
    state.time_to_first_token.observe(time.perf_counter() - t0)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": state.model_name}

    if not req.stream:
        if not await consume(request, merged(streams), lambda x: replies[x[0]].feed(x[1])):
            return Response(status_code=499)  # nobody is listening
        choices = [{"index": i, "message": r.message(), "finish_reason": r.openai_finish_reason(),
                    "logprobs": r.format_logprobs(r.logprobs)} for i, r in enumerate(replies)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(replies)}

    def chunk(i: int, delta: dict, finish_reason=None) -> dict:
        r = replies[i]
        c = {"index": i, "delta": delta, "logprobs": r.format_logprobs(r.take_logprobs()),
             "finish_reason": finish_reason}
        return {**head, "object": "chat.completion.chunk", "choices": [c]}

    async def chunks():
        for i in range(len(replies)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, d in merged(streams):
            r = replies[i]
            for delta in r.feed(d):
                yield chunk(i, delta)
            if r.finish_reason is not None:
                yield chunk(i, {}, r.openai_finish_reason())
        if req.stream_options and req.stream_options.include_usage:
            yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(replies)}

    return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    t0 = time.perf_counter()
    state: ServerState = request.app.state.server
    state.check(req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    ids = await state.encode(prompt) if isinstance(prompt, str) else list(prompt)
    params = req.sampling_params(req.max_tokens or state.default_max_tokens(ids), req.logprobs)
    # the end-of-sentence token ends the text but is not part of it
    replies = [TextReply(state.tokenizer, params.stop, req.logprobs is not None, hidden=(state.tokenizer.eos_id,))
               for _ in range(req.n or 1)]
    streams = await state.start_n(ids, params, replies, request)
    state.time_to_first_token.observe(time.perf_counter() - t0)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}

    if not req.stream:
        texts = [[] for _ in replies]
        if not await consume(request, merged(streams), lambda x: texts[x[0]].append(replies[x[0]].track(x[1]))):
            return Response(status_code=499)
        choices = [{"index": i, "text": "".join(t), "finish_reason": r.finish_reason,
                    "logprobs": r.format_logprobs(r.logprobs)} for i, (r, t) in enumerate(zip(replies, texts))]
        return {**head, "choices": choices, "usage": usage(replies)}

    async def chunks():
        async for i, d in merged(streams):
            r = replies[i]
            text = r.track(d)
            if text or r.finish_reason:
                choice = {"index": i, "text": text, "finish_reason": r.finish_reason,
                          "logprobs": r.format_logprobs(r.take_logprobs())}
                yield {**head, "choices": [choice]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**head, "choices": [], "usage": usage(replies)}

    return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")


@router.get("/v1/models")
async def models(request: Request):
    state: ServerState = request.app.state.server
    card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "dsv32", **state.card}
    return {"object": "list", "data": [card]}


@router.get("/v1/models/{model_id:path}")
async def model_card(model_id: str, request: Request):
    state: ServerState = request.app.state.server
    if model_id != state.model_name:
        raise APIError(404, f"the model {model_id!r} does not exist; this server has {state.model_name!r}",
                       param="model", code="model_not_found")
    return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "dsv32", **state.card}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    state: ServerState = request.app.state.server
    check_text(req)
    if req.model is not None and req.model != state.model_name:
        raise APIError(404, f"the model {req.model!r} does not exist", param="model", code="model_not_found")
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give one of prompt and messages", param="prompt")
    if req.prompt is not None:
        ids = await state.encode(req.prompt)  # past the context: a 400 that gives the count
    else:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        ids = await state.render(chat_messages(req), thinking_mode(req), tools)
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    state: ServerState = request.app.state.server
    vocab = state.runner.engine.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"tokens must be token ids in [0, {vocab})", param="tokens")
    return {"prompt": await asyncio.to_thread(state.tokenizer.decode, req.tokens)}


@router.get("/version")
async def version():
    return {"version": __version__}


@router.get("/health")
async def health(request: Request):
    if not request.app.state.server.runner.alive():
        raise APIError(503, "the engine thread is not running", "server_error",
                       headers={"Retry-After": str(request.app.state.server.config.retry_after)})
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


class EngineMetrics:
    """A Prometheus collector reading the runner's counters at scrape time."""

    def __init__(self, runner: EngineRunner):
        self.runner = runner

    def collect(self):
        s = self.runner.stats
        yield CounterMetricFamily("dsv32_requests", "Requests accepted by the engine", s["requests_total"])
        yield GaugeMetricFamily("dsv32_requests_running", "Requests being generated", s["running"])
        yield GaugeMetricFamily("dsv32_requests_waiting", "Requests waiting for a slot", s["waiting"])
        yield CounterMetricFamily("dsv32_generation_tokens", "Tokens generated", s["generation_tokens_total"])
        yield CounterMetricFamily("dsv32_prompt_tokens", "Prompt tokens of started requests", s["prompt_tokens_total"])
        yield CounterMetricFamily("dsv32_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  s["prefix_cache_hit_tokens_total"])
        yield CounterMetricFamily("dsv32_preemptions", "Sequences preempted for cache space", s["preemptions_total"])
        yield GaugeMetricFamily("dsv32_cache_blocks_free", "Free KV-cache blocks", s["cache_blocks_free"])
        yield GaugeMetricFamily("dsv32_cache_blocks_total", "KV-cache blocks", s["cache_blocks_total"])


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if x != "body")
    if err["type"] == "json_invalid":
        return error_response(APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}"))
    return error_response(APIError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None))


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(APIError(exc.status_code, str(exc.detail), kind))


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed", exc_info=exc)
    return error_response(APIError(500, f"internal error: {exc}", "server_error"))


def agent_tools(request: Request):
    tools = request.app.state.agent_tools
    if tools is None:
        raise APIError(404, "server tools are off: start the server with `dsv32 serve --agent-tools python,bash`",
                       code="tools_disabled")
    return tools


@router.get("/v1/agent/tools")
async def list_agent_tools(request: Request):
    """The server's tools (`--agent-tools`) in OpenAI's `tools` format."""
    return {"object": "list", "data": agent_tools(request).schemas()}


@router.post("/v1/agent/tools/{name}")
async def call_agent_tool(name: str, req: ToolCallRequest, request: Request):
    """Run one call of tool `name` in the conversation's own sandbox -> {"result": "..."}; the
    tool's failures (bad arguments, a timeout) come back as a result starting with "error:", as the
    agent loop gives them to the model."""
    from dsv32.server.tools import CONVERSATION_ID, ToolsFull

    tools = agent_tools(request)
    if not tools.has(name):
        raise APIError(404, f"no server tool {name!r}; the server has "
                       f"{', '.join(s['function']['name'] for s in tools.schemas())}", code="tool_not_found")
    if not CONVERSATION_ID.fullmatch(req.conversation):
        raise APIError(400, "conversation: 1 to 64 letters, digits, '-' or '_'", param="conversation")
    try:
        result = await asyncio.to_thread(tools.call, req.conversation, name, req.arguments)
    except ToolsFull as e:
        raise APIError(429, str(e), "server_error", code="tools_busy") from None
    return {"result": result}


def create_app(engine, tokenizer, model_name: str, max_queue: int = 64, agent_tools=None,
               config: ServerConfig | None = None) -> FastAPI:
    """The app around an engine; its thread starts and stops with the app's lifespan. `agent_tools`:
    a dsv32.server.tools.AgentTools to expose under /v1/agent/tools (closed at shutdown), or None.
    `config`: the server's options (default: ServerConfig(max_queue=max_queue))."""
    config = config or ServerConfig(max_queue=max_queue)
    runner = EngineRunner(engine, config.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()
        app.state.server.prompts.close()
        if agent_tools is not None:
            await asyncio.to_thread(agent_tools.close)

    app = FastAPI(title="dsv32", lifespan=lifespan)
    app.state.server = ServerState(runner, tokenizer, model_name, config)
    app.state.agent_tools = agent_tools
    app.state.metrics = registry = CollectorRegistry()
    registry.register(EngineMetrics(runner))
    app.state.server.time_to_first_token = Histogram(
        "dsv32_time_to_first_token_seconds", "From a generation request's arrival to its first token",
        registry=registry, buckets=LATENCY_BUCKETS)
    latency = Histogram("dsv32_request_latency_seconds", "From a generation request's arrival to the last byte "
                        "of its reply", ["endpoint"], registry=registry, buckets=LATENCY_BUCKETS)
    app.include_router(router)
    add_web_page(app)
    app.add_exception_handler(APIError, lambda request, e: error_response(e))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientGone, lambda request, e: Response(status_code=499))
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    # outermost last: the size limit, CORS (its preflights and headers on every answer), the key, timing
    app.add_middleware(Latency, histogram=latency)
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.allowed_origins)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(ReleaseMemory)
    return app
