"""Tiny git repositories written in a test: a list of commits, each a message and the files it
writes, so each test knows what its history must make the miner decide."""

from pathlib import Path

from calc_history import git

CALC = "def add(a, b):\n    return a - b\n"
CALC_FIXED = "def add(a, b):\n    return a + b\n"
TEST_ADD = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def make_history(path: Path, commits: list[tuple[str, dict[str, str]]]) -> list[str]:
    """Commit each (message, {path: text}) in a new repository at `path`; the shas, oldest first."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    shas = []
    for message, files in commits:
        for name, text in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", message)
        shas.append(git(path, "rev-parse", "HEAD"))
    return shas


def bug_fix_history(requirements: str, test: str = TEST_ADD) -> list[tuple[str, dict[str, str]]]:
    """A root commit with `requirements` as requirements.txt and add() broken; then its fix with a test."""
    return [("Start", {"calc.py": CALC, "requirements.txt": requirements, "tests/test_base.py": "def test_ok():\n"
                       "    pass\n"}),
            ("Fix add", {"calc.py": CALC_FIXED, "tests/test_add.py": test})]
