"""Which grammar library: the per-token cost of a JSON-schema token mask on the CPU, for the
candidates that install (llguidance, xgrammar, outlines-core).

    python bench/grammar_libs.py --tokenizer path/to/tokenizer.json --out bench/results

Each library compiles one JSON schema for the tokenizer's vocabulary, then walks a valid instance
token by token: compute the packed vocabulary bitmask, consume the token. The numbers are the
compile time and the mean / p50 / p99 of mask + consume per token. A library that is not
installed is reported as such. This picked the library of `dsv32.engine.grammar` (docs/server.md).
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "email", "tags", "address", "active"]}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
            "tags": ["mathematics", "poetry", "engines", "notes on the analytical engine"],
            "address": {"city": "London", "zip": "W1"}, "active": True}


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (a vocabulary entry's characters -> its bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok: Tokenizer) -> list[bytes]:
    dec, vocab = byte_decoder(), tok.get_vocab(with_added_tokens=True)
    out = [b""] * tok.get_vocab_size()
    for s, i in vocab.items():
        out[i] = bytes(dec[c] for c in s) if all(c in dec for c in s) else s.encode()
    return out


def walk(mask_and_consume, ids: list[int]) -> list[float]:
    times = []
    for t in ids:
        t0 = time.perf_counter()
        mask_and_consume(t)
        times.append(time.perf_counter() - t0)
    return times


def run_llguidance(tok: Tokenizer, eos: int, ids: list[int]):
    import llguidance

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)
    m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t0
    mask = torch.full((1, (lt.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def step(t):
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        assert m.consume_token(t), m.get_error()
    return compile_s, walk(step, ids), m.is_accepting()


def run_xgrammar(tok: Tokenizer, eos: int, ids: list[int]):
    import xgrammar as xgr

    t0 = time.perf_counter()
    vocab = tok.get_vocab(with_added_tokens=True)
    encoded = [""] * tok.get_vocab_size()
    for s, i in vocab.items():
        encoded[i] = s
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def step(t):
        m.fill_next_token_bitmask(mask)
        assert m.accept_token(t)
    return compile_s, walk(step, ids), m.is_terminated() or m.accept_token(eos)


def run_outlines(tok: Tokenizer, eos: int, ids: list[int]):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import (
        allocate_token_bitmask,
        fill_next_token_bitmask,
    )

    t0 = time.perf_counter()
    table: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes(tok)):
        if i != eos and b:
            table.setdefault(b, []).append(i)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(eos, table))
    g = Guide(index)
    compile_s = time.perf_counter() - t0
    mask = allocate_token_bitmask(tok.get_vocab_size())

    def step(t):
        fill_next_token_bitmask(g, mask)
        g.advance(t)
    return compile_s, walk(step, ids), g.is_finished() or eos in g.get_tokens()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a tokenizer.json (byte-level BPE)")
    ap.add_argument("--eos", default="<|im_end|>", help="the end token's text")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tok = Tokenizer.from_file(args.tokenizer)
    eos = tok.token_to_id(args.eos)
    ids = tok.encode(json.dumps(INSTANCE), add_special_tokens=False).ids
    rows = []
    for name, fn in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar), ("outlines-core", run_outlines)):
        try:
            compiles, times = [], []
            for _ in range(args.repeat):
                c, t, ok = fn(tok, eos, ids)
                assert ok, f"{name}: the instance does not complete the grammar"
                compiles.append(c)
                times += t
        except ImportError as e:
            rows.append({"library": name, "error": f"not installed ({e})"})
            continue
        q = statistics.quantiles(times, n=100)
        rows.append({"library": name, "compile_ms": 1e3 * statistics.median(compiles),
                     "mask_us_mean": 1e6 * statistics.mean(times), "mask_us_p50": 1e6 * q[49],
                     "mask_us_p99": 1e6 * q[98]})
    result = {"device": platform.processor() or platform.machine(), "vocab_size": tok.get_vocab_size(),
              "tokens_per_walk": len(ids), "repeat": args.repeat, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grammar-libs-cpu.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Grammar libraries: JSON-schema mask + consume per token (CPU, one thread, vocab {result['vocab_size']})",
             "", "| library | compile ms | mean us | p50 us | p99 us |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['library']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['library']} | {r['compile_ms']:.1f} | {r['mask_us_mean']:.1f} | "
                         f"{r['mask_us_p50']:.1f} | {r['mask_us_p99']:.1f} |")
    (out / "grammar-libs-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
