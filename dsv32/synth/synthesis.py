"""The model-driven synthesis loop of spec §5 ("General agent: automatic environment synthesis"):
category -> database -> tools -> a simple task with a solution and a verifier -> check (the
solution's output must pass the verifier; the model edits until it does) -> raise the difficulty,
adding tools when needed, over rounds.

The model is any `dsv32.agent.policy` policy (`OpenAIPolicy` for an endpoint). It answers with
files, each a fenced block whose first line is `# file: NAME` (FILES); a later answer sends only
the files it changes. Everything it writes runs in sandboxes (`dsv32.agent.sandbox`): db.py
builds the database, tools.py is served from a sandbox holding a copy of it, the solution runs
in one without it, the verifier in another (`dsv32.synth.check`). An accepted round is an
`Environment`; a round that is not accepted after `fixes` corrections ends the loop.

Not done here (ours is smaller than the paper's): the synthesizing agent has no bash or search
tools, so its data comes from its own db.py, not from the Internet; and the pass@100 > 0 filter
with RL rollouts is left to `dsv32 rl` / `dsv32 eval` over the written environments.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsv32.agent.sandbox import Sandbox
from dsv32.engine import SamplingParams
from dsv32.synth.check import Check, check_environment
from dsv32.synth.environment import Environment
from dsv32.synth.runner import CodeError, build_database, read_tool_schemas

FILES = ("db.py", "tools.py", "task.md", "params.json", "solution.py", "verifier.py")
BLOCK = re.compile(r"```[^\n]*\n# file: *([\w.\-]+) *\n(.*?)```", re.DOTALL)

PROMPT = """You are building a verifiable environment for training tool-using agents, in the category: {category}.
Write these files, each as a fenced code block whose first line is `# file: NAME`:
- db.py: a Python script (standard library only) that creates `db.sqlite` in the current directory: a SQLite
  database with realistic, varied data for the category (tens of rows per table).
- tools.py: one function per tool, `def NAME(db, **arguments) -> str`, where db is a read-only sqlite3
  connection; a failure is a returned string starting with "error:". It defines TOOLS, the list of the tools'
  OpenAI-format schemas ({{"type": "function", "function": {{"name", "description", "parameters"}}}}). Do not
  define submit_result: every environment has it; the agent submits its answer as one string.
- task.md: the task for the agent, hard to solve but easy to verify; it says the answer's exact format.
- params.json: a JSON object of the task's parameters (may be {{}}).
- solution.py: `def solve(call, params) -> str`, the answer the agent should submit. It may ONLY use
  `call(tool_name, **arguments) -> str` and logic: it runs without the database, files or network.
- verifier.py: `def verify(result, db, params)` returning True/False, a score in [0, 1], or (score, [reasons]);
  it checks the submitted string against the rules by querying the database itself.
Start with a simple task."""
FIX = "The check failed: {reason}\nFix it. Send only the files you change, in the same format."
RAISE = ("Accepted. Now raise the difficulty: a harder task on the same database (more constraints, more steps), "
         "with its solution and verifier updated. If the tools are not enough, add tools (tools.py) or data (db.py). "
         "Send only the files you change, in the same format.")


@dataclass
class Round:
    index: int               # 1 = the simple task
    accepted: bool
    reason: str              # the last check's verdict
    attempts: int            # model calls this round took
    env: Environment | None  # the accepted environment


def parse_files(text: str) -> dict[str, str]:
    """The `# file: NAME` blocks of a reply, by name (the last one wins)."""
    return {name: body for name, body in BLOCK.findall(text or "")}


def synthesize(policy, category: str, workdir: str | Path, *, rounds: int = 3, fixes: int = 3,
               sampling: SamplingParams | None = None, unsafe_no_sandbox: bool = False, name: str = "env",
               on_event: Callable[[str, dict], None] | None = None) -> list[Round]:
    """Run the loop for one category; databases and sandboxes go under `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sampling = sampling or SamplingParams(max_tokens=16384, temperature=1.0)
    emit = on_event or (lambda kind, data: None)
    messages = [{"role": "user", "content": PROMPT.format(category=category)}]
    files: dict[str, str] = {}
    db: Path | None = None
    out: list[Round] = []
    for index in range(1, rounds + 1):
        check, attempts = Check(False, "no attempt"), 0
        for attempts in range(1, fixes + 2):
            reply = policy(messages, [], sampling)
            if reply.message is None:
                check = Check(False, f"the reply does not parse: {reply.error}")
                messages.append({"role": "user", "content": FIX.format(reason=check.reason)})
                continue
            content = reply.message.get("content") or ""
            messages.append({"role": "assistant", "content": content})
            new = parse_files(content)
            files.update(new)
            if "db.py" in new:
                db = None
            env, why = _assemble(files, db, category, index, workdir, f"{name}-r{index}", unsafe_no_sandbox)
            if env is None:
                check = Check(False, why)
            else:
                db = env.db_path
                check = check_environment(env, workdir / "boxes", unsafe_no_sandbox=unsafe_no_sandbox)
            emit("check", {"round": index, "attempt": attempts, "check": check})
            if check.accepted:
                env.meta.update({"reference_calls": check.calls, "reference": check.result})
                break
            messages.append({"role": "user", "content": FIX.format(reason=check.reason)})
        out.append(Round(index, check.accepted, check.reason, attempts, env if check.accepted else None))
        if not check.accepted:
            break
        messages.append({"role": "user", "content": RAISE})
    return out


def _assemble(files: dict[str, str], db: Path | None, category: str, index: int, workdir: Path, name: str,
              unsafe_no_sandbox: bool) -> tuple[Environment | None, str]:
    """The environment the files make (building the database when it has changed), or why not."""
    missing = [f for f in FILES if f not in files]
    if missing:
        return None, f"these files are missing: {', '.join(missing)}"
    try:
        params = json.loads(files["params.json"])
    except json.JSONDecodeError as e:
        return None, f"params.json is not JSON: {e}"
    if not isinstance(params, dict):
        return None, "params.json must be a JSON object"
    box = Sandbox(workdir / "boxes", "build", unsafe_no_sandbox=unsafe_no_sandbox)
    try:
        if db is None:
            db = workdir / f"{name}.sqlite"
            shutil.copyfile(build_database(box, files["db.py"]), db)
        tools = read_tool_schemas(box, files["tools.py"])
    except CodeError as e:
        return None, str(e)
    finally:
        box.remove()
    if any(t["function"]["name"] == "submit_result" for t in tools):
        return None, "tools.py must not define submit_result: every environment has it"
    return Environment(name=name, category=category, task=files["task.md"].strip(), params=params, tools=tools,
                       tools_code=files["tools.py"], solution_code=files["solution.py"],
                       verifier_code=files["verifier.py"], db_path=db, difficulty=index,
                       meta={"family": "llm", "db_code": files["db.py"]}), ""
