"""`dsv32 chat`: a conversation in the terminal, with the engine in-process (no HTTP).

Replies stream as the model's chat format parses them (V3.2's, or ChatML for a converted SmolLM2):
reasoning dimmed, tool calls on marked lines, the answer plain. `/reset` starts over, `/exit` (or
end of input) quits, Ctrl-C cuts a reply short.
"""

import argparse
import sys
import time

from dsv32.preflight import has_thinking_mode
from dsv32.registry import DEFAULT_NAME
from dsv32.tokenizer import Detokenizer

DIM, TOOL, PLAIN = "\033[2m", "\033[36m", "\033[0m"


def banner(name: str, engine, load_s: float) -> str:
    """What is loaded: the model, its context in this engine, its attention, and the load time."""
    cfg = engine.runner.model.cfg
    k = getattr(cfg, "index_topk", 0)
    attn = f"DSA top-{k}" if k and k < engine.max_model_len else "dense attention"
    return (f"{name}: {cfg.num_hidden_layers} layers, context {engine.max_model_len} tokens, {attn}; "
            f"loaded in {load_s:.1f}s on {engine.device}")


def stream_reply(engine, tokenizer, prompt: list[int], params, mode: str, out=sys.stdout) -> dict:
    """Generate one assistant turn alone on the engine, writing it to out as it arrives; return the
    parsed message. A stop string (the Detokenizer's) or Ctrl-C aborts the request."""
    rid = engine.add_request(prompt, params).request_id
    detok, parser = Detokenizer(tokenizer, params.stop), tokenizer.stream_parser(mode, lenient=True)
    style, finish, error = None, None, None
    n_tokens, t0 = 0, time.perf_counter()
    while finish is None:
        new = []
        try:
            for o in engine.step():
                if o.request_id == rid:
                    new, finish, error = o.token_ids, o.finish_reason, o.error
                    n_tokens += len(new)
        except KeyboardInterrupt:
            engine.abort(rid)
            finish = "abort"
        events = parser.feed(detok.feed(new, final=finish is not None))
        if detok.stopped:  # a stop string ended the text
            if finish is None:
                engine.abort(rid)
            finish = "stop"
        if finish is not None:
            events += parser.finish()
        for kind, value in events:
            if kind != style:
                out.write({"reasoning": DIM, "content": PLAIN, "tool_call": "\n" + TOOL}[kind])
                style = kind
            if kind == "tool_call":
                out.write(f"[tool call] {value['function']['name']}({value['function']['arguments']})\n")
            else:
                out.write(value)
        out.flush()
    out.write(f"{PLAIN}\n")
    dt = time.perf_counter() - t0
    ended = f"{finish}{': ' + error if error else ''}; " if finish in ("length", "abort", "error") else ""
    out.write(f"{DIM}[{ended}{n_tokens} tokens, {n_tokens / max(dt, 1e-9):.1f} tokens/s]{PLAIN}\n")
    return parser.message


def main(argv: list[str] | None = None) -> int:
    from dsv32.engine import SamplingParams
    from dsv32.server import add_engine_args, load_engine

    p = argparse.ArgumentParser(prog="dsv32 chat", description="chat with a model in the terminal")
    add_engine_args(p)
    p.add_argument("--thinking", action="store_true", help="thinking mode (default: chat mode)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="CTRL's penalty on tokens already in the context (1 = off; small models loop without one)")
    args = p.parse_args(argv)
    if args.thinking and not has_thinking_mode(args.model):  # known from config.json: before the load
        raise ValueError(f"{args.model or DEFAULT_NAME}'s chat format has no thinking mode: drop --thinking")
    t0 = time.perf_counter()
    engine, tokenizer = load_engine(args)
    load_s = time.perf_counter() - t0
    mode = "thinking" if args.thinking else "chat"
    if tokenizer.chat_format is None:
        raise ValueError("this model has no chat format (its vocabulary has no chat tokens): "
                         "use dsv32 generate --model DIR PROMPT")
    if args.thinking and tokenizer.chat_format != "v32":
        raise ValueError(f"this model's chat format ({tokenizer.chat_format}) has no thinking mode: drop --thinking")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            repetition_penalty=args.repetition_penalty, stop_token_ids=list(tokenizer.stop_ids))
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"{DIM}{banner(args.model or DEFAULT_NAME, engine, load_s)}\n{mode} mode; /reset starts over, "
          f"/exit quits{PLAIN}")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages, thinking_mode=mode)
        try:
            msg = stream_reply(engine, tokenizer, prompt, params, mode)
        except ValueError as e:  # the conversation outgrew the context
            print(f"error: {e}; /reset to start over")
            messages.pop()
            continue
        # no tools run here, so calls cannot get results: keep the text of the turn only
        messages.append({"role": "assistant", "content": msg["content"],
                         "reasoning_content": msg["reasoning_content"]})
