"""Where the engine's numbers and the trainer's part: a module-by-module bisect of a rollout.

Runs requests through an Engine (its forwards: prefill chunks, then batched decodes) and the
trainer's replay forward over the finished sequences (`replay_logprobs`, as the RL trainer calls
it), with a forward hook on every module, and compares each module's output row at each
(sequence, position) bit for bit. For each sampled position, the first module in the order the
forward runs them whose output differs is where the two paths start to reduce differently; what
follows it differs because it does. The report counts, per module, the positions it is the first
to differ at (every fed position, prompt included: a prompt position's keys feed later ones),
the earliest difference of each request, and the share of sampled tokens whose log-prob is
bit-equal.

    python -m dsv32.rl.bisect [--batch-invariant] [--dtype bfloat16] [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.engine.runner import ModelRunner
from dsv32.model import Transformer
from dsv32.rl.agreement import bitwise_agreement, kept_sizes
from dsv32.rl.rollout import new_trajectory, pack, replay_logprobs
from dsv32.rl.tasks import Task


@dataclass
class Recorder:
    """Module outputs by (module name, request id, position), and the order modules first ran in.
    `rows`/`positions` say which request and position each row of the running forward is."""
    outputs: dict = field(default_factory=dict)
    order: list = field(default_factory=list)
    rows: list = field(default_factory=list)         # request id of each row
    positions: list = field(default_factory=list)    # [B][S] position of each token

    def hook(self, name: str):
        def record(module, inputs, output):
            o = _first_tensor(output)
            b, s = len(self.positions), len(self.positions[0]) if self.positions else 0
            if o is None or not o.is_floating_point() or not b:
                return
            if tuple(o.shape[:2]) != (b, s):
                if o.shape[0] != b * s:
                    return
                o = o.reshape(b, s, *o.shape[1:])
            if name not in self.outputs:
                self.outputs[name] = {}
                self.order.append(name)
            for i, rid in enumerate(self.rows):
                for j, p in enumerate(self.positions[i]):
                    self.outputs[name][(rid, p)] = o[i, j].detach().clone()
        return record


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    return getattr(output, "out", None)   # MLA's AttnOut


class RecordingRunner(ModelRunner):
    """A ModelRunner that tells its Recorder which request each row of a forward is."""
    recorder: Recorder | None = None

    def prepare(self, plan):
        forwards = super().prepare(plan)
        self._rows = {id(b): [s.request_id for s in seqs] for seqs, b in forwards}
        return forwards

    def forward(self, batch):
        self.recorder.rows = self._rows[id(batch)]
        self.recorder.positions = batch.positions.tolist()
        return super().forward(batch)


def bisect(model: Transformer, prompts: list[list[int]], params: SamplingParams, config: EngineConfig) -> dict:
    """Run the prompts through an engine with `config` and replay them as the RL trainer does (with
    config.batch_invariant's arithmetic); compare module outputs and log-probs bit for bit."""
    engine_rec, replay_rec = Recorder(), Recorder()
    hooks = []
    RecordingRunner.recorder = engine_rec
    eng = Engine(model, config, runner_class=RecordingRunner)
    for name, m in model.named_modules():
        if name:
            hooks.append(m.register_forward_hook(engine_rec.hook(name)))
    try:
        seqs = [eng.add_request(p, params) for p in prompts]
        while eng.has_work():
            eng.step()
        outs = [eng.output(s) for s in seqs]
        for h in hooks:
            h.remove()
        hooks = [m.register_forward_hook(replay_rec.hook(name)) for name, m in model.named_modules() if name]
        trajs = []
        for p, o in zip(prompts, outs):
            t = new_trajectory(Task("bisect", []), p)
            t.add_sampled(o)
            trajs.append(t)
        batch = pack(trajs, 0, model.embed_tokens.weight.device)
        s = batch.inputs.shape[1]
        replay_rec.rows = [o.request_id for o in outs]
        replay_rec.positions = [list(range(s))] * len(outs)
        with torch.enable_grad():  # the trainer's policy forward (experts one at a time, autograd on)
            lp = replay_logprobs(model, batch, params.temperature, batch_invariant=config.batch_invariant).detach()
    finally:
        for h in hooks:
            h.remove()
    first, per_request = Counter(), []
    for i, o in enumerate(outs):
        earliest = None
        for pos in range(len(o.prompt_token_ids) + len(o.token_ids) - 1):   # every fed position
            diff = _first_difference(engine_rec, replay_rec, o.request_id, pos)
            if diff is not None:
                first[diff[0]] += 1
                earliest = earliest or {"request": i, "position": pos, "module": diff[0], "max_abs_diff": diff[1]}
        per_request.append(earliest)
    got, want = [], []
    for i, o in enumerate(outs):
        p0 = len(o.prompt_token_ids)
        for j, w in enumerate(o.logprobs):  # the token sampled from position p0 - 1 + j's logits
            got.append(lp[i, p0 - 1 + j].float().cpu())
            want.append(w)
    # the sampled tokens in row-major order, as the batch's kept sets are
    agree = bitwise_agreement(torch.stack(got), torch.tensor(want, dtype=torch.float32), kept_sizes(batch.keep).cpu())
    n = agree["sampled_tokens"]
    return {"bit_equal_share_multi": agree["bit_equal_share_multi"], "multi_candidate_tokens": agree["multi_candidate_tokens"],
            "sampled_tokens": n, "bit_equal_logprobs": round(agree["bit_equal_share"] * n),
            "bit_equal_share": agree["bit_equal_share"], "mean_abs_diff_multi": agree["mean_abs_diff_multi"],
            "first_differing_module": dict(first.most_common()), "first_difference_per_request": per_request,
            "batch_invariant": config.batch_invariant}


def _first_difference(a: Recorder, b: Recorder, rid: str, pos: int) -> tuple[str, float] | None:
    """The first module (in b's order) whose output at (rid, pos) differs between a and b, with
    the largest absolute difference there; None when all compared outputs are bit-equal."""
    for name in b.order:
        x, y = a.outputs.get(name, {}).get((rid, pos)), b.outputs[name].get((rid, pos))
        if x is not None and y is not None and x.shape == y.shape and not torch.equal(x, y):
            return name, float((x.float() - y.float()).abs().max())
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-invariant", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--out", default=None, help="write bisect.json here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = Transformer(preset("tiny").replace(index_topk=8)).to(args.device, getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 20, 37, 12, 50, 9)[:args.prompts]]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=args.tokens, seed=1, ignore_eos=True,
                            return_rl_data=True)
    report = bisect(model, prompts, params, EngineConfig(num_blocks=32, block_size=16,
                                                         batch_invariant=args.batch_invariant))
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bisect.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
