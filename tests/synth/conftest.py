"""The calc repository (calc_history.py), mined once, and the options that run its tests (in the
sandbox where bubblewrap can start one)."""

from pathlib import Path

import pytest

from dsv32.agent.sandbox import Sandbox, SandboxError
from dsv32.synth.code_env import RunOptions
from dsv32.synth.code_miner import MineOptions, mine

from calc_history import make_repo

@pytest.fixture(scope="session")
def run_options(tmp_path_factory) -> RunOptions:
    """The sandbox where it starts; otherwise none (the repository is ours, so trusted)."""
    root = tmp_path_factory.mktemp("sandboxes")
    try:
        Sandbox(root, "probe").remove()
        unsafe = False
    except SandboxError:
        unsafe = True
    return RunOptions(timeout=60, memory_gb=4, unsafe_no_sandbox=unsafe, sandbox_root=str(root))


@pytest.fixture(scope="session")
def calc_repo(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("calc") / "calc"
    return path, make_repo(path)


@pytest.fixture(scope="session")
def mine_options(run_options) -> MineOptions:
    return MineOptions(run=run_options)


@pytest.fixture(scope="session")
def mined(calc_repo, mine_options, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The calc repository mined once: the output directory and its decision rows."""
    out = tmp_path_factory.mktemp("mined")
    return out, mine(calc_repo[0], out, options=mine_options)
