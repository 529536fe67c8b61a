"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", Eq. 1).

With n samples of a task of which c are correct, the chance that k of them drawn without
replacement hold at least one correct one is 1 - C(n-c, k) / C(n, k). The binomials overflow a
float long before n reaches the hundreds of samples the V3.2 protocols draw, so the ratio is
computed as the product prod_{i=n-c+1}^{n} (1 - k/i), each factor in [0, 1].

The benchmark score is the mean over tasks; its standard error is the spread of the per-task
values across tasks (sample standard deviation / sqrt(number of tasks)): the uncertainty from which
tasks were asked, given the samples drawn.
"""

import math
from dataclasses import dataclass


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k for one task with c correct samples out of n."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n and n >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per task, but the task has n={n}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass(frozen=True)
class PassK:
    """pass@k over tasks: the mean of the per-task estimates and its standard error."""

    k: int
    mean: float
    stderr: float
    tasks: int


def aggregate(counts: list[tuple[int, int]], k: int) -> PassK:
    """PassK from one (n, c) per task. stderr is 0 for a single task (no spread to measure)."""
    if not counts:
        raise ValueError("pass@k of no tasks")
    values = [pass_at_k(n, c, k) for n, c in counts]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return PassK(k, mean, 0.0, len(values))
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return PassK(k, mean, math.sqrt(var / len(values)), len(values))


def parse_ks(text: str, n: int) -> list[int]:
    """`-k 1,4,16` -> [1, 4, 16], sorted and unique; ValueError naming the problem unless every k
    is an integer with 1 <= k <= n (pass@k needs k of the n samples)."""
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise ValueError(f"-k takes comma-separated integers, got {text!r}") from None
    if ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={text} with n={n}")
    return ks
