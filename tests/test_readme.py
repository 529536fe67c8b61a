"""The README's commands run as written: every fenced block marked `<!-- runnable -->` (an HTML
comment on the line before it) runs in an empty directory holding `corpus/`, its `dsv32 ...`
lines through the command's own entry point and its Python blocks by Python. The README keeps
these blocks at tiny sizes so they run on a CPU."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

from dsv32.cli import main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- runnable -->\n```(\w+)\n(.*?)```", re.S)


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    return BLOCK.findall(text)


def commands(block: str) -> list[list[str]]:
    """The shell lines of a block (continuations joined, comments dropped), split as a shell would."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def test_the_marker_finds_the_blocks_it_should():
    text = "x\n<!-- runnable -->\n```bash\ndsv32 a \\\n  --b 1  # note\n```\n```bash\nnot me\n```\n"
    assert [(lang, commands(body)) for lang, body in runnable_blocks(text)] == [("bash", [["dsv32", "a", "--b", "1"]])]


BLOCKS = runnable_blocks((ROOT / "README.md").read_text())


def test_the_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 4 and {lang for lang, _ in BLOCKS} == {"bash", "python"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    (work / "corpus").mkdir()
    for f in ("rope.py", "mla.py", "indexer.py"):  # a little real text
        shutil.copy(ROOT / "dsv32" / "model" / f, work / "corpus" / f)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("lang,body", BLOCKS, ids=[f"block{i}-{lang}" for i, (lang, _) in enumerate(BLOCKS)])
def test_a_runnable_readme_block_runs_as_written(lang, body, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    if lang == "python":
        exec(compile(body, "README.md", "exec"), {})
        return
    for argv in commands(body):
        assert argv[0] == "dsv32", f"a runnable block runs dsv32 commands only: {argv}"
        assert main(argv[1:]) == 0, shlex.join(argv)
