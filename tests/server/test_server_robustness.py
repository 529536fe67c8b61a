"""What a hostile or careless client cannot do to the server: stall it with a prompt of
megabytes (tokenised in a worker thread, /health keeps answering), grow its memory with rejected
prompts, keep a queued request alive after hanging up, or keep the process alive after SIGTERM."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from scripted import MODEL, Server, script, scripted_engine

from dsv32.server.prompts import PromptEncoder
from dsv32.tokenizer import TooManyTokens

HELLO = [{"role": "user", "content": "def decode(self, s):"}]


def rss_mb(pid: str = "self") -> float:
    """Resident memory of the server (it runs in this process) and its children (the tokenizer
    process), in MB."""
    with open(f"/proc/{pid}/statm") as f:
        total = int(f.read().split()[1]) * 4096 / 2**20
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/statm").exists() and "python" in Path(f"/proc/{child}/cmdline").read_text():
                total += rss_mb(child)
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_big_prompts_neither_stall_the_server_nor_grow_its_memory(real):
    """1 MB prompts (~470k tokens, far past the 1024-token context), tokenised in the server's
    tokenizer process: each is refused with 400, /health answers all along (a tokeniser on the
    event loop answered none for seconds), and after two to warm up, resident memory (the server's
    and its tokenizer process's) stays within 64 MB over three more and 40 malformed requests."""
    big = {"model": MODEL, "messages": [{"role": "user", "content": "def f(x): return x\n" * 52_000}]}
    latencies, rss = [], []
    for i in range(5):
        done = threading.Event()

        def poll(done=done):
            while not done.is_set():
                t = time.perf_counter()
                assert httpx.get(real.url + "/health", timeout=10).status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.02)

        with ThreadPoolExecutor(1) as pool:
            health = pool.submit(poll)
            r = httpx.post(real.url + "/v1/chat/completions", json=big, timeout=120)
            done.set()
            health.result()
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        for j in range(8):  # malformed requests in between
            bad = httpx.post(real.url + "/v1/chat/completions", json={"model": MODEL, "messages": "nope", "n": j})
            assert bad.status_code == 400
        time.sleep(0.3)  # the heap is trimmed after the reply
        rss.append(rss_mb())
    assert len(latencies) >= 10 and max(latencies) < 1.0, latencies
    assert max(rss[2:]) - rss[1] < 64, rss


def test_a_queued_request_whose_client_leaves_is_dropped(model_dir):
    engine, tok = scripted_engine(model_dir, max_num_seqs=1)
    server = Server(engine, tok, max_queue=4)
    try:
        script(server, "word " * 300)
        engine.runner.delay = 0.01
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 300, "stream": True}
        url = server.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=30) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # it runs: max_num_seqs=1
            with pytest.raises(httpx.ReadTimeout):  # queued behind it, gives up after 1 s
                httpx.post(url, json={**body, "stream": False}, timeout=1.0)
            deadline = time.monotonic() + 5
            while server.metrics()["dsv32_requests_waiting"] > 0:  # noticed while still queued
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert server.metrics()["dsv32_requests_running"] == 1
            started = server.metrics()["dsv32_prompt_tokens_total"]
        engine.runner.delay = 0.0
        m = server.wait_idle()
        assert m["dsv32_prompt_tokens_total"] == started  # the queued one was never prefilled
        assert m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"] and not engine.seqs
    finally:
        engine.runner.delay = 0.0
        server.stop()


def test_sigterm_ends_inflight_generations_with_a_clear_error_within_the_timeout(model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (f"from dsv32.server import serve; serve(['--model', {str(model_dir)!r}, '--port', '{port}', "
            "'--device', 'cpu', '--shutdown-timeout', '1', '--served-model-name', 'dsv32-test'])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models/dsv32-test").json()["id"] == "dsv32-test"
        body = {"model": "dsv32-test", "messages": HELLO, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            events += list(lines)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert time.monotonic() - t0 < 1 + 10  # the timeout, and a few seconds to close
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_prompt_encoder_gives_the_tokenizers_ids_from_its_child_process(real):
    tok, text = real.tok, "import json\ndef f(x): return x\n"
    messages = [{"role": "user", "content": text}]
    encoder = PromptEncoder(tok, min_chars=8)  # everything past 8 characters goes to the child

    async def run():
        assert await encoder.encode(text) == tok.encode(text)
        assert await encoder.chat(messages, "chat", prefill="def") == \
            tok.apply_chat_template(messages, thinking_mode="chat") + tok.encode("def")
        with pytest.raises(TooManyTokens) as e:
            await encoder.encode(text * 10, limit=20)
        assert e.value.n_tokens == len(tok.encode(text * 10))

    try:
        asyncio.run(run())
        assert encoder.pool is not None  # it ran there
    finally:
        encoder.close()


PARENT = """
import asyncio, sys
from dsv32.server.prompts import PromptEncoder
from dsv32.tokenizer import Tokenizer

if __name__ == "__main__":   # the child is spawned: it imports this module again
    encoder = PromptEncoder(Tokenizer.from_file(sys.argv[1]), min_chars=8)
    asyncio.run(encoder.encode("def f(x): return x\\n" * 4))   # starts the child
    print(*encoder.pool._processes, flush=True)                 # its pid
    sys.stdin.read()                                            # wait to be killed
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_tokenizer_child_ends_when_its_server_is_killed(model_dir, tmp_path):
    """A server killed outright (SIGKILL: no shutdown code runs) leaves no tokenizer process behind."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(model_dir / "tokenizer.json")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert Path(f"/proc/{child}").exists()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
        assert gone, f"the tokenizer child {child} outlived its server"
    finally:
        parent.kill()
