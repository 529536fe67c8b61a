"""Structured outputs and forced tool calls on a served model, checked as a client would: the real
`openai` client against `dsv32 serve`'s app (in-process, on a loopback port), n sampled replies at
temperature 1.0 per check, every reply validated with `jsonschema`.

    python experiments/structured_outputs.py --out runs/structured [--model SRC] [--n 100]

Checks: response_format json_schema (the reply parses and validates), json_object (the reply is
a JSON object), tool_choice "required" and a named function (every reply is a call of an offered
tool, of that tool when named, whose arguments validate against its schema). Without --model the
default model (SmolLM2-DSA, ChatML, <tool_call> form); a V3.2 checkpoint directory exercises the
DSML block. Writes structured.json and structured.md under --out.
"""

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import uvicorn

from dsv32.server import add_engine_args, load_engine
from dsv32.server.app import create_app

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "languages"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "city": {"type": "string", "maxLength": 40},
                         "languages": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 20}}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"type": "string", "maxLength": 40}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "additionalProperties": False,
                                                          "required": ["city"],
                                                          "properties": {"city": {"type": "string", "maxLength": 40}}}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CHECKS = {
    "json_schema": ([{"role": "user", "content": "Describe a fictional person as JSON."}],
                    {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}),
    "json_object": ([{"role": "user", "content": "Give me a JSON object describing Paris."}],
                    {"response_format": {"type": "json_object"}}),
    "tool_required": ([{"role": "user", "content": "Will it rain in Lyon this week?"}],
                      {"tools": TOOLS, "tool_choice": "required"}),
    "tool_named": ([{"role": "user", "content": "What's it like in Oslo?"}],
                   {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
}


def check(name: str, choice) -> str | None:
    """None if the reply satisfies the check, else what is wrong."""
    try:
        if name.startswith("json"):
            value = json.loads(choice.message.content)
            jsonschema.validate(value, PERSON if name == "json_schema" else {"type": "object"})
            return None
        calls = choice.message.tool_calls or []
        if choice.finish_reason != "tool_calls" or not calls:
            return f"no tool call (finish_reason {choice.finish_reason}): {choice.message.content!r:.200}"
        for call in calls:
            if name == "tool_named" and call.function.name != "get_weather":
                return f"called {call.function.name}"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        return None
    except (ValueError, KeyError, jsonschema.ValidationError) as e:
        return f"{type(e).__name__}: {str(e)[:200]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    engine_parser = argparse.ArgumentParser()
    add_engine_args(engine_parser)   # the server's own engine options and their defaults
    engine_args = engine_parser.parse_args([])
    engine_args.model, engine_args.device, engine_args.max_num_seqs = args.model, args.device, 32
    engine, tok = load_engine(engine_args)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tok, "m"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0,
                           timeout=3600)
    results = {}
    try:
        for name, (messages, kw) in CHECKS.items():
            t0 = time.perf_counter()

            def one(seed, messages=messages, kw=kw):
                return client.chat.completions.create(model="m", messages=messages, temperature=1.0, seed=seed,
                                                      max_tokens=args.max_tokens, **kw).choices[0]
            with ThreadPoolExecutor(32) as pool:
                choices = list(pool.map(one, range(args.n)))
            failures = [(i, err) for i, c in enumerate(choices) if (err := check(name, c))]
            results[name] = {"n": args.n, "valid": args.n - len(failures), "seconds": time.perf_counter() - t0,
                             "failures": failures[:5],
                             "examples": [c.message.content if name.startswith("json") else
                                          [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
                                          for c in choices[:3]]}
            print(name, results[name]["valid"], "/", args.n, flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model or "SmolLM2-DSA (default)", "chat_format": tok.chat_format,
            "device": str(engine.device), "temperature": 1.0, "max_tokens": args.max_tokens}
    (out / "structured.json").write_text(json.dumps({**meta, "checks": results}, indent=1, ensure_ascii=False))
    lines = [f"# Structured outputs on {meta['model']} ({meta['chat_format']}, {meta['device']})", "",
             (f"{args.n} replies per check at temperature 1.0, validated with jsonschema "
              "(`experiments/structured_outputs.py`)."), "",
             "| check | valid | seconds | first example |", "|---|---|---|---|"]
    for name, r in results.items():
        example = json.dumps(r["examples"][0], ensure_ascii=False)[:120].replace("|", "\\|")
        lines.append(f"| {name} | {r['valid']} / {r['n']} | {r['seconds']:.0f} | `{example}` |")
    (out / "structured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
