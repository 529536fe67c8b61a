"""Scoring a long-context sample from a model's next-token logits, and the perfect-recall oracle
the scorers are checked against.

A "model" here is any function (ids [1, S], rows) -> logits [len(rows), V] at the given positions,
so the oracle, a reference model and our model under each attention variant are scored the same.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F

from dsv32.eval.longctx.tasks import Sample

RETRIEVAL = ("needle", "multikey")


def position_buckets(length: int, first: int = 256) -> list[tuple[int, int]]:
    """Position buckets [a, b) doubling from `first`: [0, 256), [256, 512), [512, 1024), ..."""
    edges, b = [0], first
    while b < length:
        edges.append(b)
        b *= 2
    edges.append(length)
    return list(pairwise(edges))


def score_sample(sample: Sample, model_fn) -> dict:
    """The sample's metrics from model_fn's logits at the positions before its targets.

    nll: mean NLL of the target tokens; acc: the share whose greedy prediction is right; for the
    retrieval tasks, correct: 1.0 when every answer token is (greedy decoding would write the
    answer); for the copy tasks, ref_nll: the same NLL over the first copy; for ppl, nll_by_pos:
    mean NLL per position bucket."""
    scored = sample.targets + sample.ref
    rows = [t - 1 for t in scored]
    x = torch.tensor(sample.ids)[None]                                    # [1, S]
    logits = model_fn(x, rows).float()                                    # [R, V]
    want = x[0, scored]                                                   # [R]
    nll = -F.log_softmax(logits, -1).gather(-1, want[:, None])[:, 0]      # [R]
    hit = logits.argmax(-1) == want
    n = len(sample.targets)
    out = {"nll": nll[:n].mean().item(), "acc": hit[:n].float().mean().item()}
    if sample.task in RETRIEVAL:
        out["correct"] = float(hit[:n].all())
    if sample.ref:
        out["ref_nll"] = nll[n:].mean().item()
    if sample.task == "ppl":
        pos = torch.tensor(sample.targets)
        out["nll_by_pos"] = {f"{a}-{b}": nll[:n][(pos >= a) & (pos < b)].mean().item()
                             for a, b in position_buckets(len(sample.ids)) if ((pos >= a) & (pos < b)).any()}
    return out


def recall_predictions(ids: list[int], rows: list[int], visible=None, max_match: int = 256) -> list[int | None]:
    """A perfect-recall reader (induction by longest match): at position i, among earlier
    positions j with ids[j] == ids[i], take the one whose preceding tokens agree with those
    before i for the longest stretch (the earliest on a tie) and predict ids[j + 1]. visible:
    None (everything) or a function i -> the set of key positions i may copy from (its attention
    budget); j + 1 must be among them. -> the prediction at each row, None where nothing matches."""
    where: dict[int, list[int]] = {}
    for j, t in enumerate(ids):
        where.setdefault(t, []).append(j)
    out = []
    for i in rows:
        keys = visible(i) if visible is not None else None
        best, best_len = None, 0
        for j in where[ids[i]]:
            if j >= i:
                break
            if keys is not None and j + 1 not in keys:
                continue
            m = 1
            while m < max_match and j - m >= 0 and ids[j - m] == ids[i - m]:
                m += 1
            if m > best_len:
                best, best_len = j, m
        out.append(ids[best + 1] if best is not None else None)
    return out


def oracle_model(vocab_size: int, visible=None):
    """recall_predictions as a model_fn: log-odds of 30 on the prediction, uniform where none."""
    def model_fn(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(rows), vocab_size)                       # [R, V]
        for r, p in enumerate(recall_predictions(x[0].tolist(), rows, visible)):
            if p is not None:
                logits[r, p] = 30.0
        return logits
    return model_fn


def uniform_nll(vocab_size: int) -> float:
    """The NLL of a reader that knows nothing: log V."""
    return math.log(vocab_size)
