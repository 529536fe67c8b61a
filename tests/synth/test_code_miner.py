"""The miner decides each commit of a history we wrote the way we know it must."""

import json

from dsv32.synth.code_miner import mine, read_jsonl
from dsv32.synth.code_task import CodeTask

from calc_history import HISTORY


def by_commit(rows):
    return {row["commit"]: row for row in rows}


def test_every_commit_gets_the_decision_its_history_calls_for(mined, calc_repo):
    _, shas = calc_repo
    _, rows = mined
    decided = by_commit(rows)
    assert len(rows) == len(HISTORY)
    assert [decided[sha]["reason"] for sha in shas] == [want for _, _, want in HISTORY]


def test_the_bug_fix_is_accepted_with_its_new_test_as_the_only_f2p(mined, calc_repo):
    out, rows = mined
    row = by_commit(rows)[calc_repo[1][1]]
    assert row["accepted"] and row["f2p"] == ["tests.test_calc::test_add"] and row["p2f"] == []
    task = CodeTask.load(out / row["task"]["env"])
    assert task.f2p == ["tests.test_calc::test_add"]
    assert task.p2p == ["tests.test_calc::test_mul"]
    assert task.parent == calc_repo[1][0] and task.issue.startswith("Fix add: it subtracted")
    assert task.test_paths == ["tests/test_calc.py"]


def test_the_commit_that_breaks_mul_is_rejected_naming_the_broken_test(mined, calc_repo):
    row = by_commit(mined[1])[calc_repo[1][3]]
    assert row["f2p"] == ["tests.test_sub::test_sub"]      # it would have had a fail-to-pass test...
    assert row["p2f"] == ["tests.test_calc::test_mul"]      # ...but mul(2, 3) now returns 0


def test_only_accepted_tasks_are_in_tasks_jsonl_and_envs(mined, calc_repo):
    out, rows = mined
    tasks = read_jsonl(out / "tasks.jsonl")
    assert [t["commit"] for t in tasks] == [calc_repo[1][1]]
    assert sorted(p.name for p in (out / "envs").iterdir()) == [tasks[0]["id"]]
    env = out / tasks[0]["env"]
    assert sorted(p.name for p in env.iterdir()) == ["gold.patch", "repo.tar", "task.json", "test.patch"]
    gold, test = (env / "gold.patch").read_text(), (env / "test.patch").read_text()
    assert "diff --git a/calc.py" in gold and "tests/" not in gold
    assert "diff --git a/tests/test_calc.py" in test and "diff --git a/calc.py" not in test


def test_a_run_stopped_after_two_commits_resumes_without_deciding_any_commit_twice(calc_repo, mine_options, mined,
                                                                                  tmp_path):
    repo, shas = calc_repo
    first = mine(repo, tmp_path, limit=2, options=mine_options)
    assert len(first) == 2
    final = mine(repo, tmp_path, options=mine_options)
    commits = [row["commit"] for row in final]
    assert len(commits) == len(set(commits)) == len(shas)

    def decisions(rows):
        return {r["commit"]: (r["reason"], r.get("f2p"), r.get("p2f")) for r in rows}

    assert decisions(final) == decisions(mined[1])
    assert [t["commit"] for t in read_jsonl(tmp_path / "tasks.jsonl")] == [shas[1]]


def test_a_line_cut_off_by_a_kill_is_dropped_and_its_commit_decided_again(calc_repo, mine_options, tmp_path):
    repo, shas = calc_repo
    mine(repo, tmp_path, limit=1, options=mine_options)  # the newest commit: no-source-changed
    path = tmp_path / "decisions.jsonl"
    whole = path.read_text()
    path.write_text(whole + json.dumps({"commit": shas[-2], "reason": "f2p=0"})[:20])  # killed mid-line
    rows = mine(repo, tmp_path, limit=1, options=mine_options)
    assert [r["commit"] for r in rows] == [shas[-1], shas[-2]] and rows[1]["reason"] == "f2p=0"


def test_an_accepted_task_whose_decision_line_was_lost_is_recorded_not_mined_again(calc_repo, mine_options, mined,
                                                                                   tmp_path):
    repo, shas = calc_repo
    out, _ = mined
    (tmp_path / "tasks.jsonl").write_text((out / "tasks.jsonl").read_text())  # killed between the two appends
    rows = mine(repo, tmp_path, limit=0, options=mine_options)
    assert [(r["commit"], r["reason"]) for r in rows] == [(shas[1], "accepted")]
