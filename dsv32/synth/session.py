"""One agent episode in an environment: the environment's tools as `dsv32.agent.tool.Tool`s for
the agent loop, and `submit_result`, which keeps what the agent submitted for the verifier.

The tools reach the database through `call(name, arguments) -> str` (`runner.LocalTools` or
`runner.SandboxedTools`); `Tool.__call__` checks the arguments against the schema first, and
every failure is an "error: ..." result.
"""

from __future__ import annotations

from collections.abc import Callable

from dsv32.agent.tool import Tool, ToolError
from dsv32.synth.environment import SUBMIT, Environment


class EnvironmentTool(Tool):
    """One of the environment's tools, described by its schema, run through `call`."""

    def __init__(self, schema: dict, call: Callable[[str, dict], str]):
        fn = schema["function"]
        self.name, self.description = fn["name"], fn.get("description", "")
        self.parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        self._call = call

    def run(self, **arguments) -> str:
        return self._call(self.name, arguments)


class SubmitTool(Tool):
    """submit_result: the agent's answer, once; the verifier reads `submitted`."""

    name = SUBMIT["function"]["name"]
    description = SUBMIT["function"]["description"]
    parameters = SUBMIT["function"]["parameters"]

    def __init__(self):
        self.submitted: str | None = None

    def run(self, result: str) -> str:
        if self.submitted is not None:
            raise ToolError("a result was submitted already; submit_result can be called once")
        self.submitted = result
        return "submitted"


def agent_tools(env: Environment, call: Callable[[str, dict], str]) -> tuple[list[Tool], SubmitTool]:
    """The tools of one episode in `env` (submit_result last) and its submit tool."""
    submit = SubmitTool()
    return [*(EnvironmentTool(s, call) for s in env.tools), submit], submit
