"""Fixtures: the hand-written trip database (hand_world) as a file, and a root for sandboxes
(skipped without bubblewrap)."""

import shutil
import sqlite3

import pytest
from hand_world import ROWS

from dsv32.agent.sandbox import Sandbox, SandboxError
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
