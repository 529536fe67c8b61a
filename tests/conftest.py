import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on now (a fixed one collides with parallel test runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun():
    """torchrun(n, script, *args, port=...) runs a test worker script on n CPU processes (gloo).

    One thread per rank, and Python stacks dumped on a crash. A launch where a rank died of a
    signal (torch's gloo transport segfaults now and then on a loaded 2-core machine: once in
    ~500 CI launches, never reproduced in 30 local ones) is run once more, with a warning; a
    rank that fails by exception fails the test at once."""

    def launch(n, script, args, port):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                               "--master-port", str(port), str(script), *map(str, args)],
                              capture_output=True, text=True, timeout=300, env=env)

    def run(n: int, script, *args, port: int | None = None) -> subprocess.CompletedProcess:
        r = launch(n, script, args, port or free_port())
        if r.returncode != 0 and re.search(r"exitcode\s*:\s*-(11|6) ", r.stderr):  # SIGSEGV, SIGABRT
            warnings.warn(f"a rank of {Path(script).name} died of a signal; launching it once more:\n{r.stderr[-1500:]}")
            r = launch(n, script, args, free_port())
        return r

    return run


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
