"""Per-op cases for bench/kernels.py. Each module defines `cases(quick: bool) -> list[dict]`, one
row per (kernel, shape, implementation), all measured in the same process on the same GPU:

    {"kernel": "sparse_mla_decode", "shape": "b=64 s_q=2 s_k=131072 topk=2048",
     "impl": "ours" | "torch" | "flashmla" | "torch.topk" | "copy" | ..., "us": float,
     "tflops": float | None, "tbps": float | None}

Peers that are not installed are skipped with a row whose "us" is None and "note" says why.
"""

import torch


def time_us(fn, warmup: int = 25, rep: int = 100, graph: bool = True) -> float:
    """Median GPU time of fn() in microseconds: CUDA events with the L2 flushed (triton's
    do_bench). With `graph`, fn is captured once in a CUDA graph and the replays are timed, as an
    engine runs its decode steps: Python launch overhead (tens of µs for a Triton launch) is then
    excluded for every implementation alike. Where capture fails (host syncs), fn runs eagerly."""
    from triton.testing import do_bench
    fn()  # autotune and compile before any capture
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                fn()
            return 1e3 * do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median")
        except Exception:  # noqa: BLE001 - not capturable: time it eagerly
            torch.cuda.synchronize()
    return 1e3 * do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_tbps() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second, in TB/s."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = time_us(lambda: y.copy_(x))
    return 2 * x.numel() / us / 1e6


def kernel_times(fn, reps: int = 20) -> dict[str, float]:
    """µs per call of fn spent in each GPU kernel it launches (torch.profiler's CUDA activity):
    device time only, without the host's launch overhead."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / reps for e in prof.key_averages() if e.device_time_total > 0}
