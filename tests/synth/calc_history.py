"""A small git repository whose history we wrote, so we know what the miner must decide for each
commit: a bug fix with its test, a docs change, a change that breaks a passing test, a test that
already passes, a test alone."""

import os
import subprocess
from pathlib import Path

CALC_V0 = '''\
def add(a, b):
    return a - b


def mul(a, b):
    return a * b
'''
TESTS_V0 = '''\
from calc import add, mul


def test_mul():
    assert mul(2, 3) == 6
'''
CALC_V1 = CALC_V0.replace("return a - b", "return a + b")
TESTS_V1 = TESTS_V0 + '''

def test_add():
    assert add(2, 3) == 5
'''
CALC_V3 = CALC_V1.replace("return a * b", "return a * b if a != 2 else 0") + '''

def sub(a, b):
    return a - b
'''
TEST_SUB = '''\
from calc import sub


def test_sub():
    assert sub(5, 3) == 2
'''
CALC_V4 = CALC_V3.replace("def mul(a, b):", "def mul(a, b):  # a product")
TESTS_V4 = TESTS_V1 + '''

def test_mul_zero():
    assert mul(0, 5) == 0
'''
TESTS_V5 = TESTS_V4 + '''

def test_add_zero():
    assert add(0, 7) == 7
'''

# (message, {path: text}, the decision the miner must make)
HISTORY = [
    ("Start: add and mul", {"calc.py": CALC_V0, "tests/test_calc.py": TESTS_V0}, "no-parent"),
    ("Fix add: it subtracted\n\nadd(2, 3) returned -1.", {"calc.py": CALC_V1, "tests/test_calc.py": TESTS_V1},
     "accepted"),
    ("Docs: a README", {"README.md": "# calc\n"}, "no-tests-changed"),
    ("Add sub", {"calc.py": CALC_V3, "tests/test_sub.py": TEST_SUB}, "p2f>0"),  # and break mul(2, 3)
    ("Test mul by zero", {"calc.py": CALC_V4, "tests/test_calc.py": TESTS_V4}, "f2p=0"),
    ("Test add of zero", {"tests/test_calc.py": TESTS_V5}, "no-source-changed"),
]

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_AUTHOR_DATE": "2025-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2025-01-01T00:00:00Z"}


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


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


def make_repo(path: Path) -> list[str]:
    """Write HISTORY as commits in a new repository at `path`; their shas, oldest first."""
    return make_history(path, [(message, files) for message, files, _ in HISTORY])
