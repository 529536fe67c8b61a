import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def torchrun():
    """torchrun(n, script, *args, port=...) runs tests/parallel/<script> on n CPU processes (gloo)."""

    def run(n: int, script: str, *args, port: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                               "--master-port", str(port), str(Path(__file__).parent / script), *map(str, args)],
                              capture_output=True, text=True, timeout=300, env=env)

    return run
