"""`dsv32 eval --tasks DIR/environments.jsonl`: pass@k of a policy on general-agent environments
written by `dsv32 synth general` (routed here by `dsv32.cli`, since running an environment's
tools and verifier is synth's business and eval sits below it).

Each environment is attempted n times (`-n`) with its own tools and `submit_result`, through the
agent loop (dsv32.synth.env_attempt): the policy is the endpoint at `--base-url` or our engine
(`--model`, a model in the V3.2 chat format); attempt i samples with seed + i * 1000003. An
attempt is correct when the environment's verifier gives its submission the full score. The
results, the summary and the report are those of every `dsv32 eval` run (dsv32.eval.report,
pass@k from dsv32.eval.passk), one task per environment, its id the environment's name; a rerun
with the same --out skips the environments already in results.jsonl.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from dsv32.agent.loop import AgentConfig
from dsv32.agent.policy import EnginePolicy, OpenAIPolicy, PolicyError
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.eval.cli import build_parser
from dsv32.eval.passk import parse_ks
from dsv32.eval.report import read_results, render, summarize
from dsv32.synth.env_attempt import Attempt, attempt
from dsv32.synth.environment import INDEX, EnvironmentFormatError, read_index
from dsv32.synth.rl_env import EnvironmentRunner
from dsv32.synth.solvability import seeded

MAX_STEPS = 100


def _sample(a: Attempt) -> dict:
    status = "correct" if a.passed else "error" if a.end == "policy_error" else "wrong"
    return {"status": status, "score": a.score, "extracted": a.submitted, "detail": "; ".join(a.reasons),
            "finish_reason": a.end, "num_tokens": a.completion_tokens, "thinking_chars": a.reasoning_chars,
            "answer_chars": len(a.submitted or ""), "text": a.answer, "steps": a.steps, "tool_calls": a.tool_calls}


def run_env_eval(root: str | Path, policy, runner: EnvironmentRunner, n: int, ks: list[int], out_dir: str | Path,
                 sampling: SamplingParams, config: AgentConfig | None = None, title: str = "Evaluation") -> dict:
    """n attempts at every environment of `root`'s index, graded by their verifiers; the summary."""
    if any(k > n for k in ks):
        raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples per task, but n={n}")
    root = Path(root)
    rows = read_index(root)
    if not rows:
        raise EnvironmentFormatError(f"{root / INDEX} lists no environments")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["id"]: r["n"] for r in read_results(results)}
    if other := set(done.values()) - {n}:
        raise ValueError(f"{results} holds tasks sampled with n={sorted(other)}, not n={n}: use another output folder")
    todo = [r for r in rows if r["name"] not in done]
    with results.open("a", encoding="utf-8") as f, tqdm(total=len(todo) * n, desc="attempts", disable=not todo) as bar:
        for row in todo:
            got = []
            for i in range(n):
                got.append(attempt(runner, str(root / row["path"]), policy, seeded(sampling, i), config))
                bar.update(1)
            samples = [_sample(a) for a in got]
            f.write(json.dumps({"id": row["name"], "answer": "", "grader": "verifier", "n": n,
                                "correct": sum(a.passed for a in got), "samples": samples}, ensure_ascii=False) + "\n")
            f.flush()
    names = {r["name"] for r in rows}
    summary = summarize([r for r in read_results(results) if r["id"] in names], ks)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(render(summary, title))
    return summary


def make_policy(args, thinking_mode: str):
    if args.base_url:
        model = None if args.api_model == "default" else args.api_model
        return OpenAIPolicy(args.base_url, model, args.api_key, thinking_mode)
    from dsv32.loader import (
        load,  # the composition root, a layer above (as in dsv32/eval/cli.py)
    )

    model, tok = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    if tok is None:
        raise ValueError(f"{args.model} comes without a tokenizer: pass --tokenizer or a model directory")
    return EnginePolicy(Engine(model, EngineConfig(num_blocks=args.num_blocks, max_num_seqs=1)), tok, thinking_mode,
                        record=False)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        ks = parse_ks(args.k, args.n)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.protocol:
        print("error: --protocol does not apply to environments", file=sys.stderr)
        return 2
    root = Path(args.tasks)
    root = root.parent if root.name == INDEX else root
    mode = "thinking" if args.thinking else "chat"
    try:
        policy = make_policy(args, mode)
    except (PolicyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dsv32-env-eval-"))
    runner = EnvironmentRunner(workdir, unsafe_no_sandbox=args.unsafe_no_sandbox)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    title = f"{args.tasks} on {args.base_url or args.model} ({mode} mode, n={args.n}, temperature {args.temperature})"
    try:
        summary = run_env_eval(root, policy, runner, args.n, ks, args.out, sampling, AgentConfig(max_steps=MAX_STEPS),
                               title)
    except (EnvironmentFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        runner.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for k, p in summary["pass_at_k"].items():
        print(f"pass@{k} = {p['mean']:.4f} ± {p['stderr']:.4f} over {p['tasks']} environments")
    print(f"report in {args.out}/report.md")
    return 0
