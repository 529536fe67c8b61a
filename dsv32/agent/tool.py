"""A tool the model calls: a name, a JSON schema for its arguments, one call -> one result string.

A call never raises into the agent loop: unparsable or mistyped arguments, a timeout, a limit
reached or a crash inside the tool all come back as a result that starts with "error:", which the
model reads like any other result (as DeepSeek's environments report failures).
"""

from __future__ import annotations

import json
from typing import ClassVar

JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
              "object": dict}


class ToolError(Exception):
    """A failure the model should read: bad arguments, a timeout, a limit reached."""


class Tool:
    """Subclasses set `name`, `description`, `parameters` (the JSON schema of the arguments
    object) and implement `run(**arguments) -> str`; `close()` frees what the tool holds."""

    name: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[dict] = {"type": "object", "properties": {}}

    def schema(self) -> dict:
        """The tool in the OpenAI `tools` format, which the V3.2 chat encoder renders."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def run(self, **arguments) -> str:
        raise NotImplementedError

    def __call__(self, arguments: dict | str) -> str:
        """Check the arguments against the schema, run, and return failures as results."""
        try:
            args = self.check(arguments)
            return self.run(**args)
        except ToolError as e:
            return f"error: {e}"
        except Exception as e:  # a tool's own bug must not end the episode either
            return f"error: {self.name} failed: {type(e).__name__}: {e}"

    def check(self, arguments: dict | str) -> dict:
        """The arguments as a dict, or ToolError naming what is wrong with them."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                raise ToolError(f"the arguments of {self.name} are not valid JSON: {e}") from None
        if not isinstance(arguments, dict):
            raise ToolError(f"the arguments of {self.name} must be a JSON object")
        props = self.parameters.get("properties", {})
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if missing:
            raise ToolError(f"{self.name} needs the argument(s) {', '.join(missing)}")
        unknown = [k for k in arguments if k not in props]
        if unknown:
            raise ToolError(f"{self.name} has no argument(s) {', '.join(unknown)}; it takes {', '.join(props)}")
        for k, v in arguments.items():
            want = props[k].get("type")
            ok = JSON_TYPES.get(want, object)
            if want in ("integer", "number") and isinstance(v, bool) or not isinstance(v, ok):
                raise ToolError(f"argument {k} of {self.name} must be of type {want}, got {type(v).__name__}")
        return arguments

    def close(self) -> None:
        pass
