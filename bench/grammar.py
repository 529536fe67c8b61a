"""What constrained decoding costs: engine decode tokens/s with and without a grammar, at batch 1
and 32, on the model's real vocabulary.

    python -P bench/grammar.py --out bench/results                    # SmolLM2-DSA, CUDA if present
    python -P bench/grammar.py --model DIR --tokens 32 --out /tmp/g   # any dsv32.load source
    python -P bench/grammar.py --small-random --out bench/results     # 2 random layers, SmolLM2's vocabulary

Each run decodes `--tokens` tokens for B copies of one chat prompt. With a grammar the reply is a
JSON array of at least 64 records (`response_format` json_schema through dsv32.chat.grammar), which
cannot end within --tokens, so both runs decode the same number of tokens; without one, EOS is
ignored. The masks' own cost per step (filled on the host, applied on the device) is measured
apart, without a model, from B matchers walking the grammar. The grammar's compile time is reported apart; the matchers are made at admission and
their masks filled on the host each step (dsv32.engine.grammar), so their cost is in the tokens/s.
--small-random runs a 2-layer random LlamaDSA over SmolLM2's real 49,152-token vocabulary: the model's
time shrinks and the grammar's does not, so its overhead is an upper bound (what a CPU can measure).
Each configuration runs --repeat times, interleaved, after a warm-up, and keeps the fastest. Writes grammar-<device>.json
and .md under --out. (`-P`: bench/profile.py must not shadow the standard library's profile.)
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.engine.grammar import Grammar, GrammarVocab, fill_masks
from dsv32.engine.sampler import apply_grammar
from dsv32.llama.gguf import read_metadata, smollm2_gguf, tokenizer_from_metadata
from dsv32.llama.model import LlamaConfig, LlamaDSA
from dsv32.llama.tokenizer import PlainTokenizer
from dsv32.loader import load

RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"}}}
SCHEMA = {"type": "array", "minItems": 64, "items": RECORD}
ASK = [{"role": "user", "content": "List 64 people as JSON records with name, age and email."}]


def small_random(device, tokenizer: str | None = None):
    """(a 2-layer random LlamaDSA, SmolLM2's ChatML tokenizer): the real vocabulary, a tiny model.
    tokenizer: SmolLM2's tokenizer.json, saved from the GGUF (for a machine without the GGUF)."""
    if tokenizer:
        hf = Tokenizer.from_file(tokenizer)
    else:
        from gguf import GGUFReader  # the smollm2 extra

        hf = tokenizer_from_metadata(read_metadata(GGUFReader(str(smollm2_gguf()))))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=hf.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      index_n_heads=2, index_head_dim=32, index_topk=16, bos_token_id=1, eos_token_id=2)
    return LlamaDSA(cfg).to(device).eval(), PlainTokenizer(hf, cfg.bos_token_id, cfg.eos_token_id)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(engine: Engine, prompt: list[int], params: SamplingParams, batch: int) -> tuple[float, int, float]:
    """(seconds, tokens, CPU seconds of this process) for `batch` copies of prompt decoded to
    params.max_tokens. On a shared CPU the CPU seconds are the steadier measure of the work."""
    sync(engine.device)
    t0, c0 = time.perf_counter(), time.process_time()
    seqs = [engine.add_request(prompt, params) for _ in range(batch)]
    while engine.has_work():
        engine.step()
    sync(engine.device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(engine.output(s).token_ids) for s in seqs)
    if any(engine.output(s).finish_reason != "length" for s in seqs):
        raise RuntimeError("a sequence ended before max_tokens: the comparison would be unequal")
    return dt, tokens, cpu


def mask_cost(grammar: Grammar, vocab_size: int, batch: int, device, executor, steps: int = 32) -> dict:
    """The grammar's own share of a step, without a model: median ms to fill `batch` rows' masks on
    the host, and to apply them to [batch, V] logits on the device (sampler.apply_grammar)."""
    gen = torch.Generator().manual_seed(0)
    matchers = [grammar.matcher() for _ in range(batch)]
    logits = torch.randn(batch, vocab_size, device=device)
    fill, apply = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        masks = fill_masks(matchers, vocab_size, executor)
        t1 = time.perf_counter()
        _, allowed = apply_grammar(logits, masks)
        sync(device)
        t2 = time.perf_counter()
        fill.append(t1 - t0)
        apply.append(t2 - t1)
        for m, row in zip(matchers, allowed.cpu()):
            ids = row.nonzero().flatten()
            m.advance(int(ids[torch.randint(len(ids), (1,), generator=gen)]))
    return {"fill_ms": 1e3 * statistics.median(fill), "apply_ms": 1e3 * statistics.median(apply)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a dsv32.load source (default: SmolLM2-DSA)")
    ap.add_argument("--small-random", action="store_true", help="2 random layers over SmolLM2's vocabulary")
    ap.add_argument("--tokenizer", default=None,
                    help="with --small-random: SmolLM2's tokenizer.json instead of the one in its GGUF")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration; the fastest is kept")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = small_random(device, args.tokenizer) if args.small_random else load(args.model, device=str(device))
    engine = Engine(model, EngineConfig(max_num_seqs=max(args.batches), cuda_graphs=args.cuda_graphs,
                                        max_model_len=512))
    prompt = tok.apply_chat_template(ASK, thinking_mode="chat")
    t0 = time.perf_counter()
    vocab = GrammarVocab(tok.tok.to_str(), list(tok.stop_ids), engine.vocab_size)
    vocab_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = Grammar.compile(tok.reply_grammar(response_format={
        "type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}), vocab)
    compile_s = time.perf_counter() - t0
    free = SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=0)
    constrained = SamplingParams(temperature=1.0, max_tokens=args.tokens, grammar=grammar, seed=0)
    decode(engine, prompt, SamplingParams(max_tokens=4, ignore_eos=True), 1)  # warm-up
    rows = []
    for b in args.batches:
        row, runs = {"batch": b}, {"free": [], "grammar": []}
        for _ in range(args.repeat):  # interleaved: a load that comes and goes hits both alike
            for name, params in (("free", free), ("grammar", constrained)):
                runs[name].append(decode(engine, prompt, params, b))
        for name, timed in runs.items():
            dt, tokens, _ = min(timed)
            row[f"{name}_tok_s"] = tokens / dt
            row[f"{name}_tok_per_cpu_s"] = tokens / min(cpu for _, _, cpu in timed)
        row["overhead_pct"] = 100 * (row["free_tok_s"] / row["grammar_tok_s"] - 1)
        row["cpu_overhead_pct"] = 100 * (row["free_tok_per_cpu_s"] / row["grammar_tok_per_cpu_s"] - 1)
        row.update(mask_cost(grammar, engine.vocab_size, b, engine.device, engine.runner.mask_executor))
        rows.append(row)
        print(row, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    model_name = "2 random layers, SmolLM2's vocabulary" if args.small_random else args.model or "SmolLM2-DSA"
    result = {"device": name, "model": model_name, "vocab_size": engine.vocab_size,
              "tokens": args.tokens, "cuda_graphs": args.cuda_graphs, "vocab_build_s": vocab_s,
              "grammar_compile_s": compile_s, "torch_threads": torch.get_num_threads(),
              "load_avg": os.getloadavg()[0], "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "grammar-" + ("".join(c if c.isalnum() else "_" for c in name) if device.type == "cuda" else "cpu")
    stem += "-small-random" if args.small_random else ""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Constrained decoding cost on {name}", "",
             (f"Model {result['model']}, vocabulary {engine.vocab_size}, {args.tokens} decoded tokens per sequence, "
              f"temperature 1.0; grammar: a JSON array of >= 64 records (`bench/grammar.py`). "
              f"Vocabulary build {vocab_s:.2f} s (once per server), grammar compile {1e3 * compile_s:.0f} ms. "
              f"Host load average at the end: {result['load_avg']:.1f} ({os.cpu_count()} CPUs)."), "",
             ("| batch | free tok/s | grammar tok/s | overhead | free tok/CPU-s | grammar tok/CPU-s | CPU overhead "
              "| masks filled (ms/step) | masks applied (ms/step) |"), "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['free_tok_s']:.1f} | {r['grammar_tok_s']:.1f} | {r['overhead_pct']:+.1f}% | "
              f"{r['free_tok_per_cpu_s']:.1f} | {r['grammar_tok_per_cpu_s']:.1f} | {r['cpu_overhead_pct']:+.1f}% "
              f"| {r['fill_ms']:.2f} | {r['apply_ms']:.2f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
