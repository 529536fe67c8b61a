"""`dsv32 agent` end to end: a tiny model (steered to call bash, see steered.py) runs a command in the
sandbox and answers; without bubblewrap the code tools are refused before any model loads, and
`--unsafe-no-sandbox` runs them unisolated with a warning."""

import json
import shutil
from types import SimpleNamespace

import pytest

import dsv32.agent.cli as agent_cli
from dsv32.agent.bash_tool import BashTool
from dsv32.chat import EOS, THINK_END, render_tool_calls
from dsv32.cli import main as dsv32_main
from dsv32.loader import load

from steered import layout, prompt_ids, steered, tiny_dir

TASK = "Write hello to a file and read it back."
COMMAND = "echo hello > f.txt && cat f.txt"
RESULT = "hello\n[exit code 0]"


def bash_schema(isolated: bool) -> dict:
    """The bash tool's schema as the CLI builds it (its description says whether it is sandboxed)."""
    return BashTool(SimpleNamespace(isolated=isolated)).schema()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_dir(tmp_path_factory.mktemp("tiny"), [bash_schema(True)])
    model, tok = load(path, dtype="float32", device="cpu")
    return path, model, tok


def steer_cli(monkeypatch, tiny, isolated: bool):
    """Make the CLI's `load` return the model steered to call bash once, read the result, answer."""
    path, model, tok = tiny
    m = steered(model, tok)
    call = {"type": "function", "function": {"name": "bash", "arguments": {"command": COMMAND}}}
    m.steer(tok, layout(tok, prompt_ids(tok, [{"role": "user", "content": TASK}], [bash_schema(isolated)]), [
        (3, THINK_END + render_tool_calls([call]) + EOS, [RESULT]),
        (3, THINK_END + "The file says hello." + EOS, [])]))
    loaded = []
    monkeypatch.setattr(agent_cli.loader, "load", lambda source, **kw: loaded.append(source) or (m, tok))
    return str(path), loaded


ARGS = ["--tools", "bash", "--max-new-tokens", "128", "--seed", "0", "--device", "cpu"]


def test_the_cli_runs_a_tiny_model_that_calls_bash_in_the_sandbox(monkeypatch, tiny, make_sandbox, tmp_path, capsys):
    make_sandbox("probe")                       # skips where bubblewrap cannot start
    path, loaded = steer_cli(monkeypatch, tiny, isolated=True)
    saved = tmp_path / "episode.json"
    rc = dsv32_main(["agent", TASK, "--model", path, *ARGS, "--workdir", str(tmp_path / "w"), "--save", str(saved)])
    out = capsys.readouterr().out
    assert rc == 0 and loaded == [path]
    assert f'-> bash {{"command": "{COMMAND}"}}' in out and "<- hello\n   [exit code 0]" in out
    assert "--- end: answer; 2 steps, 1 tool calls" in out and out.rstrip().endswith("The file says hello.")
    episode = json.loads(saved.read_text())
    assert episode["end"] == "answer" and [m["role"] for m in episode["log"]] == ["user", "assistant", "tool",
                                                                                  "assistant"]
    assert episode["log"][2]["content"] == RESULT
    (task_dir,) = (tmp_path / "w").glob("task-*")    # --workdir keeps the task directory
    assert (task_dir / "work" / "f.txt").read_text() == "hello\n"


def test_without_bubblewrap_the_code_tools_are_refused_unless_unsafe_no_sandbox(monkeypatch, tiny, tmp_path, capsys):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **kw: None if cmd == "bwrap" else real_which(cmd, *a, **kw))
    path, loaded = steer_cli(monkeypatch, tiny, isolated=False)
    rc = dsv32_main(["agent", TASK, "--model", path, *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and loaded == []             # refused before any model is loaded
    assert "bubblewrap ('bwrap') was not found" in err and "--unsafe-no-sandbox" in err
    rc = dsv32_main(["agent", TASK, "--model", path, *ARGS, "--unsafe-no-sandbox", "--workdir", str(tmp_path)])
    captured = capsys.readouterr()
    assert "WARNING: --unsafe-no-sandbox" in captured.err and "<- hello\n   [exit code 0]" in captured.out
    assert rc == 0 and loaded == [path] and captured.out.rstrip().endswith("The file says hello.")


def test_the_cli_names_what_is_missing(capsys):
    assert agent_cli.main(["task", "--model", "tiny", "--tools", "bash,web"]) == 2
    assert "unknown tool(s) web" in capsys.readouterr().err
    assert agent_cli.main(["task", "--model", "tiny", "--tools", "search"]) == 2
    assert "--corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):             # a model or an endpoint is required
        agent_cli.main(["task"])
