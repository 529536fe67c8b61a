"""BashTool: one shell command per call, in the task's work directory, inside its sandbox.

The code-agent environments of DeepSeek-V3.2 are real repositories worked on with coding tools
(spec §5, "Code agent"); the paper gives no timeout for them, so the code interpreter's 120 s
(spec §3.3) is the default here too. Each call is its own sandboxed process tree: what a command
leaves running in the background dies with the call, files in the work directory remain.
"""

from __future__ import annotations

from dsv32.agent.sandbox import Sandbox
from dsv32.agent.tool import Tool, ToolError


class BashTool(Tool):
    name = "bash"
    parameters = {"type": "object", "properties": {"command": {
        "type": "string", "description": "A bash command line, run in the task's work directory."}},
        "required": ["command"]}

    def __init__(self, sandbox: Sandbox, *, timeout: float = 120.0, max_output: int = 20_000):
        self.sandbox = sandbox
        self.timeout = timeout
        self.max_output = max_output
        self.description = (
            "Run a bash command in the task's work directory and return its output (stdout and stderr) and exit "
            f"code. Files persist between calls; processes do not. A command is killed after {timeout:g} s. "
            + ("No network access." if sandbox.isolated else
               "WARNING: not sandboxed (unsafe_no_sandbox): the command runs with the caller's rights."))

    def run(self, command: str) -> str:
        r = self.sandbox.run(["bash", "-c", command], timeout=self.timeout, max_output=self.max_output)
        if r.timed_out:
            raise ToolError(f"the command timed out after {self.timeout:g} s and was killed with every process "
                            f"it started.\n{r.output}".rstrip())
        sep = "" if r.output.endswith("\n") or not r.output else "\n"
        return f"{r.output}{sep}[exit code {r.exit_code}]"
