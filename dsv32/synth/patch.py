"""Patches: the files one touches, and applying one to a plain directory with `git apply`.

Both go through git's own patch parser (`git apply --numstat -z`), so the paths we check are the
paths git will write: a rename's old and new names, a deletion, a binary file. Applying runs with
git's repository discovery stopped at the directory's parent, so a tree that happens to sit
inside some repository is still patched as a tree of its own.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class PatchError(ValueError):
    """A patch is malformed or does not apply; the message says which and git's words why."""


def _git_apply(args: list[str], patch: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(cwd).resolve().parent)}
    return subprocess.run(["git", "apply", *args], input=patch.encode(), capture_output=True, cwd=cwd, env=env)


def patch_paths(patch: str) -> set[str]:
    """Every path the patch creates, changes, deletes, renames or copies (both names of a rename:
    git's numstat gives the new name, the headers the old)."""
    if not patch.strip():
        return set()
    r = _git_apply(["--numstat", "-z", "-"], patch, Path.cwd())
    if r.returncode != 0:
        raise PatchError(f"not a patch git can read: {r.stderr.decode(errors='replace').strip()}")
    fields, paths, i = r.stdout.decode(errors="surrogateescape").split("\0"), set(), 0
    while i < len(fields) and fields[i]:
        record = fields[i].split("\t")  # added, deleted, path ("" for a rename: old and new follow)
        if record[2]:
            paths.add(record[2])
            i += 1
        else:
            paths.update(fields[i + 1:i + 3])
            i += 3
    for line in patch.splitlines():
        for header in ("rename from ", "copy from "):
            if line.startswith(header):
                paths.add(_unquote(line[len(header):]))
    return paths


def _unquote(path: str) -> str:
    """A path as git writes it in a header: C-quoted (octal escapes for bytes) when unusual."""
    if len(path) >= 2 and path[0] == path[-1] == '"':
        return path[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").decode(
            "utf-8", "surrogateescape")
    return path


def apply_patch(directory: Path, patch: str, name: str = "patch") -> None:
    """Apply `patch` (paths a/… b/…) to the files under `directory`; an empty patch changes nothing.
    Raises PatchError naming the patch (`name`) when any hunk fails; then nothing is changed."""
    if not patch.strip():
        return
    r = _git_apply(["--whitespace=nowarn", "-"], patch, directory)
    if r.returncode != 0:
        raise PatchError(f"the {name} does not apply: {r.stderr.decode(errors='replace').strip()}")
