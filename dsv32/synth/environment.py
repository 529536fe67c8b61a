"""A general-agent environment (spec §5, "automatic environment synthesis"): a SQLite database,
task-specific tools over it, a task, a reference solution and a verifier.

The code parts are Python source, so that an environment a model wrote and one a program wrote
are the same kind of thing, and both can be run in a sandbox:
- `tools.py` defines one function `name(db, **arguments) -> str` per tool (db: a read-only
  `sqlite3.Connection`; a failure is a result starting with "error:") and `TOOLS`, their
  OpenAI-format schemas. `submit_result` is not among them: every environment has it (SUBMIT).
- `solution.py` defines `solve(call, params) -> result`, where `call(tool, /, **arguments) -> str`
  is a tool call; the solution gets no database (spec §5: it "may only call the tools").
- `verifier.py` defines `verify(result, db, params)` -> a bool, a score in [0, 1], or
  (score, [reasons]) (see `verdict`).

On disk an environment is a directory: environment.json (all but the code and the database),
tools.py, solution.py, verifier.py and db.sqlite; a folder of them has an index,
environments.jsonl, one line per environment, which is what `dsv32 rl` / `dsv32 eval` would read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX = "environments.jsonl"
DB = "db.sqlite"
CODE = {"tools_code": "tools.py", "solution_code": "solution.py", "verifier_code": "verifier.py"}
SUBMIT = {"type": "function", "function": {
    "name": "submit_result", "description": "Submit the final answer. It ends the task; it can be called once.",
    "parameters": {"type": "object", "properties": {"result": {
        "type": "string", "description": "the answer, in the format the task asks for (e.g. JSON)"}},
        "required": ["result"]}}}


class EnvironmentFormatError(ValueError):
    """An environment on disk, or a verifier's answer, is not what the contract says."""


@dataclass
class Environment:
    name: str                 # unique within its folder; the directory's name
    category: str             # e.g. "trip planning"
    task: str                 # the user message the agent gets
    params: dict              # the task's parameters, for the solution and the verifier (JSON)
    tools: list[dict]         # OpenAI-format schemas of tools.py's tools (submit_result not included)
    tools_code: str
    solution_code: str
    verifier_code: str
    db_path: Path             # the SQLite file
    difficulty: int = 1
    meta: dict = field(default_factory=dict)   # provenance: family, seed, the reference's tool calls...

    def tool_schemas(self) -> list[dict]:
        """What the agent sees: the environment's tools and submit_result."""
        return [*self.tools, SUBMIT]

    def save(self, directory: str | Path) -> Path:
        """Write the environment to `directory` (created; must not hold another one) and point
        `db_path` at the copy there."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if (d / "environment.json").exists():
            raise FileExistsError(f"{d} holds an environment already")
        if Path(self.db_path).resolve() != (d / DB).resolve():
            shutil.copyfile(self.db_path, d / DB)
        self.db_path = d / DB
        for attr, file in CODE.items():
            (d / file).write_text(getattr(self, attr))
        data = {k: v for k, v in asdict(self).items() if k not in CODE and k != "db_path"}
        (d / "environment.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        return d


def load_environment(directory: str | Path) -> Environment:
    """The environment written by `Environment.save` in `directory`."""
    d = Path(directory)
    missing = [f for f in ("environment.json", DB, *CODE.values()) if not (d / f).is_file()]
    if missing:
        raise EnvironmentFormatError(f"{d} is not an environment: it lacks {', '.join(missing)}")
    data = json.loads((d / "environment.json").read_text())
    want = {"name", "category", "task", "params", "tools"}
    if not want <= set(data):
        raise EnvironmentFormatError(f"{d / 'environment.json'} lacks {', '.join(sorted(want - set(data)))}")
    code = {attr: (d / file).read_text() for attr, file in CODE.items()}
    return Environment(**data, **code, db_path=d / DB)


def verdict(value) -> tuple[float, list[str]]:
    """A verifier's answer as (score in [0, 1], reasons): a bool, a number, or (score, reasons)."""
    reasons: list[str] = []
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], list):
        value, reasons = value[0], [str(r) for r in value[1]]
    if isinstance(value, bool):
        return float(value), reasons
    if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
        return float(value), reasons
    raise EnvironmentFormatError(f"a verifier must return a bool, a score in [0, 1] or (score, reasons); "
                                 f"it returned {value!r}")


def append_index(root: str | Path, env: Environment, **extra) -> None:
    """One line for `env` (saved under `root`) in root/environments.jsonl."""
    root = Path(root)
    line = {"name": env.name, "path": env.name, "category": env.category, "difficulty": env.difficulty,
            "task": env.task, **extra}
    with open(root / INDEX, "a") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")


def read_index(root: str | Path) -> list[dict]:
    """The lines of root/environments.jsonl ([] when there is none yet)."""
    path = Path(root) / INDEX
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
