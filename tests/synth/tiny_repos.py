"""Tiny git repositories written in a test: a list of commits, each a message and the files it
writes, so each test knows what its history must make the miner decide."""

import json
import shlex
from pathlib import Path

from calc_history import git, make_history  # noqa: F401 (tests import it from here)

from dsv32.agent.policy import Reply

CALC = "def add(a, b):\n    return a - b\n"
CALC_FIXED = "def add(a, b):\n    return a + b\n"
TEST_ADD = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def bug_fix_history(requirements: str, test: str = TEST_ADD) -> list[tuple[str, dict[str, str]]]:
    """A root commit with `requirements` as requirements.txt and add() broken; then its fix with a test."""
    return [("Start", {"calc.py": CALC, "requirements.txt": requirements, "tests/test_base.py": "def test_ok():\n"
                       "    pass\n"}),
            ("Fix add", {"calc.py": CALC_FIXED, "tests/test_add.py": test})]

CALC_MUL = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
TEST_MUL = "from calc import add, mul\n\n\ndef test_mul():\n    assert mul(2, 3) == 6\n"
# the test patch makes the module import div, which the parent lacks: before the fix the whole
# module fails to import, so test_mul is absent from the before-run
TEST_MUL_DIV = TEST_MUL.replace("add, mul", "add, div, mul") + "\n\ndef test_div():\n    assert div(6, 3) == 2\n"
DIV = "\n\ndef div(a, b):\n    return a / b\n"


def hidden_test_history(break_mul: bool) -> list[tuple[str, dict[str, str]]]:
    """mul and its test; then div with a test in the same module, the fix breaking mul or not."""
    source = CALC_MUL.replace("return a * b", "return a * b + 1") if break_mul else CALC_MUL
    return [("Start", {"calc.py": CALC_MUL, "tests/test_calc.py": TEST_MUL}),
            ("Add div", {"calc.py": source + DIV, "tests/test_calc.py": TEST_MUL_DIV})]


def flaky_history(mark: Path) -> list[tuple[str, dict[str, str]]]:
    """A fix whose new test passes once and then fails: it passes only while `mark` (a file
    outside the repository, created by the first run that gets past the assertion) is absent."""
    test = (f"from pathlib import Path\n\nfrom calc import add\n\nMARK = Path({str(mark)!r})\n\n\n"
            "def test_add():\n    assert add(2, 3) == 5\n    first = not MARK.exists()\n    MARK.touch()\n"
            "    assert first\n")
    return bug_fix_history("", test)


# the dependency is declared and imported by the tests at every commit, and no index has it
REQUIREMENTS = "shimdep==1.0\n"
TEST_ADD = "import shimdep\nfrom calc import add\n\n\ndef test_add():\n    assert add(2, 3) == shimdep.FIVE\n"


def shim_history() -> list[tuple[str, dict[str, str]]]:
    """The bug fix, with a dependency (shimdep) that requirements.txt declares and no index has."""
    commits = bug_fix_history(REQUIREMENTS, TEST_ADD)
    commits[0][1]["tests/test_base.py"] = "import shimdep\n\n\ndef test_ok():\n    assert shimdep.FIVE == 5\n"
    return commits


class Scripted:
    """A policy that returns the bash commands it was given, one turn each, then a plain answer;
    keeps the messages of every call."""

    context_window = 1_000_000

    def __init__(self, commands):
        self.commands, self.seen = list(commands), []

    def count(self, messages, tools):
        return 0

    def __call__(self, messages, tools, sampling):
        self.seen.append([dict(m) for m in messages])
        if not self.commands:
            return Reply({"role": "assistant", "content": "I cannot fix it.", "reasoning_content": "",
                          "tool_calls": []}, "", "stop", 0, 0)
        cmd = self.commands.pop(0)
        if isinstance(cmd, Exception):
            raise cmd
        call = {"id": f"c{len(self.seen)}", "type": "function",
                "function": {"name": "bash", "arguments": json.dumps({"command": cmd})}}
        return Reply({"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [call]},
                     "", "stop", 0, 0)


def site_packages(venv: Path) -> str:
    """A shell word that expands to the venv's site-packages."""
    python = shlex.quote(str(venv / "bin" / "python"))
    return f"$({python} -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"


def counted_history(counter: Path) -> list[tuple[str, dict[str, str]]]:
    """The bug fix, beside a test at the parent that passes on its first three runs only: it
    counts its runs in `counter`, a file outside the repository."""
    test = (f"from pathlib import Path\n\nCOUNTER = Path({str(counter)!r})\n\n\ndef test_counted():\n"
            "    n = int(COUNTER.read_text()) if COUNTER.exists() else 0\n    COUNTER.write_text(str(n + 1))\n"
            "    assert n < 3\n")
    commits = bug_fix_history("")
    commits[0][1]["tests/test_counted.py"] = test
    return commits
