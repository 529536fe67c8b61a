"""Running an environment's code: its tools, its solution and its verifier.

The rule that gives the solution its meaning (spec §5: it "may only call the tools or do logical
computation ... may not read the DB directly") is enforced, not trusted: `run_solution` runs the
solution in a sandbox of its own (`dsv32.agent.sandbox`) that holds no database, and whose only
way out is a Unix socket in its work directory on which the host answers tool calls, counting
them. A solution that opens the database finds no file; one that skips the tools has a count of 0.

The tools can be trusted code run here (`LocalTools`: the programmatic families, ours) or code a
model wrote, run in another sandbox that holds a copy of the database (`SandboxedTools`); the
solution cannot tell them apart. `run_verifier` runs a verifier in a sandbox with a copy of the
database; `local_verify` runs a trusted one here. Without bubblewrap the sandboxes refuse to start
unless `unsafe_no_sandbox`, and then a solution could find the database by its path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dsv32.agent.sandbox import Sandbox
from dsv32.synth.environment import verdict

MARK = "@@dsv32-synth-result@@"

# Inside a sandbox: connect to the host's socket, expose `call`, run solve(call, params), print the result.
SOLVE = r"""
import json, socket, sys
spec = json.loads(sys.argv[1])
sock = socket.socket(socket.AF_UNIX)
sock.connect("call.sock")  # in the work directory, the cwd: a Unix socket's path is short
wire = sock.makefile("rw")
def call(tool, /, **arguments):  # positional-only: a tool may take an argument called `tool` or `name`
    wire.write(json.dumps({"name": tool, "arguments": arguments}) + "\n")
    wire.flush()
    line = wire.readline()
    if not line:
        raise RuntimeError("the tool channel closed")
    return json.loads(line)["result"]
ns = {"__name__": "solution"}
exec(compile(open(spec["code"]).read(), "solution.py", "exec"), ns)
result = ns["solve"](call, spec["params"])
if not isinstance(result, str):
    result = json.dumps(result)
print("\n" + spec["mark"] + json.dumps({"result": result}))
"""

# Inside a sandbox with a copy of the database: verify(result, db, params), printed as JSON.
VERIFY = r"""
import json, sqlite3, sys
spec = json.loads(sys.argv[1])
ns = {"__name__": "verifier"}
exec(compile(open(spec["code"]).read(), "verifier.py", "exec"), ns)
db = sqlite3.connect("file:" + spec["db"] + "?mode=ro", uri=True)
value = ns["verify"](json.load(open(spec["result"]))["result"], db, spec["params"])
print("\n" + spec["mark"] + json.dumps({"value": value}))
"""

# Inside a sandbox with a copy of the database: serve tool calls on a Unix socket, one per line.
SERVE = r"""
import json, os, socket, sqlite3, sys
spec = json.loads(sys.argv[1])
ns = {"__name__": "tools"}
exec(compile(open(spec["code"]).read(), "tools.py", "exec"), ns)
db = sqlite3.connect("file:" + spec["db"] + "?mode=ro", uri=True)
server = socket.socket(socket.AF_UNIX)
server.bind("tools.sock.tmp")  # in the work directory, the cwd: a Unix socket's path is short
os.chmod("tools.sock.tmp", 0o777)
os.rename("tools.sock.tmp", "tools.sock")
server.listen(1)
conn, _ = server.accept()
wire = conn.makefile("rw")
for line in wire:
    req = json.loads(line)
    fn = ns.get(req["name"])
    try:
        out = str(fn(db, **req["arguments"])) if callable(fn) else "error: there is no tool " + repr(req["name"])
    except Exception as e:
        out = "error: " + req["name"] + " failed: " + type(e).__name__ + ": " + str(e)
    wire.write(json.dumps({"result": out}) + "\n")
    wire.flush()
"""


class CodeError(RuntimeError):
    """An environment's code did not run: it crashed, timed out or printed no result."""


def namespace(code: str, filename: str) -> dict:
    """Trusted code's globals after running it here (the programmatic families' files)."""
    ns: dict = {"__name__": filename.removesuffix(".py")}
    exec(compile(code, filename, "exec"), ns)  # noqa: S102 -- trusted: our own families' files
    return ns


def connect_ro(path: str | Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, check_same_thread=False)


@contextmanager
def short_path(directory: Path):
    """A short name for `directory` (/proc/self/fd/N) while it is open: a Unix socket's path has
    at most 107 bytes, and a sandbox's work directory can be longer."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _marked(output: str, what: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise CodeError(f"the {what} printed no result; its output ends:\n{output[-2000:]}")


class LocalTools:
    """Trusted tools code run in this process over a read-only connection."""

    def __init__(self, tools_code: str, db_path: str | Path):
        self.ns = namespace(tools_code, "tools.py")
        self.db = connect_ro(db_path)
        self.lock = threading.Lock()

    def call(self, name: str, arguments: dict) -> str:
        fn = self.ns.get(name)
        if name.startswith("_") or not callable(fn):
            return f"error: there is no tool {name!r}"
        try:
            with self.lock:
                return str(fn(self.db, **arguments))
        except Exception as e:  # noqa: BLE001 -- a tool's failure is the caller's result, as in dsv32.agent.tool
            return f"error: {name} failed: {type(e).__name__}: {e}"

    def close(self) -> None:
        self.db.close()


class SandboxedTools:
    """Model-written tools code served from a sandbox that holds a copy of the database."""

    def __init__(self, sandbox: Sandbox, tools_code: str, db_path: str | Path, *, timeout: float = 30.0,
                 startup_timeout: float = 30.0):
        self.sandbox, self.timeout = sandbox, timeout
        work = sandbox.work
        shutil.copyfile(db_path, work / "db.sqlite")
        (work / "tools.py").write_text(tools_code)
        for f in ("db.sqlite", "tools.py"):
            os.chmod(sandbox.own(work / f), 0o444)
        path = work / "tools.sock"
        spec = {"code": str(work / "tools.py"), "db": str(work / "db.sqlite")}
        self.proc = sandbox.popen([sys.executable, "-I", "-c", SERVE, json.dumps(spec)])
        deadline = time.monotonic() + startup_timeout
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.close()
                raise CodeError(f"the tools did not start: {out[-2000:] or 'no socket after the timeout'}")
            time.sleep(0.01)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        with short_path(work) as at:
            self.sock.connect(f"{at}/tools.sock")
        self.wire = self.sock.makefile("rw")
        self.lock = threading.Lock()

    def call(self, name: str, arguments: dict) -> str:
        with self.lock:
            try:
                self.wire.write(json.dumps({"name": name, "arguments": arguments}) + "\n")
                self.wire.flush()
                line = self.wire.readline()
            except OSError as e:  # socket.timeout included
                return f"error: {name} did not answer: {e}"
        return json.loads(line)["result"] if line else f"error: {name} ended the tools process"

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        self.sandbox.kill(self.proc)


@dataclass
class SolutionRun:
    result: str | None      # what solve returned (JSON text when it was not a string)
    calls: int              # tool calls the solution made
    error: str | None       # why there is no result
    seconds: float


def _serve(server: socket.socket, call, counter: list[int]) -> None:
    try:
        conn, _ = server.accept()
    except OSError:
        return
    with conn, conn.makefile("rw") as wire:
        for line in wire:
            try:
                req = json.loads(line)
                out = call(str(req["name"]), dict(req.get("arguments") or {}))
            except (ValueError, KeyError, TypeError) as e:
                out = f"error: a malformed tool call: {e}"
            counter[0] += 1
            wire.write(json.dumps({"result": out}) + "\n")
            wire.flush()


def run_solution(sandbox: Sandbox, solution_code: str, params: dict, call, *, timeout: float = 120.0,
                 max_output: int = 100_000) -> SolutionRun:
    """Run `solve(call, params)` in `sandbox` (which must hold no database), its tool calls
    answered here by `call(name, arguments) -> str`."""
    work = sandbox.work
    (work / "solution.py").write_text(solution_code)
    path = work / "call.sock"
    server = socket.socket(socket.AF_UNIX)
    with short_path(work) as at:
        server.bind(f"{at}/call.sock")
    os.chmod(path, 0o777)
    server.listen(1)
    server.settimeout(timeout)
    counter = [0]
    thread = threading.Thread(target=_serve, args=(server, call, counter), daemon=True)
    thread.start()
    spec = {"code": str(work / "solution.py"), "params": params, "mark": MARK}
    try:
        r = sandbox.run([sys.executable, "-I", "-c", SOLVE, json.dumps(spec)], timeout=timeout, max_output=max_output)
    finally:
        server.close()
        thread.join(timeout=5)
        path.unlink(missing_ok=True)
    if r.timed_out:
        return SolutionRun(None, counter[0], f"the solution timed out after {timeout:g} s", r.seconds)
    try:
        return SolutionRun(_marked(r.output, "solution")["result"], counter[0], None, r.seconds)
    except CodeError as e:
        return SolutionRun(None, counter[0], str(e), r.seconds)


def run_verifier(sandbox: Sandbox, verifier_code: str, result: str, params: dict, db_path: str | Path, *,
                 timeout: float = 60.0) -> tuple[float, list[str]]:
    """A model-written verifier's (score, reasons) on `result`, run in `sandbox` with a copy of
    the database; CodeError when it crashes or says nothing."""
    work = sandbox.work
    shutil.copyfile(db_path, work / "verify.sqlite")
    (work / "verifier.py").write_text(verifier_code)
    (work / "result.json").write_text(json.dumps({"result": result}))
    spec = {"code": str(work / "verifier.py"), "db": str(work / "verify.sqlite"), "result": str(work / "result.json"),
            "params": params, "mark": MARK}
    r = sandbox.run([sys.executable, "-I", "-c", VERIFY, json.dumps(spec)], timeout=timeout, max_output=100_000)
    if r.timed_out:
        raise CodeError(f"the verifier timed out after {timeout:g} s")
    return verdict(_marked(r.output, "verifier")["value"])


def local_verify(verifier_code: str, result: str, params: dict, db_path: str | Path) -> tuple[float, list[str]]:
    """A trusted verifier's (score, reasons), run here."""
    db = connect_ro(db_path)
    try:
        return verdict(namespace(verifier_code, "verifier.py")["verify"](result, db, params))
    finally:
        db.close()


def build_database(sandbox: Sandbox, code: str, *, timeout: float = 120.0) -> Path:
    """Run model-written `db.py` in `sandbox`; it must create db.sqlite in its work directory."""
    (sandbox.work / "db.py").write_text(code)
    r = sandbox.run([sys.executable, "-I", "db.py"], timeout=timeout, max_output=20_000)
    path = sandbox.work / "db.sqlite"
    if r.timed_out or r.exit_code != 0 or not path.is_file():
        why = "timed out" if r.timed_out else f"exited with {r.exit_code}" if r.exit_code else "wrote no db.sqlite"
        raise CodeError(f"db.py {why}:\n{r.output[-2000:]}")
    return path


SCHEMAS = r"""
import json, sys
ns = {"__name__": "tools"}
exec(compile(open("tools.py").read(), "tools.py", "exec"), ns)
print("\n" + sys.argv[1] + json.dumps({"tools": ns["TOOLS"]}))
"""


def read_tool_schemas(sandbox: Sandbox, tools_code: str, *, timeout: float = 60.0) -> list[dict]:
    """The TOOLS list of model-written `tools.py`, read by running it in `sandbox`."""
    (sandbox.work / "tools.py").write_text(tools_code)
    r = sandbox.run([sys.executable, "-I", "-c", SCHEMAS, MARK], timeout=timeout, max_output=100_000)
    if r.timed_out:
        raise CodeError(f"tools.py timed out after {timeout:g} s")
    tools = _marked(r.output, "tools.py")["tools"]
    if not isinstance(tools, list):
        tools = [tools]
    bad = [i for i, t in enumerate(tools) if not (isinstance(t, dict) and isinstance(t.get("function"), dict)
                                                   and isinstance(t["function"].get("name"), str))]
    if not tools or bad:
        raise CodeError(f"TOOLS must be a non-empty list of OpenAI-format tool schemas; entries {bad} are not")
    return tools
