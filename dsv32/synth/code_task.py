"""One code task: the repository at a parent commit, the commit message as the issue, and the
tests that decide the reward (F2P must pass, P2P must keep passing). One line of tasks.jsonl and
the `task.json` of its environment directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


class TaskFormatError(ValueError):
    """A task.json or tasks.jsonl row lacks a field or has one of the wrong type."""


@dataclass(frozen=True)
class CodeTask:
    id: str                      # <repo name>-<commit[:12]>
    repo: str                    # the repository's name (not its path)
    commit: str                  # the commit the task was mined from
    parent: str                  # the snapshot's commit
    issue: str                   # the commit message: what to do
    test_cmd: str                # template with {junit} and {tests}
    test_files: list[str]        # what {tests} becomes ([]: the whole suite)
    test_paths: list[str]        # every test file of the commit: a candidate patch may not touch them
    f2p: list[str]               # fail (or absent) before the gold patch, pass after
    p2p: list[str]               # pass before and after
    setup: str | None = None     # shell command run in the sandbox before the tests
    env: str = ""                # the environment directory, relative to tasks.jsonl
    venv: str | None = None      # the repository's virtualenv, relative to tasks.jsonl (None: the
                                 # current interpreter)
    kind: str = ""               # "fix" or "new-module" (code_miner.task_kind); "" in older files
    venv_inherit: bool = False   # the venv also sees the miner's packages (code_venv, inherit); rows
                                 # from before isolation lack it and are read as True when they have a venv
    judge: dict | None = None    # the issue judge's verdict (issue_judge.IssueVerdict.to_json()), when judged

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> CodeTask:
        names = {f.name for f in fields(cls)}
        optional = ("setup", "env", "venv", "kind", "venv_inherit", "judge")
        required = {f.name for f in fields(cls) if f.name not in optional}
        if missing := required - row.keys():
            raise TaskFormatError(f"task {row.get('id', '?')!r} lacks {', '.join(sorted(missing))}")
        for name in ("test_files", "test_paths", "f2p", "p2p"):
            if not isinstance(row[name], list):
                raise TaskFormatError(f"task {row['id']!r}: {name} must be a list, got {type(row[name]).__name__}")
        if "venv_inherit" not in row:   # mined before the venv was isolated: it inherited
            row = {**row, "venv_inherit": row.get("venv") is not None}
        return cls(**{k: v for k, v in row.items() if k in names})

    @classmethod
    def load(cls, env_dir: str | Path) -> CodeTask:
        path = Path(env_dir) / "task.json"
        if not path.is_file():
            raise TaskFormatError(f"{path} does not exist: not an environment directory")
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))

    def save(self, env_dir: Path) -> None:
        (env_dir / "task.json").write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
