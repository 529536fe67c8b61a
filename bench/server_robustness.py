"""Server robustness benchmark (CPU or GPU): what issue 22 asks the server to show.

- /health latency (p50 / p99 / max) while a prompt of --big-mb MB is being tokenised;
- the server process's resident memory over --requests malformed requests, --big of them prompts
  of --big-mb MB (each refused: longer than the context), against its resident memory before;
- the time from SIGTERM to the process's exit with --streams generations in flight, and how each
  stream ended (the server_shutting_down error after --shutdown-timeout).

    python bench/server_robustness.py [--model DIR] [--device cuda] --out bench/results
    python bench/server_robustness.py --tiny --requests 40 --big 2 --big-mb 1 --out /tmp/rb   # CPU smoke

Writes <out>/server_robustness-<model>-<device>.json and .md. The server runs as `dsv32 serve` in
a subprocess (its memory, with its tokenizer process's, is read from /proc, so Linux only).
bench/results/server_robustness-tiny-cpu.md: `--tiny --device cpu --requests 1000 --big 50
--big-mb 5 --streams 8 --shutdown-timeout 3` on a 2-core machine shared with other jobs (the tiny
model is named by its temporary directory there).
"""

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tiny_model(path: Path) -> Path:
    """A random tiny V3.2 checkpoint with a BPE tokenizer trained on two stdlib files."""
    import torch

    from dsv32.config import preset
    from dsv32.loader import save
    from dsv32.model import Transformer
    from dsv32.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer([json.decoder.__file__, textwrap.__file__], 512, path)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    save(Transformer(cfg), path)
    return path


def rss_mb(pid: int) -> float:
    """Resident memory of pid and its children (the server's tokenizer process), in MB."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += rss_mb(int(child))
            except FileNotFoundError:  # it just ended
                pass
    return total


def malformed(model: str) -> list:
    """Small malformed bodies for /v1/chat/completions, each answered 4xx."""
    hi = [{"role": "user", "content": "hi"}]
    return [b"{not json", {"model": model}, {"model": model, "messages": "hi"}, {"model": "gpt-4", "messages": hi},
            {"model": model, "messages": hi, "n": 0}, {"model": model, "messages": hi, "temperature": 9},
            {"model": model, "messages": hi, "top_p": 0}, {"model": model, "messages": hi, "max_tokens": -1},
            {"model": model, "messages": hi, "logit_bias": {"x": 1}}, {"model": model, "messages": hi, "best_of": 3},
            {"model": model, "messages": hi, "top_logprobs": 3}, {"model": model, "messages": [{"role": "x"}]},
            b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % model.encode(),
            b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}' % model.encode()]


def post(url: str, body, timeout: float = 600) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=timeout)
    return httpx.post(url, json=body, timeout=timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the serve default (SmolLM2-DSA)")
    p.add_argument("--tiny", action="store_true", help="a random tiny V3.2 model made here (CPU smoke)")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--big", type=int, default=50, help="how many of the requests are big prompts")
    p.add_argument("--big-mb", type=float, default=5.0)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--shutdown-timeout", type=float, default=3.0)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model = str(tiny_model(Path(tmp.name))) if args.tiny else args.model
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "dsv32.cli", "serve", "--port", str(port), "--shutdown-timeout",
            str(args.shutdown_timeout), *(["--model", model] if model else []),
            *(["--device", args.device] if args.device else []), "--max-request-bytes", str(64 << 20)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(proc.stderr.read().decode()[-3000:])
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    card = httpx.get(url + "/v1/models").json()["data"][0]
    name = card["id"]
    small = malformed(name)
    big_text = "def f(x): return x\n" * int(args.big_mb * 2**20 / 19)
    every = max(1, args.requests // max(1, args.big))
    rss = [(0, rss_mb(proc.pid))]
    health, big_seconds, statuses = [], [], {}
    n_big = 0
    for i in range(args.requests):
        if i % every == 0 and n_big < args.big:
            n_big += 1
            done = threading.Event()

            def poll(done=done):
                while not done.is_set():
                    t = time.perf_counter()
                    httpx.get(url + "/health", timeout=60)
                    health.append(time.perf_counter() - t)
                    time.sleep(0.01)

            poller = threading.Thread(target=poll)
            poller.start()
            t0 = time.perf_counter()
            r = post(url + "/v1/chat/completions",
                     {"model": name, "messages": [{"role": "user", "content": big_text + str(i)}]})
            big_seconds.append(time.perf_counter() - t0)
            done.set()
            poller.join()
        else:
            r = post(url + "/v1/chat/completions", small[i % len(small)])
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if (i + 1) % 25 == 0 or i + 1 == args.requests:
            time.sleep(0.2)
            rss.append((i + 1, rss_mb(proc.pid)))
    assert httpx.get(url + "/health").status_code == 200

    # SIGTERM with generations in flight
    ends, started = [], threading.Barrier(args.streams + 1, timeout=600)

    def stream():
        body = {"model": name, "messages": [{"role": "user", "content": "Count to a million."}],
                "max_tokens": max(1, card["max_model_len"] - 64), "ignore_eos": True, "stream": True}
        last, first = None, True
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if first:
                    first = False
                    started.wait()
                if line.startswith("data: ") and line != "data: [DONE]":
                    last = line
        error = json.loads(last.removeprefix("data: ")).get("error") if last else None
        ends.append(error["code"] if error else "finished")

    threads = [threading.Thread(target=stream) for _ in range(args.streams)]
    for t in threads:
        t.start()
    started.wait()
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=args.shutdown_timeout + 120)
    exit_s = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=60)

    q = statistics.quantiles(health, n=100, method="inclusive") if len(health) >= 2 else [health[0]] * 99 if health else [0.0] * 99
    result = {
        "model": name, "device": args.device or "auto", "requests": args.requests, "big_prompts": n_big,
        "big_mb": args.big_mb, "statuses": statuses, "non_4xx": sum(v for k, v in statuses.items() if not 400 <= k < 500),
        "big_prompt_seconds_median": statistics.median(big_seconds) if big_seconds else None,
        "health_ms": {"n": len(health), "p50": 1e3 * q[49], "p99": 1e3 * q[98], "max": 1e3 * max(health, default=0)},
        "rss_mb": {"before": rss[0][1], "after": rss[-1][1], "max": max(r for _, r in rss),
                   "after_25": rss[1][1] if len(rss) > 1 else None, "series": rss},
        "sigterm": {"streams": args.streams, "shutdown_timeout_s": args.shutdown_timeout, "exit_s": exit_s,
                    "exit_code": proc.returncode, "stream_ends": ends},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"server_robustness-{'tiny' if args.tiny else Path(name).name}-{args.device or 'auto'}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    h, m, s = result["health_ms"], result["rss_mb"], result["sigterm"]
    stem.with_suffix(".md").write_text(textwrap.dedent(f"""\
        # Server robustness: {name} ({result['device']})

        | measure | value |
        |---|---|
        | requests (big prompts of {args.big_mb} MB) | {args.requests} ({n_big}) |
        | answers by status | {statuses} (non-4xx: {result['non_4xx']}) |
        | big prompt, time to its 400 (median) | {result['big_prompt_seconds_median']:.2f} s |
        | /health while big prompts are tokenised (n, p50, p99, max) | {h['n']}, {h['p50']:.1f} ms, {h['p99']:.1f} ms, {h['max']:.1f} ms |
        | server RSS before, after the first 25, after all, max | {m['before']:.0f}, {m["after_25"]:.0f}, {m['after']:.0f}, {m['max']:.0f} MB |
        | SIGTERM with {s['streams']} streams in flight, --shutdown-timeout {s['shutdown_timeout_s']} s: exit after | {s['exit_s']:.2f} s (code {s['exit_code']}) |
        | how the streams ended | {s['stream_ends']} |
        """))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
