"""`dsv32 synth general --solvability-k`: an environment the policy solves is kept, one it never
solves leaves the index for dropped.jsonl as `unsolved`, with pass@k from dsv32.eval.passk."""

import json

from env_policies import BEHAVIOUR, ByTask, behaviour_plan

import dsv32.agent.policy
from dsv32.engine import SamplingParams
from dsv32.synth.cli import main
from dsv32.synth.environment import read_index
from dsv32.synth.rl_env import EnvironmentRunner
from dsv32.synth.solvability import environment_solvability


def test_pass_at_k_per_environment_counts_the_attempts_the_verifier_passes(trip_envs):
    policy, runner = ByTask(behaviour_plan(trip_envs)), EnvironmentRunner()
    dirs = [str(trip_envs / name) for name in BEHAVIOUR]
    got = environment_solvability(dirs, policy, runner, k=1, n=4, sampling=SamplingParams(max_tokens=4096, seed=0))
    runner.close()
    assert [(s.correct, s.n) for s in got] == [(4, 4), (0, 4), (2, 4)]   # attempts 0 and 2 of the third solve it
    assert [s.pass_at_k for s in got] == [1.0, 0.0, 0.5]                   # c/n for k = 1
    assert got[1].answers == ("[]",) * 4 and not got[1].kept


def test_the_command_keeps_the_solved_environments_and_drops_the_unsolved_one(trip_envs, capsys, monkeypatch):
    policy = ByTask(behaviour_plan(trip_envs))
    monkeypatch.setattr(dsv32.agent.policy, "OpenAIPolicy", lambda *args, **kwargs: policy)
    argv = ["general", "--family", "trip", "--n", "3", "--difficulty", "1", "--out", str(trip_envs),
            "--solvability-k", "2", "--solver-base-url", "http://endpoint/v1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| kept | 2 |" in printed and "| dropped: unsolved | 1 |" in printed
    assert [r["name"] for r in read_index(trip_envs)] == ["trip-d1-s0", "trip-d1-s2"]
    dropped = [json.loads(line) for line in (trip_envs / "dropped.jsonl").read_text().splitlines()]
    assert [(d["name"], d["reason"], d["pass_at_k"]) for d in dropped] == [("trip-d1-s1", "unsolved", 0.0)]
    checked = {r["name"]: r for r in map(json.loads, (trip_envs / "solvability.jsonl").read_text().splitlines())}
    assert checked["trip-d1-s2"]["correct"] == 1 and checked["trip-d1-s2"]["pass_at_k"] == 1.0  # 1 - C(1,2)/C(2,2)
    calls = policy.calls
    assert main(argv) == 0                      # resumed: nothing generated, nothing attempted again
    assert policy.calls == calls and [r["name"] for r in read_index(trip_envs)] == ["trip-d1-s0", "trip-d1-s2"]
    assert "nothing new" in capsys.readouterr().out


def test_the_filter_needs_a_policy(tmp_path, capsys):
    argv = ["general", "--family", "trip", "--n", "1", "--out", str(tmp_path / "o"), "--solvability-k", "2"]
    assert main(argv) == 2 and "--solver-base-url" in capsys.readouterr().err
