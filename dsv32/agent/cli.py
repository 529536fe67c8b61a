"""`dsv32 agent "task"`: the agent loop from the command line, printing each step as it completes.

The model runs in this process (`--model`: a V3.2 directory or preset, through `dsv32.load`) or
behind any OpenAI-compatible endpoint (`--base-url`). The tools are built here: `python` (a
stateful Jupyter kernel) and `bash` in one bubblewrap sandbox per episode, `search` (search / open
/ find) over a local corpus (`--corpus`, built with `dsv32 corpus build`). Without bubblewrap the
code tools are refused, unless `--unsafe-no-sandbox` (trusted code only; see docs/agent.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from dsv32.agent.bash_tool import BashTool
from dsv32.agent.browser import Browser
from dsv32.agent.context import STRATEGIES
from dsv32.agent.corpus import Corpus, CorpusError
from dsv32.agent.loop import AgentConfig, AgentLoop, Episode
from dsv32.agent.policy import EnginePolicy, OpenAIPolicy, PolicyError
from dsv32.agent.python_tool import PythonTool
from dsv32.agent.sandbox import Sandbox, SandboxError
from dsv32.agent.tool import Tool
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32 import loader

TOOLS = ("python", "bash", "search")
SHOWN_LINES = 20   # lines of each tool result printed (the model sees all of it)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 agent", description="Run a task with tools: the model thinks, calls "
                                "them, reads their results and answers (DeepSeek-V3.2's thinking with tools).")
    p.add_argument("task", help="the task, as the user's message")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a V3.2 model directory (config.json, *.safetensors, tokenizer.json) or a preset "
                     "name, run here by our engine")
    src.add_argument("--base-url", help="an OpenAI-compatible endpoint instead, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--served-model", help="the endpoint's model name (default: the first it lists)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--tools", default="python,bash", help=f"comma-separated, from {', '.join(TOOLS)} (default: "
                   "python,bash); '' for none")
    p.add_argument("--corpus", help="the search tools' corpus directory (dsv32 corpus build --out DIR)")
    p.add_argument("--context-strategy", choices=STRATEGIES, default="none",
                   help="what to do when the next call would pass 80%% of the context window")
    p.add_argument("--attempts", type=int, default=4, help="parallel-fewest-step's number of attempts")
    p.add_argument("--max-steps", type=int, default=100, help="model calls, summary calls included")
    p.add_argument("--token-budget", type=int, help="tokens the model may write over the whole run")
    p.add_argument("--max-tool-calls", type=int)
    p.add_argument("--max-new-tokens", type=int, default=4096, help="per model call")
    p.add_argument("--context-window", type=int, help="default: the engine's max_model_len, or the endpoint's "
                   "(/v1/models), else 128K")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true", help="non-thinking mode (thinking is the default)")
    p.add_argument("--system", help="a system prompt before the task")
    p.add_argument("--workdir", help="where the sandbox's task directories go (default: a temporary directory, "
                   "removed at the end)")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="run the code tools WITHOUT isolation, as you, "
                   "with the network and your files (trusted code only)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--save", help="write the episode (log, steps, end reason, answer) to this JSON file")
    return p


def tool_factory(names: list[str], root: Path, corpus: Corpus | None, unsafe: bool,
                 sandboxes: list[Sandbox]) -> Callable[[], list[Tool]]:
    """A function making a fresh set of tools per episode: one sandbox for python and bash, one
    browser over the corpus."""
    def make() -> list[Tool]:
        tools: list[Tool] = []
        if "python" in names or "bash" in names:
            box = Sandbox(root, "task", unsafe_no_sandbox=unsafe)
            sandboxes.append(box)
            tools += [PythonTool(box)] if "python" in names else []
            tools += [BashTool(box)] if "bash" in names else []
        if "search" in names:
            tools += Browser(corpus).tools()
        return tools

    return make


class ToolSetupError(ValueError):
    """The tools asked for cannot be built: an unknown name, no corpus, no sandbox."""


def check_tools(names: list[str], corpus_dir: str | None, root: Path, unsafe: bool) -> Corpus | None:
    """Check that the tools `names` can be built (known names; a corpus for search; a bubblewrap
    sandbox that starts under `root` for python and bash, unless `unsafe`) before anything heavy
    loads; return the search tools' corpus, if asked for. Shared by `dsv32 agent` and `dsv32 serve
    --agent-tools`. Raises ToolSetupError saying what is wrong; warns on stderr when unsafe."""
    if unknown := [n for n in names if n not in TOOLS]:
        raise ToolSetupError(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    corpus = None
    if "search" in names:
        if not corpus_dir:
            raise ToolSetupError("the search tools need --corpus DIR (build one with `dsv32 corpus build --out DIR`)")
        try:
            corpus = Corpus.load(corpus_dir)
        except CorpusError as e:
            raise ToolSetupError(str(e)) from None
    if "python" in names or "bash" in names:
        try:
            Sandbox(root, "probe", unsafe_no_sandbox=unsafe).remove()
        except SandboxError as e:
            raise ToolSetupError(str(e)) from None
        if unsafe:
            print("WARNING: --unsafe-no-sandbox: the model's code runs as you, with the network and your files",
                  file=sys.stderr)
    return corpus


class Printer:
    """Prints each event of the loop as it happens (one episode at a time: the episode tags,
    `task` and `attempt`, are left out)."""

    def __call__(self, kind: str, data: dict) -> None:
        getattr(self, kind)(**{k: v for k, v in data.items() if k not in ("task", "attempt")})
        sys.stdout.flush()

    def attempt(self, index: int) -> None:
        print(f"\n=== attempt {index + 1} ===")

    def step(self, index: int, step, message: dict | None) -> None:
        what = "summary call" if step.kind == "summary" else "step"
        print(f"\n--- {what} {index}: {step.prompt_tokens} prompt tokens, {step.completion_tokens} written ---")
        if message is None:
            print(step.text)
            return
        if message.get("reasoning_content"):
            print(f"<think>\n{message['reasoning_content'].strip()}\n</think>")
        if message.get("content"):
            print(message["content"].strip())

    def tool_call(self, call: dict) -> None:
        print(f"-> {call['function']['name']} {call['function']['arguments']}")

    def tool_result(self, call: dict, result: str) -> None:
        lines = result.splitlines()
        more = f"\n   ... ({len(lines) - SHOWN_LINES} more lines)" if len(lines) > SHOWN_LINES else ""
        print("<- " + "\n   ".join(lines[:SHOWN_LINES]) + more)

    def context(self, event: dict, window: int) -> None:
        print(f"\n--- context: {event['strategy']} after step {event['step']} (the next call would use "
              f"{event['tokens']} of {window} tokens) ---")
        if event.get("summary"):
            print(f"summary: {event['summary']}")

    def end(self, episode: Episode) -> None:
        tokens = episode.completion_tokens
        why = f" ({episode.error})" if episode.error else ""
        print(f"\n--- end: {episode.end}{why}; {len(episode.steps)} steps, {episode.tool_calls} tool calls, "
              f"{tokens} tokens written ---")


def make_policy(args, thinking_mode: str):
    if args.base_url:
        return OpenAIPolicy(args.base_url, args.served_model, args.api_key, thinking_mode, args.context_window)
    model, tok = loader.load(args.model, dtype=args.dtype, device=args.device)
    if tok is None:
        raise ValueError(f"{args.model} comes without a tokenizer (a preset has none): pass a model directory "
                         "with tokenizer.json")
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_model_len=args.context_window))
    return EnginePolicy(engine, tok, thinking_mode, record=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="dsv32-agent-") as tmp:
        root = Path(args.workdir or tmp)
        try:  # refuse before loading a model: no bubblewrap, no code tools unless told otherwise
            corpus = check_tools(names, args.corpus, root, args.unsafe_no_sandbox)
        except ToolSetupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        thinking_mode = "chat" if args.chat else "thinking"
        try:
            policy = make_policy(args, thinking_mode)
        except (PolicyError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sandboxes: list[Sandbox] = []
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                                  seed=args.seed)
        config = AgentConfig(max_steps=args.max_steps, max_tokens=args.token_budget,
                             max_tool_calls=args.max_tool_calls, context_strategy=args.context_strategy,
                             attempts=args.attempts)
        agent = AgentLoop(policy, tool_factory(names, root, corpus, args.unsafe_no_sandbox, sandboxes), sampling,
                          config, Printer())
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.task}]
        try:
            episode = agent.run(messages)
        finally:
            for box in sandboxes:  # a --workdir keeps the task directories to look at
                if args.workdir:
                    box.close()
                else:
                    box.remove()
    if episode.attempts:
        print(f"kept attempt {episode.attempts.index(episode) + 1} of {len(episode.attempts)} "
              f"({episode.total_steps} steps in all)")
    if args.save:
        Path(args.save).write_text(json.dumps(episode.to_json(), ensure_ascii=False, indent=1) + "\n",
                                   encoding="utf-8")
    if episode.end == "answer":
        print(f"\n{episode.answer}")
        return 0
    return 1
