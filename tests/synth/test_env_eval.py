"""`dsv32 eval --tasks DIR/environments.jsonl`: a scripted policy's pass@k on trip environments,
each attempt graded by the environment's verifier, against pass@k worked out by hand."""

import json

import pytest
from env_policies import ByTask, behaviour_plan

import dsv32.synth.env_eval
from dsv32.cli import main as dsv32_main
from dsv32.synth.environment import read_index


def test_eval_on_an_environments_file_gives_the_pass_at_k_computed_by_hand(trip_envs, tmp_path, capsys, monkeypatch):
    policy = ByTask(behaviour_plan(trip_envs))
    seen = {}

    def endpoint(base_url, model, api_key, thinking_mode):
        seen.update(base_url=base_url, thinking_mode=thinking_mode)
        return policy

    monkeypatch.setattr(dsv32.synth.env_eval, "OpenAIPolicy", endpoint)
    out = tmp_path / "run"
    argv = ["eval", "--tasks", str(trip_envs / "environments.jsonl"), "--base-url", "http://endpoint/v1", "-n", "2",
            "-k", "1,2", "--seed", "0", "--out", str(out)]
    assert dsv32_main(argv) == 0
    assert seen == {"base_url": "http://endpoint/v1", "thinking_mode": "chat"}
    # per environment (c of n = 2): solve 2/2, fail 0/2, alternate 1/2 (attempt 0 solves, attempt 1 does not)
    # pass@1 = c/n: (1 + 0 + 0.5) / 3 = 0.5;  pass@2 = 1 - C(n-c, 2)/C(2, 2): (1 + 0 + 1) / 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass_at_k"]["1"]["mean"] == pytest.approx(0.5)
    assert summary["pass_at_k"]["2"]["mean"] == pytest.approx(2 / 3)
    results = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert {name: r["correct"] for name, r in results.items()} == {"trip-d1-s0": 2, "trip-d1-s1": 0, "trip-d1-s2": 1}
    failed = results["trip-d1-s1"]["samples"][0]
    assert failed["status"] == "wrong" and failed["extracted"] == "[]" and failed["score"] == 0.0
    assert "pass@1 = 0.5000" in capsys.readouterr().out
    calls = policy.calls
    assert dsv32_main(argv) == 0 and policy.calls == calls   # resumed: every environment is in results.jsonl


def test_a_folder_of_environments_is_read_as_its_index(trip_envs, tmp_path, monkeypatch):
    monkeypatch.setattr(dsv32.synth.env_eval, "OpenAIPolicy", lambda *a: ByTask(
        {r["task"]: "solve" for r in read_index(trip_envs)}))
    argv = ["eval", "--tasks", str(trip_envs), "--base-url", "http://endpoint/v1", "-n", "1",
            "--out", str(tmp_path / "r")]
    assert dsv32_main(argv) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["pass_at_k"]["1"]["mean"] == 1.0
