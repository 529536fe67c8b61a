"""Synthesized general-agent environments as RL tasks (issue #18): one `Task` per environment of a
folder (`environment_tasks`), and `EnvironmentRunner`, the `env(task, message)` of
`dsv32.rl.rollout.rollout` and `RLTrainer`, which runs a trajectory's tool calls against its
environment and scores what it submits with the environment's verifier.

An episode ends at the turn that calls submit_result (later calls in that turn are not run), or at
a turn with no tool call; the reward is the verifier's score of the submission, 0 without one.

How the score reaches the reward: `rl` sits below `synth`, so `rl.rewards.outcome` cannot run a
verifier. The runner writes the score into the trajectory's own task object (`Task.verdict`) and
grader "verifier" reads it there. That needs one task object per trajectory: RLTrainer copies each
task per trajectory (`replace(t)`); a direct `rollout` call must pass copies too, not one object
G times (the runner could not tell those trajectories apart).

Which code runs where: an environment whose tools and verifier are, byte for byte, a programmatic
family's own files (ours: trusted) runs them here; any other (model-written) runs its tools in a
sandbox holding a copy of the database and its verifier in another (`runner.SandboxedTools`,
`runner.run_verifier`). The tools of an environment are shared by its trajectories (they only
read the database); the submission is per trajectory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dsv32.agent.sandbox import Sandbox
from dsv32.agent.tool import Tool
from dsv32.rl.rollout import PerTrajectory, tool_env
from dsv32.rl.tasks import Task
from dsv32.synth import trip_tools, trip_verifier
from dsv32.synth.environment import (
    INDEX,
    Environment,
    EnvironmentFormatError,
    load_environment,
    read_index,
)
from dsv32.synth.runner import (
    CodeError,
    LocalTools,
    SandboxedTools,
    local_verify,
    run_verifier,
)
from dsv32.synth.session import SubmitTool, agent_tools

# (tools.py, verifier.py) of each programmatic family: environments with exactly this code are ours
TRUSTED = {"trip": (Path(trip_tools.__file__).read_text(), Path(trip_verifier.__file__).read_text())}


def trusted(env: Environment) -> bool:
    """Whether `env`'s tools and verifier are a programmatic family's own files, unchanged."""
    return (env.tools_code, env.verifier_code) in TRUSTED.values()


def domain_of(env: Environment) -> str:
    """The RL domain of an environment: its category as a flag-friendly name ('trip-planning')."""
    return re.sub(r"[^a-z0-9]+", "-", env.category.lower()).strip("-") or "environment"


def environment_task(env: Environment, directory: str | Path) -> Task:
    """The task of the environment saved in `directory`: its task text as the user message and its
    tools (submit_result last) on the system message, in thinking mode, graded by its verifier."""
    tools = env.tool_schemas()
    return Task(domain=domain_of(env), messages=[{"role": "system", "content": "", "tools": tools},
                                                 {"role": "user", "content": env.task}],
                grader="verifier", tools=tools, thinking_mode="thinking", environment=str(directory))


def environment_tasks(root: str | Path) -> list[Task]:
    """One task per environment in the folder `root` (or its environments.jsonl), in index order."""
    root = Path(root)
    if root.name == INDEX:
        root = root.parent
    rows = read_index(root)
    if not rows:
        raise EnvironmentFormatError(f"{root} has no environments: {INDEX} is missing or empty "
                                     "(write some with `dsv32 synth general`)")
    return [environment_task(load_environment(root / r["path"]), root / r["path"]) for r in rows]


@dataclass
class Episode:
    """One trajectory's state: its task object, its tools and what it submitted."""
    task: Task
    tools: dict[str, Tool]
    submit: SubmitTool
    verdict: tuple[float, list[str]] | None = None   # (score, reasons) once scored


@dataclass
class Loaded:
    """An environment and its running tools, shared by the trajectories in it."""
    env: Environment
    trusted: bool
    tools: LocalTools | SandboxedTools
    boxes: list[Sandbox] = field(default_factory=list)


class EnvironmentRunner:
    """`env(task, message)` for rollouts over environment tasks; other tasks (no environment) go
    to the default `tool_env`, so one runner serves a mixed-domain stage.

    sandbox_root: where model-written environments' sandboxes go (needed only for those);
    unsafe_no_sandbox: run them without bubblewrap (trusted code only)."""

    def __init__(self, sandbox_root: str | Path | None = None, *, unsafe_no_sandbox: bool = False,
                 max_episodes: int = 8192):
        self.sandbox_root = Path(sandbox_root) if sandbox_root is not None else None
        self.unsafe_no_sandbox = unsafe_no_sandbox
        self.loaded: dict[str, Loaded] = {}
        self.episodes = PerTrajectory(max_episodes)

    def __call__(self, task: Task, message: dict | None) -> tuple[dict, list[str]] | None:
        if task.environment is None:
            return tool_env(task, message)
        if message is None or not message["tool_calls"]:
            self.episodes.pop(task)
            return None
        ep = self.episode(task)
        results = []
        for call in message["tool_calls"]:
            name = call["function"]["name"]
            tool = ep.tools.get(name)
            results.append(tool(call["function"]["arguments"]) if tool is not None else
                           f"error: there is no tool {name!r}; the tools are {', '.join(ep.tools)}")
            if ep.submit.submitted is not None:
                ep.verdict = self.score(task.environment, ep.submit.submitted)
                task.verdict = ep.verdict[0]
                return None
        return message, results

    def episode(self, task: Task) -> Episode:
        """The state of `task`'s trajectory, new on its first tool call."""
        def start() -> Episode:
            loaded = self.load(task.environment)
            tools, submit = agent_tools(loaded.env, loaded.tools.call)
            return Episode(task, {t.name: t for t in tools}, submit)
        return self.episodes.get(task, start)

    def verdict(self, task: Task) -> tuple[float, list[str]] | None:
        """(score, the verifier's reasons) of `task`'s trajectory once it submitted, else None."""
        ep = self.episodes.get(task)
        return ep.verdict if ep is not None else None

    def load(self, directory: str) -> Loaded:
        """The environment in `directory` with its tools started (once per runner)."""
        if directory not in self.loaded:
            env = load_environment(directory)
            if trusted(env):
                self.loaded[directory] = Loaded(env, True, LocalTools(env.tools_code, env.db_path))
            else:
                box = self.sandbox(env.name + "-tools")
                self.loaded[directory] = Loaded(env, False, SandboxedTools(box, env.tools_code, env.db_path), [box])
        return self.loaded[directory]

    def sandbox(self, name: str) -> Sandbox:
        if self.sandbox_root is None:
            raise ValueError(f"environment {name!r} is model-written: its code runs in a sandbox, and the "
                             "runner needs a sandbox_root for it")
        return Sandbox(self.sandbox_root, name, unsafe_no_sandbox=self.unsafe_no_sandbox)

    def score(self, directory: str, result: str) -> tuple[float, list[str]]:
        """The environment's verifier on a submitted result: (score, reasons); a verifier that
        fails on it scores 0 and says why."""
        loaded = self.load(directory)
        env = loaded.env
        try:
            if loaded.trusted:
                return local_verify(env.verifier_code, result, env.params, env.db_path)
            box = self.sandbox(env.name + "-verify")
            try:
                return run_verifier(box, env.verifier_code, result, env.params, env.db_path)
            finally:
                box.remove()
        except (CodeError, EnvironmentFormatError) as e:
            return 0.0, [f"the verifier failed: {e}"]
        except Exception as e:  # noqa: BLE001 -- a trusted verifier's crash on a submission is a score of 0, not a dead run
            return 0.0, [f"the verifier failed: {type(e).__name__}: {e}"]

    def close(self) -> None:
        """Stop the environments' tools and remove their sandboxes."""
        for loaded in self.loaded.values():
            loaded.tools.close()
            for box in loaded.boxes:
                box.remove()
        self.loaded.clear()
        self.episodes.clear()
