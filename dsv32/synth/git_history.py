"""A repository's history as candidate code tasks: which commits there are, and how each one's
change splits into a test part and a source part (spec §5, "Code agent": a gold patch and a test
patch per item).

A path is a test path when a directory on it is named `test`, `tests` or `testing`, or its file
is `test_*.py`, `*_test.py` or `conftest.py` (pytest's own discovery rules plus the usual
layouts). A documentation path (`docs/`, `*.md`, `*.rst`, `*.txt`, LICENSE...) is neither test
nor source: a commit that changes only tests and docs has nothing for a model to write.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

TEST_DIRS = {"test", "tests", "testing"}
DOC_DIRS = {"doc", "docs"}
DOC_SUFFIXES = {".md", ".rst", ".txt", ".adoc"}
DOC_NAMES = {"LICENSE", "LICENCE", "COPYING", "AUTHORS", "CHANGELOG", "NEWS", ".gitignore"}


class GitError(RuntimeError):
    """A git command failed; the message holds the command and git's own words."""


def git(repo: str | Path, *args: str, binary: bool = False) -> str | bytes:
    """Run `git -C repo args...` and return its stdout (bytes with `binary`)."""
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=not binary)
    if r.returncode != 0:
        err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
        raise GitError(f"git {' '.join(args)} (in {repo}) failed: {err.strip()}")
    return r.stdout


def is_test_path(path: str) -> bool:
    p = PurePosixPath(path)
    name = p.name
    return (any(part in TEST_DIRS for part in p.parts[:-1]) or name == "conftest.py"
            or (name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))))


def is_test_module(path: str) -> bool:
    """A file pytest collects by default (test_*.py or *_test.py), as opposed to a fixture or helper."""
    name = PurePosixPath(path).name
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def is_doc_path(path: str) -> bool:
    p = PurePosixPath(path)
    return (bool(p.parts) and p.parts[0] in DOC_DIRS) or p.suffix.lower() in DOC_SUFFIXES or p.stem in DOC_NAMES


@dataclass(frozen=True)
class Commit:
    """One non-merge commit, its first parent and its change, split by path."""

    sha: str
    parent: str | None      # None for a root commit
    message: str
    test_paths: tuple[str, ...]     # changed test files (old and new names of a rename)
    source_paths: tuple[str, ...]   # changed files that are neither tests nor docs
    doc_paths: tuple[str, ...]
    deleted: tuple[str, ...]        # paths that no longer exist after the commit


def commits(repo: str | Path, rev: str = "HEAD", max_count: int | None = None) -> list[str]:
    """The non-merge commits reachable from `rev`, newest first (at most `max_count`)."""
    args = ["rev-list", "--no-merges"] + ([f"--max-count={max_count}"] if max_count else []) + [rev]
    return git(repo, *args).split()


def read_commit(repo: str | Path, sha: str) -> Commit:
    parents = git(repo, "rev-list", "--parents", "-n", "1", sha).split()[1:]
    message = git(repo, "log", "-1", "--format=%B", sha).strip()
    parent = parents[0] if parents else None
    base = parent or git(repo, "hash-object", "-t", "tree", "/dev/null").strip()  # the empty tree
    status = git(repo, "diff", "--name-status", "-z", "--no-renames", base, sha).split("\0")
    tests, sources, docs, deleted = [], [], [], []
    for code, path in zip(status[0::2], status[1::2]):
        (tests if is_test_path(path) else docs if is_doc_path(path) else sources).append(path)
        if code == "D":
            deleted.append(path)
    return Commit(sha, parent, message, tuple(tests), tuple(sources), tuple(docs), tuple(deleted))


def diff(repo: str | Path, parent: str, sha: str, paths: tuple[str, ...]) -> str:
    """The change from `parent` to `sha` limited to `paths`, as a patch `git apply` takes (binary
    files included); empty when `paths` is."""
    if not paths:
        return ""
    return git(repo, "diff", "--binary", "--no-renames", "--full-index", parent, sha, "--", *paths)


def archive(repo: str | Path, rev: str, tar_path: Path) -> None:
    """The tree at `rev` (tracked files only, no history) as a tar file."""
    git(repo, "archive", "--format=tar", f"--output={tar_path}", rev)
