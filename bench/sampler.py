"""The sampler's cost per decode step with every row seeded (agent and eval runs seed each
request): `dsv32.engine.sampler.sample` (one host uniform per seeded row, one copy to the device,
a batched inverse CDF) against the per-row draw it replaced (`torch.multinomial` with each row's
generator, a few kernel launches a row), both over the same processed distributions.

    python bench/sampler.py --out bench/results                  # CPU, or the GPU where there is one
    python bench/sampler.py --rows 1 32 128 320 --vocab 49159    # the defaults (SmolLM2 with V3.2's tokens)

Writes sampler-<device>.json and .md under --out: milliseconds per step (median of --repeats) by
number of rows, for both draws.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (its profile.py)

from dsv32.engine.sampler import SamplingParams, processed_logprobs, sample, samples


def per_row_draw(logits, params, generators):
    """The sampler before host uniforms: each seeded row draws on its own with torch.multinomial."""
    lp, keep, greedy, truncates = processed_logprobs(logits, params)
    tok = lp.argmax(-1)
    for i, gen in enumerate(generators):
        if not greedy[i]:
            tok[i] = torch.multinomial(lp[i].exp(), 1, generator=gen)[0]
    return samples(lp, tok, keep, params, truncates)


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128, 320])
    p.add_argument("--vocab", type=int, default=49159)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    params = SamplingParams(temperature=1.0, top_p=0.95)
    rows = []
    for b in args.rows:
        logits = 3 * torch.randn(b, args.vocab, generator=torch.Generator().manual_seed(b)).to(device)
        gen_dev = torch.device(device) if device == "cuda" else None
        dev_gens = [torch.Generator(gen_dev).manual_seed(i) if gen_dev else torch.Generator().manual_seed(i)
                    for i in range(b)]
        host_gens = [torch.Generator().manual_seed(i) for i in range(b)]
        for fn in (lambda: sample(logits, [params] * b, host_gens), lambda: per_row_draw(logits, [params] * b, dev_gens)):
            fn()  # warm-up
        new = timed(lambda: sample(logits, [params] * b, host_gens), args.repeats, device)
        old = timed(lambda: per_row_draw(logits, [params] * b, dev_gens), args.repeats, device)
        rows.append({"rows": b, "host_uniforms_ms": round(new, 3), "per_row_multinomial_ms": round(old, 3),
                     "speedup": round(old / new, 2)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sampler-{name.replace(' ', '_')}"
    meta = {"device": name, "vocab": args.vocab, "top_p": 0.95, "repeats": args.repeats, "torch": torch.__version__,
            "command": "python bench/sampler.py " + " ".join(sys.argv[1:])}
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    md = [f"# Seeded sampling per decode step on {name}", "",
          f"Vocabulary {args.vocab}, temperature 1, top-p 0.95, every row seeded; median of {args.repeats} steps. "
          f"`{meta['command']}`", "",
          "| rows | host uniforms + inverse CDF (ms) | per-row multinomial (ms) | speed-up |", "|---|---|---|---|"]
    md += [f"| {r['rows']} | {r['host_uniforms_ms']} | {r['per_row_multinomial_ms']} | {r['speedup']}x |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
