"""PythonTool: a stateful Jupyter kernel per task, running inside the task's sandbox.

DeepSeek-V3.2's code-interpreter environment is "a Python tool running in a stateful Jupyter
notebook" with a **120.0 s timeout**, and its reasoning-with-tools prompt allows "up to **20 code
executions**" (spec §3.3, Tables 7-8; §5 "Code interpreter"). Those are the defaults here.

The kernel (ipykernel) runs under bubblewrap with no network namespace of the host's, so it could
not reach a TCP port of ours, nor we one of its. Its ZMQ sockets therefore use the `ipc` transport:
Unix sockets, as files in a private directory bound into the sandbox at the same path; a Unix
socket in the file system is reached through its file, whatever the network namespace. Once the
kernel has bound them, the directory is taken back from the sandbox's uid, so code in the kernel
cannot swap a socket for a link to another one of the host's.

A call that runs past its timeout does not get an interrupt (code blocked in C ignores SIGINT):
the kernel's whole sandbox is killed and the next call starts a fresh kernel; the result says that
the state is lost. A kernel that dies on its own (a resource limit, `os._exit`) is reported the
same way.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from dsv32.agent.output import CappedOutput
from dsv32.agent.sandbox import Sandbox
from dsv32.agent.tool import Tool, ToolError

if TYPE_CHECKING:
    from jupyter_client import BlockingKernelClient

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOST = "a fresh kernel starts on the next call: variables and imports are lost, files in the work directory remain"


class PythonTool(Tool):
    name = "python"
    parameters = {"type": "object", "properties": {"code": {
        "type": "string", "description": "Python code to run in the notebook; the value of the last line is shown."}},
        "required": ["code"]}

    def __init__(self, sandbox: Sandbox, *, timeout: float = 120.0, max_executions: int = 20,
                 max_output: int = 20_000, startup_timeout: float = 60.0):
        self.sandbox = sandbox
        self.timeout = timeout
        self.max_executions = max_executions
        self.max_output = max_output
        self.startup_timeout = startup_timeout
        self.executions = 0
        self.kernel: subprocess.Popen | None = None
        self.client: BlockingKernelClient | None = None
        self.files: list[Path] = []  # this kernel's connection file, log and socket directory
        self.description = (
            "Run Python in a stateful Jupyter notebook: variables, imports and files persist between calls. "
            f"Returns stdout, stderr, the value of the last expression and any traceback. A call times out after "
            f"{timeout:g} s (the kernel is then restarted and its state lost); at most {max_executions} executions "
            "per task. " + ("No network access." if sandbox.isolated else
                            "WARNING: not sandboxed (unsafe_no_sandbox): the code runs with the caller's rights."))

    # ---- kernel lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start a kernel in the sandbox and wait until both its shell and iopub channels answer."""
        try:  # the `agent` extra
            from jupyter_client import BlockingKernelClient
            from jupyter_client.connect import write_connection_file
        except ImportError as e:
            raise ToolError("the python tool needs jupyter_client and ipykernel "
                            f"(pip install 'dsv32[agent]'): {e}") from None
        box, tag = self.sandbox, uuid.uuid4().hex
        # the connection file (it holds the session key) and the log stay in the caller's directory;
        # the kernel sees the file read-only and writes only its sockets' directory, a short path
        # because a Unix socket's path has at most 107 bytes
        ipc = box.own(Path(tempfile.mkdtemp(prefix="dsv32-ipc-", dir="/tmp" if os.path.isdir("/tmp") else None)))
        self.files = [box.dir / f"kernel-{tag}.json", box.dir / f"kernel-{tag}.log", ipc]
        conn, log, ipc = self.files
        write_connection_file(str(conn), ip=str(ipc / "kernel"), transport="ipc",
                              shell_port=1, iopub_port=2, stdin_port=3, control_port=4, hb_port=5)
        box.own(conn)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", str(conn),
                "--HistoryManager.enabled=False", "--InteractiveShell.colors=nocolor"]
        env = {"IPYTHONDIR": str(ipc / "ipython"), "JUPYTER_RUNTIME_DIR": str(ipc),
               "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
        with open(log, "wb") as out:
            self.kernel = box.popen(argv, env=env, writable=(ipc,), readable=(conn,), stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            self.client = BlockingKernelClient(connection_file=str(conn))
            self.client.load_connection_file()
            self.client.start_channels(hb=False, stdin=False, control=False)
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:  # kernel_info until an answer arrives on iopub too
                msg_id = self.client.kernel_info()
                if self._reply(msg_id, deadline) and self._idle(msg_id, min(deadline, time.monotonic() + 1)):
                    box.seal(ipc)  # its sockets are bound: from now on no entry there can be replaced
                    return
                if self.kernel.poll() is not None:
                    break
        except BaseException:
            self.stop()
            raise
        status = self.kernel.poll()
        tail = log.read_text(errors="replace")[-2000:]
        self.stop()
        why = (f"exited with status {status}" if status is not None else
               f"did not answer within {self.startup_timeout:g} s")
        raise ToolError(f"the Python kernel {why}: {tail}".rstrip())

    def _reply(self, msg_id: str, deadline: float) -> bool:
        while time.monotonic() < deadline and self.kernel.poll() is None:
            try:
                msg = self.client.get_shell_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return True
        return False

    def _idle(self, msg_id: str, deadline: float) -> bool:
        while time.monotonic() < deadline:
            try:
                msg = self.client.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"):
                return True
        return False

    def stop(self) -> None:
        """Kill the kernel and everything in its sandbox (not an interrupt: C code ignores those)."""
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.kernel is not None:
            self.sandbox.kill(self.kernel)
            self.kernel = None
        for path in self.files:
            if path.is_dir():
                os.chmod(path, 0o700)  # sealed 0555 when we are not root
                shutil.rmtree(path, ignore_errors=True)  # does not follow symlinks
            else:
                path.unlink(missing_ok=True)
        self.files = []

    def close(self) -> None:
        self.stop()

    # ---- one call --------------------------------------------------------------------------

    def run(self, code: str) -> str:
        if self.executions >= self.max_executions:
            raise ToolError(f"the limit of {self.max_executions} code executions for this task is reached; "
                            "answer with what you have")
        self.executions += 1
        out = CappedOutput(self.max_output)
        if self.kernel is not None and self.kernel.poll() is not None:
            self.stop()
            out.add("[the kernel had died since the last call; this is a fresh one: earlier state is lost]\n")
        if self.kernel is None:
            self.start()
        msg_id = self.client.execute(code, store_history=True, allow_stdin=False)
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise ToolError(f"the execution timed out after {self.timeout:g} s and the kernel was killed; "
                                f"{LOST}.\n{out.text()}".rstrip())
            try:
                msg = self.client.get_iopub_msg(timeout=min(0.25, left))
            except queue.Empty:
                if self.kernel.poll() is not None:
                    status = self.kernel.returncode
                    self.stop()
                    raise ToolError(f"the kernel died (exit status {status}); {LOST}.\n{out.text()}".rstrip())
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            out.add(render(kind, content))
        self._reply(msg_id, time.monotonic() + 1)  # drain the execute_reply from the shell channel
        limit = self.sandbox.limits.processes
        if self.sandbox.processes(self.kernel) >= limit:  # e.g. a fork bomb left running in the background
            self.stop()
            raise ToolError(f"the sandbox reached its limit of {limit} processes, so the kernel was killed with "
                            f"everything it started; {LOST}.\n{out.text()}".rstrip())
        return out.text()


def render(kind: str, content: dict) -> str:
    """The text of one iopub message, as a notebook would show it to a reader of text."""
    if kind == "stream":
        return content["text"]
    if kind in ("execute_result", "display_data"):
        data = content.get("data", {})
        if "text/plain" in data:
            return data["text/plain"] + "\n"
        return "".join(f"[{mime} output]\n" for mime in data)
    if kind == "error":
        lines = content.get("traceback") or [f"{content['ename']}: {content['evalue']}"]
        return ANSI.sub("", "\n".join(lines)) + "\n"
    return ""
