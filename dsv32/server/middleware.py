"""The server's ASGI middleware, outermost first: the request-size limit, the API key, and the
latency histogram. Each answers a refusal in OpenAI's error shape itself, before the app sees
the request.

They are plain ASGI (not Starlette's BaseHTTPMiddleware), so a streamed reply passes through
untouched and its latency is measured to its last byte.
"""

import asyncio
import ctypes
import ctypes.util
import json
import secrets
import time

from prometheus_client import Histogram

# The paths an API key guards: the OpenAI API and the tokenizer endpoints; /health, /metrics,
# /version and the web page stay open (a load balancer's probe carries no key).
GUARDED = ("/v1/", "/tokenize", "/detokenize")


async def send_error(send, status: int, message: str, code: str | None = None, headers=()) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse a request body over max_bytes with 413: at once when its Content-Length says so, or
    once a chunked body passes the limit (read here, then handed to the app whole)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        too_big = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await send_error(send, 400, "Content-Length is not a number")
            if int(length) > self.max_bytes:
                return await send_error(send, 413, too_big, "request_too_large")
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # a chunked body: count it as it comes
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(send, 413, too_big, "request_too_large")
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class ApiKey:
    """Every request to a GUARDED path needs `Authorization: Bearer <key>` (401 otherwise)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not scope["path"].startswith(GUARDED):
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
            return await send_error(send, 401, "a valid API key is required: Authorization: Bearer <key>",
                                    "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class Latency:
    """Observes each POST to the generation endpoints, from its arrival to the last byte of its
    reply (a stream's included), in `histogram` (labelled by endpoint)."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app, histogram: Histogram):
        self.app, self.histogram = app, histogram

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.ENDPOINTS:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def timed_send(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.histogram.labels(scope["path"]).observe(time.perf_counter() - t0)

        return await self.app(scope, receive, timed_send)


def malloc_trim():
    """glibc's malloc_trim, or None where there is none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class ReleaseMemory:
    """After a request with a body over min_bytes has been answered, hand the C heap's free memory
    back to the system (glibc malloc_trim, in a worker thread): glibc keeps what a thread freed in
    that thread's arena, and a body of megabytes is parsed, validated and copied more than once
    (the tokenising itself happens in a child process: prompts.py)."""

    def __init__(self, app, min_bytes: int = 1 << 20):
        self.app, self.min_bytes, self.trim = app, min_bytes, malloc_trim()

    async def __call__(self, scope, receive, send):
        length = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if scope["type"] != "http" or self.trim is None or not length.isdigit() or int(length) < self.min_bytes:
            return await self.app(scope, receive, send)
        try:
            return await self.app(scope, receive, send)
        finally:
            await asyncio.to_thread(self.trim, 0)
