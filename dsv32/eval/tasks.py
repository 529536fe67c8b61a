"""Tasks: a conversation to answer, the gold answer, and the grader that compares them.

Sources (`load_tasks(spec)`):
- a JSONL file, one task a line: `{"id": ..., "prompt": "..." | "messages": [...], "answer": "...",
  "grader": "math"}`. `id` defaults to `FILE:LINE`, `grader` to math. A `prompt` becomes the user
  message, wrapped in the V3.2 math template by default (`template="math"`, the paper's
  "{question}\\nPlease reason step by step, and put your final answer within \\boxed{}."); a
  `messages` conversation is used as written.
- a code task: `{"id", "prompt" | "messages", "grader": "code", "tests": ...}` with `tests` a
  string of Python asserts or a list of `{"input", "output"}` stdin/stdout cases, and optionally
  `time_limit` (seconds per test) and `memory_mb`. It needs no `answer`, and its `prompt` is used
  as written (the math template asks for a boxed answer, not a program). It is run in the sandbox
  by `eval/code.py`.
- `rg:NAME[:N]`: N (default 50) generated problems of reasoning-gym's dataset NAME with a seed,
  offline, each graded by reasoning-gym's own scorer on the answer's last `\\boxed{}`.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

try:
    from reasoning_gym import create_dataset
except ImportError:  # the eval extra: reasoning_gym_tasks says so; JSONL tasks need nothing
    create_dataset = None

from dsv32.chat import math_prompt
from dsv32.eval.code import CaseFormatError, check_tests

GRADERS = ("math", "exact", "numeric", "code")
TEMPLATES = ("math", "none")


class TaskError(ValueError):
    """A task source that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class Task:
    id: str
    messages: list[dict]
    answer: str
    grader: str = "math"
    entry: dict | None = field(default=None, repr=False)  # reasoning-gym's entry, for its scorer
    tests: str | list | None = field(default=None, repr=False)  # code: asserts or stdin/stdout cases
    time_limit: float | None = None   # code: seconds per test (None: the judge's default)
    memory_mb: int | None = None      # code: address-space limit (None: the judge's default)


def _task(obj, where: str, default_id: str, template: str) -> Task:
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: a task is a JSON object, got {type(obj).__name__}")
    if ("prompt" in obj) == ("messages" in obj):
        raise TaskError(f"{where}: give exactly one of 'prompt' and 'messages'")
    grader = obj.get("grader", "math")
    if grader not in GRADERS:
        raise TaskError(f"{where}: unknown grader {grader!r}; expected one of {', '.join(GRADERS)}")
    code = {}
    if grader == "code":
        code = _code_fields(obj, where)
    elif "answer" not in obj or isinstance(obj["answer"], (dict, list)) or obj["answer"] is None:
        raise TaskError(f"{where}: 'answer' is missing or not a string or number")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise TaskError(f"{where}: 'prompt' is not a string")
        text = math_prompt(obj["prompt"]) if template == "math" and grader != "code" else obj["prompt"]
        messages = [{"role": "user", "content": text}]
    else:
        messages = obj["messages"]
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and "role" in m for m in messages)):
            raise TaskError(f"{where}: 'messages' is not a non-empty list of {{'role': ..., 'content': ...}}")
    return Task(str(obj.get("id", default_id)), messages, str(obj.get("answer", "")), grader, **code)


def _code_fields(obj: dict, where: str) -> dict:
    """A code task's tests and limits, checked."""
    if "tests" not in obj:
        raise TaskError(f"{where}: a code task needs 'tests' (asserts, or a list of {{\"input\", \"output\"}})")
    try:
        check_tests(obj["tests"])
    except CaseFormatError as e:
        raise TaskError(f"{where}: 'tests': {e}") from None
    for name, kind in (("time_limit", (int, float)), ("memory_mb", int)):
        value = obj.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or value <= 0):
            raise TaskError(f"{where}: '{name}' must be a positive number, got {value!r}")
    return {"tests": obj["tests"], "time_limit": obj.get("time_limit"), "memory_mb": obj.get("memory_mb")}


def read_jsonl(path: str | Path, parse, kind: str = "task") -> list:
    """parse(obj, where, default_id) of each line of a JSONL file (blank lines skipped), `where`
    being "file:line" for errors; the parsed items' ids must be unique."""
    path = Path(path)
    items, seen = [], set()
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        item = parse(obj, where, f"{path.stem}:{no}")
        if item.id in seen:
            raise TaskError(f"{where}: duplicate {kind} id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise TaskError(f"{path.name}: no {kind}s")
    return items


def load_jsonl(path: str | Path, template: str = "math") -> list[Task]:
    """The tasks of a JSONL file (blank lines skipped); ids must be unique."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    return read_jsonl(path, lambda obj, where, default_id: _task(obj, where, default_id, template))


def reasoning_gym_tasks(name: str, size: int = 50, seed: int = 0) -> list[Task]:
    """size problems of reasoning-gym's dataset `name`, generated offline from seed."""
    if create_dataset is None:
        raise TaskError(f"rg:{name}: reasoning-gym is not installed (pip install 'dsv32[eval]')")
    try:
        data = create_dataset(name, size=size, seed=seed)
    except (KeyError, ValueError) as e:
        raise TaskError(f"rg:{name}: not a reasoning-gym dataset ({e})") from None
    return [Task(f"rg:{name}:{seed}:{i}", [{"role": "user", "content": math_prompt(entry["question"])}],
                 str(entry["answer"]), f"rg:{name}", entry) for i, entry in enumerate(data)]


def load_tasks(spec: str, seed: int = 0, template: str = "math") -> list[Task]:
    """Tasks from `FILE.jsonl` or `rg:NAME[:N]`."""
    if spec.startswith("rg:"):
        name, _, size = spec[3:].partition(":")
        if not size.isdigit() and size:
            raise TaskError(f"{spec}: expected rg:NAME or rg:NAME:N with N a number of problems")
        return reasoning_gym_tasks(name, int(size or 50), seed)
    return load_jsonl(spec, template)
