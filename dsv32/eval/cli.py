"""`dsv32 eval`: pass@k of a model on tasks, sampled through our engine or an endpoint.

    dsv32 eval --tasks aime.jsonl --model DIR -n 16 -k 1,4,16 --thinking --max-tokens 32768 --out runs/aime
    dsv32 eval --tasks rg:basic_arithmetic:100 --base-url http://127.0.0.1:8000/v1 -n 4 -k 1,4 --out runs/rg

    dsv32 eval --protocol ioi --tasks ioi.jsonl --base-url URL -n 500 --submissions 50 --thinking --out runs/ioi
    dsv32 eval longctx --lengths 2048,8192 --variants dense,dsa,window,sinks,quest --out runs/longctx

Defaults follow the V3.2 evaluations: temperature 1.0, top-p 1.0, prompts in the math template.
Rerunning with the same --out resumes: tasks already in its results.jsonl are not sampled again.

Code tasks (`"grader": "code"`) and the contest protocols (`--protocol ioi|icpc`, problems with
sample tests and subtasks) run the model's programs in a bubblewrap sandbox; without bubblewrap
they are refused unless --unsafe-no-sandbox (trusted code only).
"""

import argparse
import sys

from dsv32.agent.sandbox import SandboxError
from dsv32.eval.code import CodeJudge
from dsv32.eval.contest import PROTOCOLS, load_problems, run_contest
from dsv32.eval.longctx.cli import main as longctx_main
from dsv32.eval.passk import parse_ks
from dsv32.eval.proof_run import load_proof_problems, run_proofs
from dsv32.eval.run import run_eval
from dsv32.eval.sample import EndpointSampler, EngineSampler, SamplingConfig
from dsv32.eval.tasks import TEMPLATES, TaskError, load_tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", required=True, help="FILE.jsonl, or rg:NAME[:N] (N reasoning-gym problems, default 50)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model for dsv32.load: directory, .gguf or preset (with --tokenizer)")
    src.add_argument("--base-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", default="default", help="the model name sent to the endpoint")
    p.add_argument("--api-key", default="none")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the endpoint")
    p.add_argument("--tokenizer", help="a tokenizer.json (or its directory) for --model")
    p.add_argument("-n", type=int, default=16, help="samples per task")
    p.add_argument("-k", default="1", help="comma-separated k for pass@k, each at most n")
    p.add_argument("--thinking", action="store_true", help="thinking mode (the answer is read after </think>)")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string for the answer (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seeds, and reasoning-gym's generator")
    p.add_argument("--template", choices=TEMPLATES, default="math", help="how a JSONL 'prompt' is wrapped")
    p.add_argument("--grade-timeout", type=float, default=30.0, help="seconds per verdict")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--num-blocks", type=int, default=None, help="the engine's KV cache blocks (default: from memory)")
    p.add_argument("--protocol", choices=PROTOCOLS + ("imo",), help="Speciale's protocols: ioi|icpc on --tasks "
                   "problems (samples + subtasks): sample -n candidates, filter, submit the longest-thinking ones, "
                   "score; imo on proof problems: generate, self-verify and refine until the verifier gives 1")
    p.add_argument("--max-rounds", type=int, default=16, help="imo: proofs scored per problem at most (default 16)")
    p.add_argument("--verifications", type=int, default=1, help="imo: verifier calls per proof, averaged")
    p.add_argument("--verifier-url", help="imo: an OpenAI-compatible endpoint for the verifier (default: the prover)")
    p.add_argument("--submissions", type=int, default=None, help="submissions per problem (default: 50 for ioi, "
                   "every surviving candidate for icpc)")
    p.add_argument("--time-limit", type=float, default=2.0, help="seconds per code test, unless the task sets one")
    p.add_argument("--memory-mb", type=int, default=512, help="address space per code test, unless the task sets one")
    p.add_argument("--workdir", help="where the code sandbox's directory goes (default: a temporary directory)")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="run model-written code WITHOUT isolation, as "
                   "you, with the network and your files (trusted code only)")
    p.add_argument("--out", required=True, help="output folder: results.jsonl, summary.json, report.md")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["longctx"]:  # `dsv32 eval longctx ...`: the long-context suite, its own flags
        return longctx_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        ks = parse_ks(args.k, args.n)  # before loading a model only to fail
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_rounds < 1 or args.verifications < 1:
        print(f"error: --max-rounds and --verifications must be >= 1, got {args.max_rounds} and "
              f"{args.verifications}", file=sys.stderr)
        return 2
    try:
        if args.protocol == "imo":
            tasks = load_proof_problems(args.tasks)
        else:
            tasks = load_problems(args.tasks) if args.protocol else load_tasks(args.tasks, seed=args.seed,
                                                                              template=args.template)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    judge = None
    if args.protocol in PROTOCOLS or any(getattr(t, "grader", None) == "code" for t in tasks):  # before a model
        try:
            judge = CodeJudge(args.workdir, time_limit=args.time_limit, memory_mb=args.memory_mb,
                              unsafe_no_sandbox=args.unsafe_no_sandbox)
        except SandboxError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.unsafe_no_sandbox:
            print("WARNING: --unsafe-no-sandbox: the model's code runs as you, with the network and your files",
                  file=sys.stderr)
    try:
        return _run(args, tasks, ks, judge)
    finally:
        if judge is not None:
            judge.close()


def _run(args, tasks, ks: list[int], judge: CodeJudge | None) -> int:
    cfg = SamplingConfig(n=args.n, thinking=args.thinking, temperature=args.temperature, top_p=args.top_p,
                         max_tokens=args.max_tokens, stop=tuple(args.stop), seed=args.seed)
    if args.base_url:
        sampler, what = EndpointSampler(args.base_url, args.api_model, args.api_key, args.concurrency), args.base_url
    else:
        from dsv32.engine import LLM, EngineConfig
        from dsv32.loader import (
            load,  # the composition root, a layer above eval (as in engine/llm.py)
        )

        model, tok = load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
        sampler, what = EngineSampler(LLM(model, EngineConfig(num_blocks=args.num_blocks), tokenizer=tok)), args.model
    mode = "thinking" if args.thinking else "chat"
    title = f"{args.tasks} on {what} ({mode} mode, n={args.n}, temperature {args.temperature})"
    if args.protocol == "imo":
        verifier = (EndpointSampler(args.verifier_url, args.api_model, args.api_key, args.concurrency)
                    if args.verifier_url else sampler)
        summary = run_proofs(tasks, sampler, verifier, cfg, args.out, args.max_rounds, args.verifications,
                             title=f"IMO protocol: {args.tasks} on {what} ({mode} mode)")
        print(f"IMO: {summary['perfect']} of {summary['problems']} proofs reached a verifier score of 1 "
              f"(mean best score {summary['mean_score']:.3f}); report in {args.out}/report.md")
        return 0
    if args.protocol:
        measure = (lambda s: len(sampler.llm.tokenizer.encode(s))) if args.model else len  # tokens, else chars
        summary = run_contest(tasks, sampler, cfg, args.out, args.protocol, judge, args.submissions, measure,
                              title=f"{args.protocol.upper()} protocol: {title}")
        print(f"IOI score {summary['score']:g} of {summary['max_score']:g}" if args.protocol == "ioi"
              else f"ICPC: {summary['solved']} of {summary['problems']} problems solved")
        print(f"{summary['submitted']} submitted of {summary['candidates']} candidates; report in {args.out}/report.md")
        return 0
    summary = run_eval(tasks, sampler, cfg, args.out, ks, args.grade_timeout, title=title, judge=judge)
    for k, p in summary["pass_at_k"].items():
        print(f"pass@{k} = {p['mean']:.4f} ± {p['stderr']:.4f} over {p['tasks']} tasks")
    print(f"truncated samples: {summary['verdicts']['truncated']} of {summary['samples']}; report in {args.out}/report.md")
    return 0
