"""Kernels for Hopper, each beside its plain-torch reference, and the dispatcher that picks one.

Every op module (`indexer`, `topk`, `sparse_mla`, `fp8_gemm`) defines `<op>_ref` in plain torch and
a Triton kernel with the same signature. `use_triton(t)` decides which runs: the kernel for CUDA
tensors when Triton imports, the reference elsewhere. Tests and benchmarks override the choice with
`force("ref" | "triton")`; Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors.
"""

import contextlib
import os

_forced: str | None = os.environ.get("DSV32_KERNELS") or None  # "ref" | "triton" | None (auto)


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t) -> bool:
    """Whether ops on tensor `t` run the Triton kernel."""
    if _forced is not None:
        return _forced == "triton"
    return t.is_cuda and has_triton()


@contextlib.contextmanager
def force(backend: str | None):
    """Run the block with `backend` ("ref", "triton", or None for automatic)."""
    global _forced
    if backend not in ("ref", "triton", None):
        raise ValueError(f"unknown kernel backend {backend!r}; expected 'ref', 'triton' or None")
    old, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = old
