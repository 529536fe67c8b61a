"""Sandbox: one task's private work directory, and commands run inside bubblewrap with limits.

The code tools (python, bash) run model-written code, so each task gets (spec §5, "Code agent" and
"Code interpreter": real environments, a Jupyter notebook and coding tools):

- a **fresh network namespace** (`--unshare-net`): only its own loopback, no route anywhere
  (`network=True` keeps the host's, for an install step the user allows to download); and fresh
  pid, ipc, uts (and, where the kernel allows, cgroup) namespaces;
- a **read-only view of the system**: /usr, /etc, /bin, /lib* and the Python install (the prefixes
  of `sys.executable`), nothing else of the host: no home directories, no other checkouts;
- a fresh /tmp and /dev/shm (tmpfs of bounded size), a minimal /dev and a /proc of its own;
- its **work directory as the only writable bind** (plus, for the Python kernel, a directory for
  its IPC sockets, and any `rw_paths` the caller names, e.g. a virtualenv being built), at the
  same path as outside, so that paths mean the same on both sides. The
  sandbox root is covered by an empty read-only tmpfs first, so other tasks' directories under
  the same root are invisible. The task directory around `work` belongs to the caller: connection
  files and logs the caller writes there cannot be swapped for symlinks from inside;
- `--die-with-parent` and `--new-session` (no TIOCSTI into the caller's terminal);
- rlimits set inside, before the command starts: CPU seconds, address space, processes, file size,
  open files.

RLIMIT_NPROC is not enforced for uid 0, and a user namespace that maps its uid to root outside
does not change that (the kernel checks the real user). So when the caller is root, bubblewrap
keeps only CAP_SETUID/CAP_SETGID, and a small launcher inside drops to an unprivileged uid of this
sandbox's own (random, high, so no other process counts against its process limit) before it
applies the limits and runs the command. A fork bomb then stops at `Limits.processes`. Without
root, bubblewrap makes a user namespace and the limit counts the processes of that namespace.

Where bubblewrap is missing or cannot start a sandbox, the constructor refuses, naming the cause,
unless the caller passes `unsafe_no_sandbox=True` (the CLI's `--unsafe-no-sandbox`), for machines
where the code is trusted or bwrap cannot run (some containers forbid namespaces). Then commands
run as the caller, in the work directory, with the same timeouts, output caps and rlimits (but
the process limit, which would count all of the caller's processes), and see the network and the
whole file system; `isolated` is False and the tools say so.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dsv32.agent.output import CappedOutput


class SandboxError(RuntimeError):
    """The sandbox cannot be set up: bubblewrap is missing or cannot create namespaces."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for every process started in a sandbox (setrlimit, soft = hard)."""

    cpu_seconds: int = 3600            # per process; a backstop: the tools' wall-clock timeouts come first
    memory_bytes: int = 4 << 30        # address space (RLIMIT_AS): a 10 GB allocation fails with MemoryError
    processes: int = 256               # processes and threads of the sandbox's uid: a fork bomb stops here
    file_size_bytes: int = 1 << 30     # largest file a process may write
    open_files: int = 1024
    tmp_bytes: int = 512 << 20         # size of the tmpfs at /tmp and of the one at /dev/shm
    threads: int = 4                   # OMP/OpenBLAS/MKL thread pools, so numpy stays inside `processes`


@dataclass
class RunResult:
    output: str            # stdout and stderr interleaved, capped with a marker
    exit_code: int | None  # None when the command was killed at the timeout
    timed_out: bool
    seconds: float


# Runs inside the sandbox before the command: set the limits, drop to the sandbox's uid (when
# started as root), exec. Python because the sandbox has it whatever else it lacks.
LAUNCHER = """\
import json, os, resource, sys
spec = json.loads(sys.argv[1])
for name, value in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if os.geteuid() == 0 and spec["uid"] != 0:
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
os.umask(0o022)
os.execvp(sys.argv[2], sys.argv[2:])
"""

SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def process_tree(pid: int) -> dict[int, int]:
    """`pid` and the processes descending from it, each with its number of threads (from /proc)."""
    parent, threads = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid ... num_threads (field 20)
            parent[int(entry)], threads[int(entry)] = int(fields[1]), int(fields[17])
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in threads and p not in tree:
            tree[p] = threads[p]
            todo += [c for c, pp in parent.items() if pp == p]
    return tree


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


class Sandbox:
    """A task's directory `dir` (its `work` subdirectory is where commands run) and the means to
    run commands in it: `command()` builds the argv, `popen()` starts one, `run()` runs one to
    completion with a timeout and an output cap, `kill()` ends one with all it started."""

    def __init__(self, root: str | os.PathLike, name: str = "task", *, limits: Limits = Limits(),
                 bwrap: str = "bwrap", unsafe_no_sandbox: bool = False, ro_paths: tuple[str, ...] = (),
                 rw_paths: tuple[str, ...] = (), network: bool = False):
        self.root = Path(root).resolve()
        self.limits = limits
        self.isolated = not unsafe_no_sandbox
        self.ro_paths = tuple(ro_paths)
        self.rw_paths = tuple(str(Path(p).resolve()) for p in rw_paths)  # bound writable in every command
        self.network = network  # keep the host's network (an install step that may download; off by default)
        self.bwrap = None
        if self.isolated:
            self.bwrap = shutil.which(bwrap)
            if self.bwrap is None:
                raise SandboxError(f"bubblewrap ({bwrap!r}) was not found, so model-written code cannot be isolated; "
                                   "install it (apt-get install bubblewrap) or, for trusted code only, pass "
                                   "unsafe_no_sandbox=True (--unsafe-no-sandbox)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))  # the caller's, mode 0700
        # as root: a uid of our own, so the process limit counts this task's processes only
        own_uid = os.geteuid() == 0 and self.isolated
        self.uid = self.gid = (1 << 20) + secrets.randbelow(1 << 30) if own_uid else os.getuid()
        self.work = self.subdir("work")
        self._procs: set[subprocess.Popen] = set()
        if self.isolated:
            self._probe()

    def subdir(self, name: str) -> Path:
        """A new directory in the task directory, writable by the sandbox's uid (bind it to use it)."""
        path = self.dir / name
        path.mkdir()
        return self.own(path)

    def own(self, path: Path) -> Path:
        """Hand a file or directory we made to the sandbox's uid (when it is not ours)."""
        if self.uid != os.getuid():
            os.chown(path, self.uid, self.gid, follow_symlinks=False)
        return path

    def seal(self, path: Path) -> None:
        """Take a directory back from the sandbox: it can no longer add, rename or remove entries.
        (Without root the sandbox runs as the caller and, owning the directory, could undo this.)"""
        if self.uid != os.getuid():
            os.chown(path, os.getuid(), os.getgid(), follow_symlinks=False)
        os.chmod(path, 0o755 if self.uid != os.getuid() else 0o555)

    def _probe(self) -> None:
        try:
            r = subprocess.run(self.command(["true"]), capture_output=True, text=True, timeout=30, env=self.env())
        except (OSError, subprocess.TimeoutExpired) as e:
            r = subprocess.CompletedProcess([], -1, "", str(e))
        if r.returncode != 0:
            self.remove()
            cause = r.stderr.strip() or f"exit code {r.returncode}"
            raise SandboxError(f"bubblewrap ({self.bwrap}) could not start a sandbox: {cause}; for trusted code "
                               "only, pass unsafe_no_sandbox=True (--unsafe-no-sandbox) to run without isolation")

    # ---- the command line ------------------------------------------------------------------

    def env(self, extra: dict | None = None) -> dict:
        """The environment of a sandboxed command: nothing of the caller's but what is set here."""
        n = str(self.limits.threads)
        bin_dir = os.path.dirname(sys.executable)  # `python` in a shell is the caller's interpreter
        tmp = "/tmp" if self.isolated else str(self.work)
        return {"PATH": f"{bin_dir}:{PATH}", "HOME": str(self.work), "TMPDIR": tmp,
                "LANG": "C.UTF-8", "USER": "sandbox", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": n,
                "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n, **(extra or {})}

    def command(self, argv: list[str], limits: Limits | None = None, *, writable: tuple[Path, ...] = (),
                readable: tuple[Path, ...] = ()) -> list[str]:
        """The argv that runs `argv` in the sandbox (in `work`), or only under the limits if unsafe.
        `writable` and `readable` are more paths of the task directory to bind (at the same path)."""
        limits = limits or self.limits
        spec = {"uid": self.uid, "gid": self.gid, "rlimits": {
            "RLIMIT_CPU": limits.cpu_seconds, "RLIMIT_AS": limits.memory_bytes, "RLIMIT_NPROC": limits.processes,
            "RLIMIT_FSIZE": limits.file_size_bytes, "RLIMIT_NOFILE": limits.open_files}}
        if not self.isolated:  # the caller's uid: the limit would count all of the caller's processes
            del spec["rlimits"]["RLIMIT_NPROC"]
        launch = [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(spec), *argv]
        if not self.isolated:
            return launch
        return [self.bwrap, *self._bwrap_args(limits, writable, readable), "--", *launch]

    def _bwrap_args(self, limits: Limits, writable: tuple[Path, ...], readable: tuple[Path, ...]) -> list[str]:
        args = ([] if self.network else ["--unshare-net"]) + [
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox",
            "--die-with-parent", "--new-session"]
        if os.geteuid() == 0:  # bwrap drops every capability but these; the launcher drops them too
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            args += ["--unshare-user"]
        size = str(limits.tmp_bytes)
        args += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp", "--dev", "/dev",
                 "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm", "--proc", "/proc"]
        made: set[str] = {"/", "/tmp"}

        def parents(path: str) -> list[str]:  # bwrap would create them 0700: unreadable once we drop root
            out = []
            for p in reversed(Path(path).parents):
                if str(p) not in made:
                    made.add(str(p))
                    out += ["--perms", "0755", "--dir", str(p)]
            return out

        bound: list[str] = []
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                args += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                args += ["--ro-bind", d, d]
                bound.append(d)
        python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))), *self.ro_paths}
        for p in sorted(python):
            if os.path.exists(p) and not any(p == b or p.startswith(b + "/") for b in bound):
                args += parents(p) + ["--ro-bind", p, p]
                bound.append(p)
        root = str(self.root)
        args += parents(root) + ["--perms", "0755", "--tmpfs", root]  # hide the other tasks
        made.add(root)
        for path in (self.work, *self.rw_paths, *writable):
            args += parents(str(path)) + ["--bind", str(path), str(path)]
        for path in readable:
            args += parents(str(path)) + ["--ro-bind", str(path), str(path)]
        # bwrap's own root and the root's cover are tmpfs without a size: nothing may write there
        return args + ["--chdir", str(self.work), "--remount-ro", root, "--remount-ro", "/"]

    # ---- running ---------------------------------------------------------------------------

    def popen(self, argv: list[str], *, limits: Limits | None = None, env: dict | None = None,
              writable: tuple[Path, ...] = (), readable: tuple[Path, ...] = (),
              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) -> subprocess.Popen:
        """Start `argv` in the sandbox, in a process group of its own (for `kill`)."""
        proc = subprocess.Popen(self.command(argv, limits, writable=writable, readable=readable),
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                cwd=self.work, env=self.env(env), start_new_session=True)
        self._procs.add(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the process group. Inside bwrap that kills the pid namespace's init, and with it
        every process the command started, detached or not; return once they are all gone. (Without
        the sandbox, a process that left the group, e.g. by setsid, survives.)"""
        inside = process_tree(proc.pid) if self.isolated and proc.returncode is None else {}
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._procs.discard(proc)
        deadline = time.monotonic() + 10
        for pid in inside:  # the namespace's init exits after the last of them
            while not gone(pid) and time.monotonic() < deadline:
                time.sleep(0.01)

    def processes(self, proc: subprocess.Popen) -> int:
        """How many processes and threads `proc` has started in the sandbox (what RLIMIT_NPROC counts)."""
        return sum(n for pid, n in process_tree(proc.pid).items() if pid != proc.pid)

    def run(self, argv: list[str], *, timeout: float, max_output: int, limits: Limits | None = None) -> RunResult:
        """Run to completion or to `timeout` seconds (then kill), stdout+stderr capped at `max_output`."""
        start = time.monotonic()
        proc = self.popen(argv, limits=limits)
        out = CappedOutput(max_output)
        fd = proc.stdout.fileno()
        deadline, timed_out = start + timeout, False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 and not timed_out:
                    timed_out = True
                    self.kill(proc)
                    deadline = time.monotonic() + 2  # what is still in the pipe, unless something holds it open
                    continue
                if left <= 0:
                    break
                ready, _, _ = select.select([fd], [], [], left)
                if ready:
                    data = os.read(fd, 65536)
                    if not data:
                        break
                    out.add_bytes(data)
        finally:
            out.add_bytes(b"", final=True)
            proc.stdout.close()
            if not timed_out:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 1)
                except subprocess.TimeoutExpired:
                    timed_out = True
            if proc.returncode is None or not self.isolated:
                self.kill(proc)  # what it left running (in a sandbox, those died with its pid namespace)
            self._procs.discard(proc)
        return RunResult(out.text(), None if timed_out else proc.returncode, timed_out, time.monotonic() - start)

    # ---- cleanup ---------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what is still running; the directory stays (call `remove` to delete it)."""
        for proc in list(self._procs):
            self.kill(proc)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
