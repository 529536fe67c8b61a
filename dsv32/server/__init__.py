"""The OpenAI-compatible HTTP server (`dsv32 serve`) and the terminal chat (`dsv32 chat`).

Heavy imports happen inside the functions, so `import dsv32.server` needs neither FastAPI nor torch.
"""

import argparse
from pathlib import Path


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--dtype", default="auto", help="auto = the checkpoint's torch_dtype; or bfloat16, float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks; default: sized from memory")


def load_engine(args):
    """(Engine, Tokenizer) for the parsed engine arguments."""
    import torch

    from dsv32.checkpoint import load_model
    from dsv32.config import ModelConfig
    from dsv32.engine import Engine, EngineConfig
    from dsv32.tokenizer import Tokenizer

    model_dir = Path(args.model)
    if not (model_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json, which serving needs")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = ModelConfig.load(model_dir).torch_dtype if args.dtype == "auto" else args.dtype
    tokenizer = Tokenizer.from_file(model_dir)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, kv_cache_dtype=args.kv_cache_dtype,
                          max_model_len=args.max_model_len, num_blocks=args.num_blocks)
    if _distributed(args):  # under torchrun: this rank's shard, one cache size for all ranks
        from dsv32.parallel import init_distributed, make_parallel
        from dsv32.parallel.engine import distributed_engine
        from dsv32.parallel.load import load_sharded

        device = init_distributed(args.device)
        par = make_parallel(args.tp, args.ep)
        model = load_sharded(model_dir, par, getattr(torch, dtype), device, fp8=args.fp8_weights)
        return distributed_engine(model, config, tokenizer), tokenizer
    model = load_model(model_dir, dtype=getattr(torch, dtype), device=device)
    return Engine(model, config, tokenizer), tokenizer


def _distributed(args) -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or getattr(args, "tp", 1) > 1 or getattr(args, "ep", 1) > 1


def serve(argv: list[str] | None = None) -> int:
    """`dsv32 serve --model DIR [--host H --port P ...]`; on N GPUs:
    `torchrun --nproc-per-node N -m dsv32.cli serve --model DIR --tp N --ep N`."""
    p = argparse.ArgumentParser(prog="dsv32 serve", description="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="default: the model directory's name")
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
    name = args.served_model_name or Path(args.model).resolve().name
    uvicorn.run(create_app(engine, tokenizer, name, args.max_queue), host=args.host, port=args.port)
    if _distributed(args):
        engine.model.stop()
        dist.destroy_process_group()
    return 0


def chat(argv: list[str] | None = None) -> int:
    """`dsv32 chat --model DIR [--thinking]`."""
    from dsv32.server.terminal import main

    return main(argv)
