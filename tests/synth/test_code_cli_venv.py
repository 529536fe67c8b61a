"""`dsv32 synth code --venv` and `--setup-agent`: the flags reach the miner, and bad combinations
are refused before anything runs."""

import json

import pytest
from tiny_repos import (
    Scripted,
    bug_fix_history,
    make_history,
    shim_history,
    site_packages,
)

import dsv32.agent.policy
from dsv32.synth.cli import main
from dsv32.synth.code_venv import STAMP


def flags(run_options):
    out = ["--timeout", "60", "--memory-gb", "4", "--sandbox-root", run_options.sandbox_root]
    return out + (["--unsafe-no-sandbox"] if run_options.unsafe_no_sandbox else [])


@pytest.mark.parametrize("argv, message", [
    (["--setup-agent", "--base-url", "http://x/v1"], "add --venv"),
    (["--find-links", "."], "add --venv"),
    (["--venv-inherit"], "add --venv"),
    (["--venv", "--setup-agent"], "needs --base-url"),
    (["--venv", "--find-links", "no/such/folder"], "not a folder"),
    (["--repeat", "0"], "repeat must be at least 1"),
])
def test_bad_flag_combinations_are_refused(argv, message, run_options, tmp_path, capsys):
    assert main(["code", str(tmp_path), "--out", str(tmp_path / "out"), *argv, *flags(run_options)]) == 2
    assert message in capsys.readouterr().err


def test_venv_mining_of_a_repository_with_a_missing_dependency_reports_setup_failed(run_options, tmp_path, capsys):
    repo = tmp_path / "repo"
    make_history(repo, bug_fix_history("nosuchdep-dsv32-test\n"))
    assert main(["code", str(repo), "--out", str(tmp_path / "out"), "--venv", *flags(run_options)]) == 0
    table = capsys.readouterr().out
    assert "| rejected | setup-failed | 1 |" in table and "| rejected | no-parent | 1 |" in table


def test_the_setup_agent_flags_drive_a_policy_at_the_endpoint(run_options, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    make_history(repo, shim_history())
    out = tmp_path / "out"
    policy = Scripted([f"echo 'FIVE = 5' > {site_packages((out / 'venv').resolve())}/shimdep.py"])
    policy.model = "scripted-model"
    seen = {}

    def endpoint(base_url, model, **kwargs):
        seen.update(base_url=base_url, model=model)
        return policy

    monkeypatch.setattr(dsv32.agent.policy, "OpenAIPolicy", endpoint)
    argv = ["code", str(repo), "--out", str(out), "--venv", "--setup-agent", "--base-url", "http://endpoint/v1",
            "--model", "scripted-model", "--setup-turns", "2", *flags(run_options)]
    assert main(argv) == 0
    assert seen == {"base_url": "http://endpoint/v1", "model": "scripted-model"}
    assert "| accepted | F2P > 0, P2F = 0 | 1 |" in capsys.readouterr().out
    stamp = json.loads((out / "venv" / STAMP).read_text())
    assert stamp["ok"] and stamp["options"]["fixer"] == "http://endpoint/v1 scripted-model"
