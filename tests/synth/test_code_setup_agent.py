"""The environment-setup agent's control flow, with scripted policies: an agent whose command
supplies the missing dependency gets the commit accepted; one that never does is stopped after
its turns and the commit is rejected as setup-failed; a failing policy ends it at once."""

import json

import pytest
from tiny_repos import Scripted, make_history, shim_history, site_packages

from dsv32.agent.policy import PolicyError
from dsv32.synth.code_miner import MineOptions, mine
from dsv32.synth.code_setup_agent import SetupAgent
from dsv32.synth.code_venv import STAMP, VenvOptions


def mine_with(agent, run_options, tmp_path):
    repo = tmp_path / "repo"
    shas = make_history(repo, shim_history())
    out = tmp_path / "out"
    options = MineOptions(run=run_options, venv=VenvOptions(fixer="scripted"), fixer=agent)
    rows = mine(repo, out, options=options)
    return next(r for r in rows if r["commit"] == shas[1]), out


def test_an_agent_that_supplies_the_missing_module_gets_the_commit_accepted(run_options, tmp_path):
    venv = (tmp_path / "out" / "venv").resolve()
    policy = Scripted(["ls repo", f"echo 'FIVE = 5' > {site_packages(venv)}/shimdep.py"])
    row, out = mine_with(SetupAgent(policy, max_turns=4), run_options, tmp_path)
    assert row["reason"] == "accepted", row
    assert row["f2p"] == ["tests.test_add::test_add"]
    assert len(policy.seen) == 2                      # it stopped at the turn after which the tests collect
    assert "shimdep" in policy.seen[0][1]["content"]  # the failed install's log was its first message
    stamp = json.loads((out / "venv" / STAMP).read_text())
    assert stamp["ok"] and stamp["detail"].startswith("fixed by the setup agent")


def test_an_agent_that_never_fixes_it_is_stopped_after_its_turns_and_the_commit_is_setup_failed(
        run_options, tmp_path):
    policy = Scripted(["true", "echo trying", "ls"])
    row, out = mine_with(SetupAgent(policy, max_turns=3), run_options, tmp_path)
    assert row["reason"] == "setup-failed" and "the setup agent did not fix it" in row["detail"]
    assert len(policy.seen) == 3
    assert "gave up after 3 turns" in json.loads((out / "venv" / STAMP).read_text())["log"]


def test_a_reply_without_commands_gets_the_collection_errors_back(run_options, tmp_path):
    policy = Scripted([])   # answers in words only
    mine_with(SetupAgent(policy, max_turns=2), run_options, tmp_path)
    assert len(policy.seen) == 2
    assert "do not collect" in policy.seen[1][-1]["content"] and "shimdep" in policy.seen[1][-1]["content"]


def test_a_failing_policy_ends_the_agent_at_once(run_options, tmp_path):
    policy = Scripted([PolicyError("the endpoint is down")])
    row, out = mine_with(SetupAgent(policy, max_turns=5), run_options, tmp_path)
    assert row["reason"] == "setup-failed" and len(policy.seen) == 1
    assert "the endpoint is down" in json.loads((out / "venv" / STAMP).read_text())["log"]


def test_no_turns_is_refused():
    with pytest.raises(ValueError, match="at least one turn"):
        SetupAgent(Scripted([]), max_turns=0)
