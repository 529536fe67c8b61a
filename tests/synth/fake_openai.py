"""A scripted OpenAI-compatible endpoint on a local port (the standard library's HTTP server in a
thread): GET /v1/models lists one model; each POST /v1/chat/completions answers with the next
scripted reply and records the request's body. A reply is a string (the assistant's content), a
dict (the whole JSON body, sent as is), bytes (a body that is not JSON) or an int (an HTTP error
status with an OpenAI-shaped error)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(content: str, model: str) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FakeOpenAI:
    """`with FakeOpenAI(replies) as f:` serves at `f.url` ("http://127.0.0.1:PORT/v1"); `f.seen`
    holds the chat requests' bodies."""

    def __init__(self, replies: list, model: str = "judge-model"):
        self.replies, self.model, self.seen = list(replies), model, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: bytes, kind: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self.send(200, json.dumps({"object": "list", "data": [
                        {"id": fake.model, "object": "model", "created": 0, "owned_by": "test"}]}).encode())
                else:
                    self.send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.seen.append(body)
                if not fake.replies:
                    self.send(500, b'{"error": {"message": "the script has no reply left"}}')
                    return
                r = fake.replies.pop(0)
                if isinstance(r, int):
                    self.send(r, json.dumps({"error": {"message": f"scripted status {r}", "type": "x"}}).encode())
                elif isinstance(r, bytes):
                    self.send(200, r, "text/plain")
                elif isinstance(r, dict):
                    self.send(200, json.dumps(r).encode())
                else:
                    self.send(200, json.dumps(completion(r, body["model"])).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
