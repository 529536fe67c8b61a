"""`dsv32 synth code` mines a repository into a directory and prints the decisions by reason;
`--verify` prints the reward of a patch."""

import json

from dsv32.synth.cli import main
from dsv32.synth.code_cli import format_summary

from calc_history import HISTORY


def test_the_summary_counts_each_reason_once_and_totals_them():
    rows = [{"reason": r} for r in ("accepted", "f2p=0", "f2p=0", "p2f>0", "no-tests-changed")]
    table = format_summary(rows)
    assert "| accepted | F2P > 0, P2F = 0 | 1 |" in table and "| rejected | f2p=0 | 2 |" in table
    assert "| rejected | p2f>0 | 1 |" in table and "**5**" in table and "timeout" not in table


def test_the_command_mines_and_verifies(calc_repo, mined, run_options, tmp_path, capsys):
    repo, shas = calc_repo
    flags = ["--timeout", "60", "--memory-gb", "4", "--sandbox-root", run_options.sandbox_root]
    flags += ["--unsafe-no-sandbox"] if run_options.unsafe_no_sandbox else []
    assert main(["code", str(repo), "--out", str(tmp_path / "out"), "--limit", "3", *flags]) == 0
    table = capsys.readouterr().out
    assert "**3**" in table  # the three newest commits, no more
    env = mined[0] / "envs" / f"calc-{shas[1][:12]}"
    assert main(["code", "--verify", str(env), "--patch", str(env / "gold.patch"), *flags]) == 0
    assert json.loads(capsys.readouterr().out)["reward"] == 1.0
    assert len(HISTORY) == len(shas)
