"""The OpenAI-compatible HTTP server (`dsv32 serve`) and the terminal chat (`dsv32 chat`).

Heavy imports happen inside the functions, so `import dsv32.server` needs neither FastAPI nor torch.
"""

import argparse
import os
from pathlib import Path

from dsv32 import preflight
from dsv32.registry import DEFAULT_NAME


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a model directory (config.json, *.safetensors, tokenizer.json) "
                   f"or a .gguf file; default: {DEFAULT_NAME} (trained DSA indexers)")
    p.add_argument("--dtype", default="auto", help="auto = the checkpoint's torch_dtype (else bfloat16 on "
                   "CUDA, float32 on CPU); or bfloat16, float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks; default: sized from memory")
    p.add_argument("--fp8-weights", action="store_true", help="an FP8 checkpoint's weights stay e4m3 and multiply "
                   "in FP8 (act_quant + FP8 GEMM; grouped for the routed experts), on one GPU or with --tp/--ep; "
                   "default: dequantised to --dtype at load")
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="draft this many tokens per decode step with the model's MTP module (0: off)")


def load_engine(args):
    """(Engine, tokenizer) for the parsed engine arguments, the model loaded by `dsv32.load`;
    under torchrun with --tp / --ep, this rank's shard and one cache size for all ranks."""
    from dsv32.config import PRESETS
    from dsv32.engine import Engine, EngineConfig
    from dsv32.loader import load

    preflight.model_source(args.model, PRESETS)  # before anything loads
    device = preflight.device(args.device)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, kv_cache_dtype=args.kv_cache_dtype,
                          max_model_len=args.max_model_len, num_blocks=args.num_blocks,
                          speculative_tokens=args.speculative_tokens)
    model_dir = Path(args.model or "")
    if (model_dir / "config.json").is_file() and not (model_dir / "tokenizer.json").is_file():  # before the weights load
        raise FileNotFoundError(f"{args.model} has no tokenizer.json, which serving needs")
    parallel = None
    if _distributed(args):
        if args.model is None:
            raise ValueError("--tp / --ep serve a checkpoint directory: pass --model DIR")
        from dsv32.parallel import init_distributed, make_parallel

        device = init_distributed(args.device)
        parallel = make_parallel(args.tp, args.ep)
    model, tokenizer = load(args.model, dtype=args.dtype, device=device, parallel=parallel,
                            fp8_weights=getattr(args, "fp8_weights", False))
    if tokenizer is None:
        raise ValueError(f"{args.model} is a model without a tokenizer (a preset?): serving needs one")
    if parallel is not None:
        from dsv32.parallel.engine import distributed_engine

        return distributed_engine(model, config), tokenizer
    return Engine(model, config), tokenizer


def _distributed(args) -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or getattr(args, "tp", 1) > 1 or getattr(args, "ep", 1) > 1


def model_name(args) -> str:
    """The id /v1/models reports: --served-model-name, else --model as given (as vLLM does: a run's
    `runs/s2/model` stays told apart from another's `runs/s1/model`), else the default model's."""
    return args.served_model_name or (str(args.model).rstrip("/") if args.model else DEFAULT_NAME)


def serve(argv: list[str] | None = None) -> int:
    """`dsv32 serve [--model DIR] [--host H --port P ...]`; without --model, SmolLM2-DSA; on N GPUs:
    `torchrun --nproc-per-node N -m dsv32.cli serve --model DIR --tp N --ep N`."""
    p = argparse.ArgumentParser(prog="dsv32 serve", description="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help=f"the model id clients send and /v1/models reports; default: --model as given, or {DEFAULT_NAME}")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which to answer 503")
    p.add_argument("--max-n", type=int, default=8, help="the largest n (choices per request) accepted (default 8)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and "
                   "/detokenize (default: the DSV32_API_KEY environment variable, else no key)")
    p.add_argument("--allowed-origins", default="", help="CORS: comma-separated origins a browser page may call "
                   "the API from, or * for any (default: none)")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20,
                   help="larger request bodies are refused with 413 (default 16 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="after SIGTERM, seconds in-flight "
                   "requests may still run before they end with an error (default 30)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (1 or all; run under torchrun)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (1 or all; run under torchrun)")
    p.add_argument("--agent-tools", default="", help="comma-separated, from python, bash, search: run the agent's "
                   "tools for the web page (POST /v1/agent/tools/NAME), one sandbox per conversation; off by default")
    p.add_argument("--corpus", help="the search tools' corpus directory (dsv32 corpus build --out DIR)")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="with --agent-tools: run python and bash "
                   "WITHOUT isolation, as you, with the network and your files (trusted users only)")
    p.add_argument("--agent-tools-idle", type=float, default=1800.0,
                   help="seconds after which an idle conversation's tools are closed (default 1800)")
    p.add_argument("--agent-tools-max", type=int, default=16, help="live tool conversations at most (default 16)")
    args = p.parse_args(argv)
    if not _distributed(args) or int(os.environ.get("RANK", "0")) == 0:  # only rank 0 listens
        preflight.port_free(args.host, args.port)  # before the model loads, not after
    tools = None
    if args.agent_tools:
        import tempfile

        from dsv32.agent.cli import ToolSetupError, check_tools

        names = [n.strip() for n in args.agent_tools.split(",") if n.strip()]
        try:  # before the model loads: no bubblewrap, no code tools unless --unsafe-no-sandbox
            with tempfile.TemporaryDirectory(prefix="dsv32-serve-") as tmp:
                corpus = check_tools(names, args.corpus, Path(tmp), args.unsafe_no_sandbox)
        except ToolSetupError as e:
            p.error(str(e))
        from dsv32.server.tools import AgentTools

        tools = AgentTools(names, corpus, unsafe=args.unsafe_no_sandbox, idle_s=args.agent_tools_idle,
                           max_conversations=args.agent_tools_max)

    import logging

    from dsv32.server.app import create_app
    from dsv32.server.config import ServerConfig
    from dsv32.server.shutdown import GracefulServer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine, tokenizer = load_engine(args)
    if _distributed(args):
        import torch.distributed as dist

        from dsv32.parallel.engine import follow

        if dist.get_rank() > 0:  # followers run the forwards rank 0 broadcasts
            follow(engine)
            dist.destroy_process_group()
            return 0
    config = ServerConfig(max_queue=args.max_queue, max_n=args.max_n,
                          api_key=args.api_key or os.environ.get("DSV32_API_KEY") or None,
                          allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
                          max_request_bytes=args.max_request_bytes, shutdown_timeout=args.shutdown_timeout)
    app = create_app(engine, tokenizer, model_name(args), agent_tools=tools, config=config)
    GracefulServer(app, args.host, args.port, config.shutdown_timeout, app.state.server.runner).run()
    if _distributed(args):
        engine.runner.stop()
        dist.destroy_process_group()
    return 0


def chat(argv: list[str] | None = None) -> int:
    """`dsv32 chat [--model DIR] [--thinking]`; without --model, SmolLM2-DSA."""
    from dsv32.server.terminal import main

    return main(argv)
