"""The `dsv32` command."""

import argparse
import sys
import time


def _text_codec(model_dir, model):
    """(encode, decode, stop ids): the model's tokenizer.json, else raw UTF-8 bytes as ids."""
    from pathlib import Path

    if model_dir and (Path(model_dir) / "tokenizer.json").exists():
        from dsv32.model.llama import LlamaDSA
        from dsv32.tokenizer import PlainTokenizer, Tokenizer

        if isinstance(model, LlamaDSA):  # no V3.2 chat tokens in its vocabulary
            tok = PlainTokenizer.from_file(model_dir, model.cfg.bos_token_id, model.cfg.eos_token_id)
        else:
            tok = Tokenizer.from_file(model_dir)
        return tok.encode, tok.decode, (tok.eos_id,)
    def decode_bytes(ids):  # ids beyond a byte have no text: show them as [id]
        runs, out = [], []
        for i in ids + [None]:
            if i is not None and i < 256:
                out.append(i)
                continue
            runs.append(bytes(out).decode("utf-8", errors="replace") + (f"[{i}]" if i is not None else ""))
            out = []
        return "".join(runs)

    return (lambda s: list(s.encode("utf-8"))), decode_bytes, ()


def cmd_generate(args) -> int:
    import torch

    from dsv32.engine import generate

    dtype = getattr(torch, args.dtype)
    if args.model:
        from dsv32 import load_model

        print(f"loading {args.model} ...", file=sys.stderr)
        model = load_model(args.model, dtype=dtype, device=args.device)
    else:
        from dsv32.config import preset
        from dsv32.model import Transformer

        print(f"NOTE: no --model given. dsv32 ships no trained model yet, so this runs the '{args.preset}' "
              "preset with RANDOM weights built on the fly: the text below is noise. It shows the "
              "pipeline (prefill, cached DSA decode, sampling) working; pass --model DIR for a real "
              "checkpoint.", file=sys.stderr)
        torch.manual_seed(args.seed or 0)
        with torch.device(args.device):
            model = Transformer(preset(args.preset)).to(dtype).eval()
    encode, decode, stop = _text_codec(args.model, model)
    prompt = encode(args.prompt)
    cfg = model.cfg
    if max(prompt, default=0) >= cfg.vocab_size:
        print(f"error: the prompt has token ids beyond the model's vocab_size {cfg.vocab_size}", file=sys.stderr)
        return 2
    experts = f"{cfg.n_routed_experts} experts, " if getattr(cfg, "n_routed_experts", 0) else ""
    print(f"model: {cfg.num_hidden_layers} layers, dim {cfg.hidden_size}, {experts}"
          f"DSA top-{cfg.index_topk}{' (off: dense)' if args.dense else ''}; prompt {len(prompt)} tokens",
          file=sys.stderr)
    t0, out = time.perf_counter(), []
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    printed = ""
    for tok in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                        args.seed, stop_ids=stop or (cfg.eos_token_id,), sparse=not args.dense):
        out.append(tok)
        text = decode(out)
        if not text.endswith("\ufffd"):  # hold back incomplete UTF-8 sequences
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
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
    if name == "convert":
        from dsv32.gguf_import import main as convert_main

        convert_main(argv)
        return 0
    from dsv32.tokenizer import main as tokenizer_main

    tokenizer_main(argv)
    return 0


PASSTHROUGH = {"serve": "OpenAI-compatible HTTP server: dsv32 serve --model DIR [--port ...]",
               "chat": "chat with a model in the terminal: dsv32 chat --model DIR [--thinking]",
               "tokenizer": "tokenizer tools: dsv32 tokenizer train --files ... --vocab-size N --out DIR",
               "convert": "import a model not born with DSA: dsv32 convert smollm2 --out DIR (adds indexers)"}


def cmd_train(args) -> int:
    import dataclasses
    import logging

    from dsv32.train import TrainConfig, run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(stage=args.stage, **{k: v for k, v in vars(args).items()
                                           if k in fields and k != "stage" and v is not None})
    out = run(cfg)
    if out is not None:
        print(f"model written to {out}", file=sys.stderr)
    return 0


def cmd_rl(args) -> int:
    import dataclasses
    import logging

    from dsv32.rl import RLConfig, run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fields = {f.name for f in dataclasses.fields(RLConfig)}
    out = run(RLConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))
    print(f"policy written to {out}; metrics in {out.parent / 'metrics.jsonl'}", file=sys.stderr)
    return 0


def _add_dataclass_flags(parser, cls, skip=()):
    """One --flag per dataclass field (lists take several values, bools are switches)."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind.startswith("list"):
            parser.add_argument(flag, dest=f.name, nargs="+")
        elif kind == "bool":  # --flag / --no-flag
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = int if "int" in kind else float if "float" in kind else str
            parser.add_argument(flag, dest=f.name, type=typ)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32", description="DeepSeek-V3.2 in readable PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (contiguous cache, DSA decode)")
    g.add_argument("prompt")
    g.add_argument("--model", help="Hugging Face-format model directory (config.json + safetensors)")
    g.add_argument("--preset", default="tiny", help="random-weight preset used when --model is not given")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dense", action="store_true", help="dense attention instead of DSA")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.set_defaults(func=cmd_generate)

    from dsv32.train.trainer import STAGES, TrainConfig

    tr = sub.add_parser("train", help="pretrain, SFT, or DeepSeek's DSA stages (dsa-warmup, dsa-sparse)")
    tr.add_argument("stage", choices=STAGES)
    _add_dataclass_flags(tr, TrainConfig, skip=("stage",))
    tr.set_defaults(func=cmd_train)

    from dsv32.rl import RLConfig

    rl = sub.add_parser("rl", help="GRPO with the V3.2 stabilisers; `dsv32 rl --preset tiny --steps 2` runs on a CPU")
    _add_dataclass_flags(rl, RLConfig)
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
    except (ValueError, FileNotFoundError) as e:  # config, checkpoint and context errors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
