"""Fixtures for the sandboxed tools: sandboxes under one root, and a host-side view of processes."""

import os
import shutil

import pytest

from dsv32.agent.sandbox import Limits, Sandbox, SandboxError

BWRAP = shutil.which("bwrap")


@pytest.fixture
def make_sandbox(tmp_path):
    """make_sandbox(name, **limits) -> a Sandbox under one root per test; skips without bubblewrap."""
    if BWRAP is None:
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap (CI installs it)")
    try:  # a machine that forbids the namespaces bwrap needs (a non-root runner under AppArmor) cannot sandbox
        Sandbox(tmp_path / "probe", "probe").remove()
    except SandboxError as e:
        pytest.skip(f"bubblewrap cannot start a sandbox here: {e}")
    made = []

    def make(name: str = "task", **limits) -> Sandbox:
        made.append(Sandbox(tmp_path / "root", name, limits=Limits(**limits)))
        return made[-1]

    yield make
    for sandbox in made:
        sandbox.remove()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the host's live processes that contain `text`: the oracle for "nothing was
    left running" (a fork copies its parent's command line, so a marker argument tags a whole tree)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{entry}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] in "ZX"
            except OSError:
                continue
            if text in cmdline and not zombie:
                found.append(cmdline)
    return found


@pytest.fixture
def mentioning():
    return processes_mentioning
