"""Fixtures: the hand-written trip database (hand_world) as a file and a root for sandboxes
(skipped without bubblewrap); the calc repository (calc_history.py), mined once, and the options
that run its tests (in the sandbox where bubblewrap can start one)."""

import shutil
import sqlite3
from pathlib import Path

import pytest
from calc_history import make_repo
from hand_world import ROWS

from dsv32.agent.sandbox import Sandbox, SandboxError
from dsv32.synth.cli import main as synth_main
from dsv32.synth.code_env import RunOptions
from dsv32.synth.code_miner import MineOptions, mine
from dsv32.synth.trip_world import SCHEMA


@pytest.fixture
def hand_db(tmp_path):
    path = tmp_path / "hand.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        for table, rows in ROWS.items():
            db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
    db.close()
    return path


@pytest.fixture
def sandbox_root(tmp_path):
    """A root for sandboxes; skips without a working bubblewrap."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    try:
        Sandbox(tmp_path / "probe", "probe").remove()
    except SandboxError as e:
        pytest.skip(f"bubblewrap cannot start a sandbox here: {e}")
    return tmp_path / "boxes"


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


@pytest.fixture
def trip_envs(tmp_path):
    """The three level-1 trip environments env_policies.BEHAVIOUR names, in tmp_path/envs."""
    out = tmp_path / "envs"
    assert synth_main(["general", "--family", "trip", "--n", "3", "--difficulty", "1", "--out", str(out)]) == 0
    return out
