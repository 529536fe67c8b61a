"""The `dsv32` command."""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from dsv32 import flags, preflight


class _Bytes:
    """The codec of a model without a tokenizer: raw UTF-8 bytes as ids."""

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(ids: list[int]) -> str:  # ids beyond a byte have no text: show them as [id]
        runs, out = [], []
        for i in list(ids) + [None]:
            if i is not None and i < 256:
                out.append(i)
                continue
            runs.append(bytes(out).decode("utf-8", errors="replace") + (f"[{i}]" if i is not None else ""))
            out = []
        return "".join(runs)


def _load_for_generate(args, device):
    """(model, tokenizer or None, chat by default?, what it is), through `dsv32.load`: --preset
    builds random weights, --model loads a directory or a GGUF, neither is the default model (an
    instruct model: chat)."""
    from dsv32.loader import load
    from dsv32.registry import DEFAULT_NAME

    if args.preset and getattr(args, "fp8_weights", False):
        raise ValueError("--fp8-weights keeps an FP8 checkpoint's weights in FP8: pass --model DIR, not --preset")
    if args.preset:
        print(f"NOTE: --preset {args.preset} builds the model with RANDOM weights on the fly: the text below "
              "is noise. It shows the pipeline (prefill, cached DSA decode, sampling) working.", file=sys.stderr)
        model, _ = load(args.preset, dtype=args.dtype, device=device, seed=args.seed or 0)
        return model, None, False, f"'{args.preset}' preset"
    model, tok = load(args.model, dtype=args.dtype, device=device, fp8_weights=getattr(args, "fp8_weights", False))
    return model, tok, args.model is None, args.model or DEFAULT_NAME


def _preflight(args) -> str:
    """The checks a command makes before any model loads (dsv32.preflight); returns the device."""
    from dsv32.config import PRESETS

    preflight.preset_name(getattr(args, "preset", None), PRESETS)
    preflight.model_source(getattr(args, "model", None), PRESETS)
    return preflight.device(getattr(args, "device", None))


def cmd_generate(args) -> int:
    from dsv32.engine import generate
    from dsv32.tokenizer import Detokenizer

    device = _preflight(args)
    if not args.prompt:
        raise ValueError("the prompt is empty")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = no limit), got {args.top_k}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise ValueError(f"--repetition-penalty must be > 0 (1 = off), got {args.repetition_penalty}")
    t0 = time.perf_counter()
    model, tok, chat, what = _load_for_generate(args, device)
    chat = (chat or args.chat) and not args.raw
    # chat: a whole answer, sampled as SmolLM2's authors suggest (greedy decoding loops); else a
    # greedy glimpse of the text
    limit = args.max_new_tokens or (256 if chat else 48)
    temperature = args.temperature if args.temperature is not None else (0.2 if chat else 0.0)
    top_p = args.top_p if args.top_p is not None else (0.9 if chat else 1.0)
    # a small model's chat answers loop without a repetition penalty (SmolLM2's do)
    penalty = args.repetition_penalty if args.repetition_penalty is not None else (1.1 if chat else 1.0)
    cfg = model.cfg
    if chat:
        if tok is None or tok.chat_format is None:
            print("error: --chat needs a model whose tokenizer has a chat format", file=sys.stderr)
            return 2
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], thinking_mode="chat")
    else:
        prompt = (tok or _Bytes).encode(args.prompt)
    stop = tuple(tok.stop_ids) if tok else ()
    if max(prompt, default=0) >= cfg.vocab_size:
        print(f"error: the prompt has token ids beyond the model's vocab_size {cfg.vocab_size}", file=sys.stderr)
        return 2
    if len(prompt) >= cfg.max_position_embeddings:  # before the prompt is echoed
        print(f"error: the prompt has {len(prompt)} tokens, which leaves no room in the model's context of "
              f"{cfg.max_position_embeddings} tokens", file=sys.stderr)
        return 2
    experts = f"{cfg.n_routed_experts} experts, " if getattr(cfg, "n_routed_experts", 0) else ""
    k = cfg.index_topk
    attn = "dense attention" if args.dense or k >= cfg.max_position_embeddings else f"DSA top-{k}"
    if attn.startswith("DSA") and len(prompt) + limit <= k:
        attn += f" (every key is selected while the context is under {k} tokens)"
    print(f"model: {what}, {cfg.num_hidden_layers} layers, dim {cfg.hidden_size}, {experts}{attn}; loaded in "
          f"{time.perf_counter() - t0:.1f}s on {device}; prompt {len(prompt)} tokens"
          f"{' (chat template)' if chat else ''}",
          file=sys.stderr)
    t0, out, detok = time.perf_counter(), [], Detokenizer(tok or _Bytes)
    if not chat:
        sys.stdout.write(args.prompt)
    for t in generate(model, prompt, limit, temperature, top_p, args.top_k,
                      args.seed, stop_ids=stop or (cfg.eos_token_id,), sparse=not args.dense,
                      repetition_penalty=penalty):
        out.append(t)
        if t in stop:  # the end of the reply is not part of its text
            break
        sys.stdout.write(detok.feed([t]))  # incomplete UTF-8 characters are held back
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    print(f"\n[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def _passthrough(name: str, argv: list[str]) -> int:
    """Commands whose flags their own module parses."""
    if name == "serve":
        from dsv32.server import serve

        return serve(argv)
    if name == "chat":
        from dsv32.server import chat

        return chat(argv)
    if name == "corpus":
        from dsv32.agent.corpus import main as corpus_main

        return corpus_main(argv)
    if name == "eval":
        from dsv32.eval.cli import main as eval_main

        spec = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                     if (a == "--tasks" and i + 1 < len(argv)) or a.startswith("--tasks=")), "")
        index = "environments.jsonl"  # what `dsv32 synth general` writes
        if spec and (Path(spec).name == index or (Path(spec).is_dir() and (Path(spec) / index).is_file())):
            from dsv32.synth.env_eval import (
                main as environments_main,  # their tools and verifiers live in synth
            )

            return environments_main(argv)
        return eval_main(argv)
    if name == "convert":
        from dsv32.registry import CONVERT, resolve

        resolve(CONVERT)(argv)
        return 0
    if name == "agent":
        from dsv32.agent.cli import main as agent_main

        return agent_main(argv)
    if name == "synth":
        from dsv32.synth.cli import main as synth_main

        return synth_main(argv)
    from dsv32.tokenizer import main as tokenizer_main

    tokenizer_main(argv)
    return 0


PASSTHROUGH = {"serve": "OpenAI-compatible HTTP server: dsv32 serve [--model DIR] [--port ...]",
               "chat": "chat with a model in the terminal: dsv32 chat [--model DIR] [--thinking]",
               "tokenizer": "tokenizer tools: dsv32 tokenizer train --files ... --vocab-size N --out DIR",
               "corpus": "local documents for the agent's browser: dsv32 corpus build --out DIR [--from stdlib|DIR|F.jsonl]",
               "agent": "run a task with tools: dsv32 agent \"TASK\" --model DIR|--base-url URL [--tools python,bash,search]",
               "eval": "pass@k on tasks: dsv32 eval --tasks F.jsonl|rg:NAME[:N] --model SRC|--base-url URL "
                       "-n 16 -k 1,4,16 [--thinking] --out DIR",
               "synth": "synthesize agentic tasks: dsv32 synth code|general|search ... (dsv32 synth KIND --help)",
               "convert": "import a model not born with DSA from a GGUF file: dsv32 convert FILE.gguf --out DIR "
                          "(adds fresh indexers; --help names the packaged ones)"}


def _run_flags(cls, args, skip=()) -> dict:
    """The config values of a train / rl command (--config FILE, then flags), checked before any
    model loads."""
    from dsv32.config import PRESETS

    values = flags.config_values(cls, args, skip)
    preflight.preset_name(values.get("preset"), PRESETS)
    preflight.model_source(values.get("model"), PRESETS)
    if values.get("device") is not None:
        preflight.device(values["device"])
    return values


def cmd_train(args) -> int:
    import logging

    from dsv32.train import TrainConfig, run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = TrainConfig(stage=args.stage, **_run_flags(TrainConfig, args, skip=("stage",)))
    if cfg.stage == "dsa-warmup" and cfg.model is None:
        print(f"warning: dsa-warmup without --model trains the indexers of a RANDOM '{cfg.preset}' model: "
              "pass --model DIR (a pretrained checkpoint) to teach its indexers", file=sys.stderr)
    out = run(cfg, resume=_resume(args))
    if out is not None:
        print(f"model written to {out}", file=sys.stderr)
    return 0


def _resume(args) -> str:
    return "overwrite" if args.overwrite else "no" if args.no_resume else "auto"


def cmd_rl(args) -> int:
    import logging

    from dsv32.rl import RLConfig, run
    from dsv32.rl.rollout import tool_env
    from dsv32.synth.rl_env import EnvironmentRunner, environment_tasks

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    values = _run_flags(RLConfig, args)
    cfg = RLConfig(**values)
    tasks, env = [], tool_env
    if args.environments:  # synthesized environments: their tasks, run by their tools and verifiers
        tasks = environment_tasks(args.environments)
        if "domains" not in values:
            cfg = replace(cfg, domains=sorted({t.domain for t in tasks}))
        env = EnvironmentRunner(Path(cfg.out) / "sandboxes", unsafe_no_sandbox=args.unsafe_no_sandbox)
    try:
        out = run(cfg, tasks, env, resume=_resume(args))
    finally:
        if isinstance(env, EnvironmentRunner):
            env.close()
    print(f"policy written to {out}; metrics in {out.parent / 'metrics.jsonl'}", file=sys.stderr)
    return 0


def _add_resume_flags(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="delete OUT's checkpoint and metrics and start "
                       "fresh (default: resume from OUT/checkpoint, refusing a changed config)")
    group.add_argument("--no-resume", action="store_true", help="start fresh, leaving OUT's checkpoint until "
                       "the first new one replaces it")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error told in one line (the usage itself is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from dsv32.registry import DEFAULT_NAME

    p = _Parser(
        prog="dsv32", description="DeepSeek-V3.2 in readable PyTorch: generate, chat, serve, train, RL.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"""\
A model (--model) is a directory in the Hugging Face layout (config.json, *.safetensors,
tokenizer.json), a .gguf file, or a preset name (tiny, small, deepseek-v3.2: RANDOM weights).
Without --model, generate / chat / serve run {DEFAULT_NAME} on the CPU or GPU.

examples:
  dsv32 generate "What is sparse attention?"        answer with the default model
  dsv32 chat --model DIR --thinking                  a V3.2 checkpoint in thinking mode
  dsv32 serve                                        OpenAI API + web chat at http://127.0.0.1:8000/
  dsv32 train pretrain --tokenizer TOK --data FILES  then dsa-warmup, dsa-sparse (DeepSeek's stages)
  dsv32 rl --preset tiny --steps 2                   GRPO with V3.2's stabilisers, on a CPU
Each command's own --help lists its options.""")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (contiguous cache, DSA decode)")
    g.add_argument("prompt", help="the text to answer (chat template) or to continue (--raw / a preset)")
    g.add_argument("--model", help="a model directory (config.json, *.safetensors, tokenizer.json), a .gguf "
                   f"file, or a preset name; default: {DEFAULT_NAME} (trained DSA indexers)")
    g.add_argument("--preset", default=None, help="build this preset (e.g. tiny) with RANDOM weights instead")
    chat = g.add_mutually_exclusive_group()
    chat.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template "
                      "(the default for the default model)")
    chat.add_argument("--raw", action="store_true", help="plain completion of the prompt, no chat template")
    g.add_argument("--max-new-tokens", type=preflight.positive_int, default=None, help="default: 256 with the chat template, else 48")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: 0.2 with the chat "
                   "template, else 0")
    g.add_argument("--top-p", type=float, default=None, help="default: 0.9 with the chat template, else 1")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="CTRL's penalty on tokens already in the context (1 = off); default: 1.1 with the chat "
                        "template, else 1")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only; "
                   "0 = no limit (default: 0)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler (and of a preset's random "
                   "weights); default: none, a fresh draw each run")
    g.add_argument("--dense", action="store_true", help="dense attention instead of DSA")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's torch_dtype, else bfloat16 on CUDA and float32 on CPU")
    g.add_argument("--fp8-weights", action="store_true", help="with --model an FP8 checkpoint: keep its weights "
                   "e4m3 and multiply in FP8 (act_quant + FP8 GEMM) instead of dequantising them at load")
    g.set_defaults(func=cmd_generate)

    from dsv32.train.trainer import STAGES, TrainConfig

    tr = sub.add_parser("train", help="pretrain, SFT, or DeepSeek's DSA stages (dsa-warmup, dsa-sparse)")
    tr.add_argument("stage", choices=STAGES, help="pretrain or sft (dense by default, --attention dsa), "
                    "dsa-warmup (DeepSeek's stage 1: indexers only, on a pretrained --model), dsa-sparse (stage 2)")
    flags.add_flags(tr, TrainConfig, skip=("stage",))
    _add_resume_flags(tr)
    tr.set_defaults(func=cmd_train)

    from dsv32.rl import RLConfig

    rl = sub.add_parser("rl", help="GRPO with the V3.2 stabilisers; `dsv32 rl --preset tiny --steps 2` runs on a CPU")
    flags.add_flags(rl, RLConfig)
    _add_resume_flags(rl)
    rl.add_argument("--environments", metavar="DIR", help="train on the environments `dsv32 synth general` wrote in "
                    "DIR (or DIR/environments.jsonl); --domains defaults to their categories")
    rl.add_argument("--unsafe-no-sandbox", action="store_true",
                    help="--environments: run model-written environments' code without bubblewrap (trusted code only)")
    rl.set_defaults(func=cmd_rl)

    for name, text in PASSTHROUGH.items():  # listed for --help; main() dispatches them
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in PASSTHROUGH:
            return _passthrough(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, OSError, ModuleNotFoundError) as e:  # config, checkpoint, files, ports, extras
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a long job says where it stopped (dsv32.train.Interrupted)
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
