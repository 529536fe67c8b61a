"""The sandbox: each escape attempt is a real one, and the host is checked from outside.

Oracles are the host's own view (files on disk, /proc, a TCP listener of ours), never the
sandbox's report about itself.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dsv32.agent.sandbox import Sandbox, SandboxError


def py(code: str) -> list[str]:
    return ["python", "-c", code]


def test_without_bubblewrap_the_sandbox_refuses_and_names_the_cause(tmp_path):
    with pytest.raises(SandboxError, match=r"bubblewrap \('/nonexistent/bwrap'\) was not found.*apt-get install "
                                           r"bubblewrap.*unsafe_no_sandbox=True \(--unsafe-no-sandbox\)"):
        Sandbox(tmp_path, bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxError, match=r"bubblewrap \(/bin/false\) could not start a sandbox: exit code 1"):
        Sandbox(tmp_path, bwrap="/bin/false")  # present but failing, as where namespaces are forbidden
    assert list(tmp_path.iterdir()) == []  # no task directory left behind


def test_unsafe_no_sandbox_runs_unisolated_but_keeps_timeouts_and_caps(tmp_path):
    box = Sandbox(tmp_path, bwrap="/nonexistent/bwrap", unsafe_no_sandbox=True)
    assert not box.isolated
    r = box.run(["bash", "-c", "pwd; head -c 5000 /dev/zero | tr '\\0' x"], timeout=10, max_output=300)
    dropped = len(f"{box.work}\n") + 5000 - 300
    assert r.output.startswith(f"{box.work}\n") and f"[truncated: {dropped:,} more characters]" in r.output
    r = box.run(["sleep", "30"], timeout=0.5, max_output=300)
    assert r.timed_out and r.exit_code is None and r.seconds < 5


def test_an_infinite_loop_is_killed_at_the_timeout_with_everything_it_started(make_sandbox, mentioning):
    box = make_sandbox()
    marker = "loop-7c1e"
    r = box.run(["bash", "-c", f"python -c 'while True: pass' {marker} & python -c 'while True: pass' {marker}"],
                timeout=2, max_output=1000)
    assert r.timed_out and r.exit_code is None and 2 <= r.seconds < 6
    assert mentioning(marker) == []  # the background one too
    assert box.run(["echo", "next"], timeout=10, max_output=100).output == "next\n"


def test_a_10_gb_allocation_fails_with_memoryerror(make_sandbox):
    box = make_sandbox(memory_bytes=2 << 30)
    r = box.run(py("bytearray(10 * 2**30)"), timeout=20, max_output=2000)
    assert r.exit_code == 1 and r.output.rstrip().endswith("MemoryError")
    assert box.run(py("print(len(bytearray(2**20)))"), timeout=20, max_output=100).output == "1048576\n"


def test_writes_outside_the_work_dir_fail_and_leave_the_host_untouched(make_sandbox):
    box = make_sandbox()
    home, root = Path.home(), box.root
    targets = [Path("/etc/pwned-7c1e"), Path("/usr/pwned-7c1e"), home / "pwned-7c1e", root / "pwned-7c1e",
               Path(sys.prefix) / "pwned-7c1e"]
    script = "; ".join(f"echo x > {t}" for t in targets) + "; echo ok > inside; exit 0"
    r = box.run(["bash", "-c", script], timeout=10, max_output=5000)
    assert r.output.count("Read-only file system") + r.output.count("Permission denied") + \
        r.output.count("No such file or directory") == len(targets), r.output
    assert not any(t.exists() for t in targets)
    assert (box.work / "inside").read_text() == "ok\n"  # the work dir is writable, and is the host's


def test_a_task_cannot_see_another_tasks_files(make_sandbox):
    a, b = make_sandbox("a"), make_sandbox("b")
    a.run(["bash", "-c", "echo secret > notes"], timeout=10, max_output=100)
    assert (a.work / "notes").read_text() == "secret\n"
    r = b.run(["bash", "-c", f"cat {a.work}/notes; ls -A {b.root}"], timeout=10, max_output=1000)
    assert "No such file or directory" in r.output and "secret" not in r.output
    assert r.output.split("\n")[1:] == [b.dir.name, ""]  # the root holds this task's directory only


def test_the_network_is_unreachable_even_the_hosts_loopback(make_sandbox):
    box = make_sandbox()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = ("import socket\n"
            "for addr in [('1.1.1.1', 53), ('127.0.0.1', %d)]:\n"
            "    try: socket.create_connection(addr, timeout=3); print('connected', addr)\n"
            "    except OSError as e: print(type(e).__name__, e.errno)\n") % port
    r = box.run(py(code), timeout=20, max_output=1000)
    assert r.output.splitlines() == ["OSError 101", "ConnectionRefusedError 111"]  # ENETUNREACH; own empty loopback
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing reached us
    listener.close()
    assert subprocess.run(["true"]).returncode == 0


def test_rw_paths_are_writable_inside_and_other_host_folders_are_not_there(make_sandbox, tmp_path):
    make_sandbox()  # skips without bubblewrap
    shared, other = tmp_path / "venv", tmp_path / "elsewhere"
    shared.mkdir()
    other.mkdir()
    box = Sandbox(tmp_path / "root2", "rw", rw_paths=(str(shared),))
    try:
        box.own(shared)
        r = box.run(["sh", "-c", f"echo kept > {shared}/f && ls {other}"], timeout=30, max_output=1000)
        assert (shared / "f").read_text() == "kept\n"          # the host sees the write
        assert r.exit_code != 0 and "No such file" in r.output  # a folder beside it was never bound
    finally:
        box.remove()
