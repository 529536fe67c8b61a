"""Speculative decoding with the MTP module: acceptance rate by draft position, and decode
tokens per second with and without drafting, at temperature 0 and 1.

    python bench/speculative.py --train-steps 600 --out runs/spec          # one GPU, < 5 minutes
    python bench/speculative.py --model path/to/model_dir --out runs/spec  # a model directory
    python bench/speculative.py --train-steps 3 --tiny --out /tmp/spec     # CPU smoke run
    python bench/speculative.py --train-steps 4000 --train-budget-s 110 --modes graphs --out runs/spec

With --train-steps N the model is the small MoE of experiments/dsa_parity_moe.py (its config, its
stdlib data split, its training stage, MTP loss on), pretrained N steps from scratch (a tokenizer
trained first); --tiny shrinks it to seconds on a CPU. The prompts are windows of held-out stdlib
sources. Each setting runs one engine over all prompts, after a warm-up on the same engine as long
as the timed run whose requests end one step apart (so Triton compiles and autotunes at every
context length, and every CUDA-graph bucket a shrinking batch uses is captured, before the clock
starts); tokens/s = generated tokens / wall time
of the timed run. Plain and speculative decoding (k drafts) are timed eagerly and, on CUDA, with
CUDA graphs (--modes picks); each row's speed-up is against plain decoding in the same mode, and
greedy output is compared with that of plain decoding in the same mode. Writes
speculative-<device>.json and .md under --out.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

# the repository root instead of bench/ itself, whose profile.py would shadow the standard library's
# (torch's optimizer imports cProfile, which imports profile)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.loader import load, save
from dsv32.model import Transformer
from dsv32.tokenizer import train_tokenizer
from dsv32.train.data import PackedData
from experiments.dsa_parity_moe import model_config, run_stage, stage_config, stdlib_split


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def read(files):
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def trained_model(args, work: Path):
    """The small MoE of dsa_parity_moe pretrained args.train_steps steps with the MTP loss on (or a
    tiny one for a CPU smoke run) -> (model in eval mode, held-out PackedData)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    train_files, held_files = stdlib_split()
    train_files, held_files = train_files[:args.train_files], held_files[:args.train_files // 4]
    if args.tiny:
        train_files, held_files = train_files[:40], held_files[:10]
    tok = train_tokenizer(train_files[::3], args.vocab, work / "tokenizer")
    train = PackedData.from_documents(read(train_files), tok, args.seq_len, seed=0)
    held = PackedData.from_documents(read(held_files), tok, args.prompt_len + 1, seed=1)
    cfg = model_config(tok.vocab_size, tok).replace(index_topk=args.index_topk)
    if args.tiny:
        cfg = cfg.replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32,
                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                          n_group=2, topk_group=1, index_n_heads=2, index_head_dim=16)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    hist, _, secs = run_stage(model, train, stage_config("pretrain", args.train_steps, 1e-3, work / "pretrain",
                                                      seq_len=args.seq_len, batch_size=args.batch_size, device=dev,
                                                      warmup=min(20, args.train_steps), index_topk=args.index_topk,
                                                      attention="dense"), budget_s=args.train_budget_s)
    last = hist[-1] if hist else {}
    info = {"train_steps": len(hist), "train_seconds": round(secs, 1), "final_lm_loss": last.get("lm"),
            "final_mtp_loss": last.get("mtp"), "params": sum(p.numel() for p in model.parameters())}
    if dev == "cuda":
        model = model.to(torch.bfloat16)
    if args.save_model:  # for a later run with --model (e.g. timings on an otherwise idle GPU)
        save(model, Path(args.save_model), tokenizer=tok)
        (Path(args.save_model) / "training.json").write_text(json.dumps(info, indent=1))
    return model.eval(), held, info


def prompts(held: PackedData, n: int, length: int) -> list[list[int]]:
    x, _ = held.batch(0, n)
    return [row[:length].tolist() for row in x]


def run(model, ps, params, config: EngineConfig) -> dict:
    """One engine over the prompts, after a warm-up on it: generated tokens, seconds, acceptance by
    draft position."""
    eng = Engine(model, config)
    # the warm-up runs as long as the timed run, its requests ending one step apart: every context
    # length and every shrinking batch size is met before the clock starts, so nothing a longer
    # context meets first (a kernel tuned per length, say) is paid inside the timed run
    for i, p in enumerate(ps):
        eng.add_request(p, replace(params, max_tokens=max(2, params.max_tokens - i)))
    while eng.has_work():
        eng.step()
    r = eng.runner
    r.verified, r.accepted = 0, [0] * r.k
    seqs = [eng.add_request(p, params) for p in ps]
    sync()
    t0 = time.perf_counter()
    steps = 0
    while eng.has_work():
        eng.step()
        steps += 1
    sync()
    secs = time.perf_counter() - t0
    n = sum(len(eng.output(s).token_ids) for s in seqs)
    return {"tokens": n, "seconds": round(secs, 4), "tokens_per_s": round(n / secs, 1), "steps": steps,
            "tokens_per_step_per_seq": round(n / max(1, steps) / len(ps), 3),
            "acceptance_by_position": [round(a / r.verified, 4) for a in r.accepted] if r.verified else [],
            "outputs": [eng.output(s).token_ids for s in seqs]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory (or any dsv32.load source) with an MTP module")
    src.add_argument("--train-steps", type=int, help="pretrain dsa_parity_moe's small MoE this many steps")
    ap.add_argument("--tiny", action="store_true", help="with --train-steps: a tiny model (CPU smoke run)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-model", help="with --train-steps: write the trained model here (a --model directory)")
    ap.add_argument("--train-only", action="store_true", help="with --save-model: stop after training")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2], help="speculative_tokens to measure")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="concurrent requests")
    ap.add_argument("--modes", nargs="+", choices=["eager", "graphs"], default=["eager", "graphs"],
                    help="decode eagerly and/or with CUDA graphs (graphs: on CUDA only)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512, help="training window")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch")
    ap.add_argument("--train-budget-s", type=float, default=150)
    ap.add_argument("--train-files", type=int, default=600, help="stdlib files to train on (tokenising them all "
                    "takes longer than the steps need)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--index-topk", type=int, default=256)
    args = ap.parse_args()
    if args.tiny:
        args.vocab, args.prompt_len, args.new_tokens, args.seq_len, args.batch_size = 512, 16, 12, 64, 4
        args.batch = [min(b, 4) for b in args.batch]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    modes = [m == "graphs" for m in args.modes if m == "eager" or cuda]  # cuda_graphs of each mode
    if not modes:
        raise SystemExit("--modes graphs needs CUDA")
    with tempfile.TemporaryDirectory() as work:
        if args.model:
            model, tok = load(args.model)
            held_files = stdlib_split()[1]
            held = PackedData.from_documents(read(held_files), tok, args.prompt_len + 1, seed=1)
            info = {"model": Path(args.model).name}
            if (Path(args.model) / "training.json").exists():
                info.update(json.loads((Path(args.model) / "training.json").read_text()))
        else:
            model, held, info = trained_model(args, Path(work))
            if args.train_only:
                return
    if not len(model.mtp):
        raise SystemExit("the model has no MTP module (num_nextn_predict_layers = 0): nothing drafts")
    rows = []
    base = EngineConfig(max_num_seqs=max(args.batch), prefill_chunk=512, prefix_caching=False,
                        max_model_len=args.prompt_len + args.new_tokens + 8)
    settings = [(name + ("+graphs" if graphs else ""), k, graphs) for graphs in modes
                for name, k in [("plain", 0)] + [(f"mtp k={k}", k) for k in args.k]]
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, max_tokens=args.new_tokens, ignore_eos=True, seed=None)
        for b in args.batch:
            ps = prompts(held, b, args.prompt_len)
            greedy_plain = {}
            for name, k, graphs in settings:
                config = replace(base, speculative_tokens=k, cuda_graphs=graphs)
                torch.manual_seed(0)
                r = run(model, ps, params, config)
                if temperature == 0.0 and k == 0:
                    greedy_plain[graphs] = r["outputs"]
                same = r["outputs"] == greedy_plain[graphs] if temperature == 0.0 else None
                del r["outputs"]
                rows.append({"setting": name, "k": k, "cuda_graphs": graphs, "temperature": temperature,
                             "batch": b, "greedy_equal_to_plain": same, **r})
                print(rows[-1], flush=True)
    plain = {(r["temperature"], r["batch"], r["cuda_graphs"]): r["tokens_per_s"] for r in rows if r["k"] == 0}
    for r in rows:
        r["speedup_vs_plain_same_mode"] = round(r["tokens_per_s"] / plain[(r["temperature"], r["batch"],
                                                                            r["cuda_graphs"])], 3)
    result = {"device": device, "dtype": str(next(model.parameters()).dtype), **info,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}
    stem = "speculative-" + device.replace(" ", "_")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Speculative decoding with the MTP module on {device}", "",
             "`python bench/speculative.py " + " ".join(sys.argv[1:]) + "`", "",
             "Model: " + ", ".join(f"{k}={v}" for k, v in info.items()) +
             f"; prompts of {args.prompt_len} held-out tokens, {args.new_tokens} new tokens each.", "",
             ("| setting | T | batch | tokens/s | speed-up vs plain (same mode) | tokens/step/seq | "
              "acceptance by draft position | greedy = plain (same mode) |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['temperature']} | {r['batch']} | {r['tokens_per_s']} | "
                     f"{r['speedup_vs_plain_same_mode']} | {r['tokens_per_step_per_seq']} | "
                     f"{', '.join(str(a) for a in r['acceptance_by_position']) or '-'} | "
                     f"{'-' if r['greedy_equal_to_plain'] is None else r['greedy_equal_to_plain']} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
