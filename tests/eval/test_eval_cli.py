"""`dsv32 eval` end to end on a random tiny model: n=2 samples of 2 JSONL tasks through our engine,
the files written, and the report's numbers recomputed from the results file."""

import json

import pytest

from dsv32.cli import main
from dsv32.eval.passk import pass_at_k


def test_dsv32_eval_writes_results_and_a_report_that_agrees_with_them(tmp_path, tokenizer_dir, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "a", "prompt": "1+1?", "answer": "2"}) + "\n"
                     + json.dumps({"id": "b", "prompt": "Name a colour.", "answer": "red", "grader": "exact"}) + "\n")
    out = tmp_path / "run"
    argv = ["eval", "--tasks", str(tasks), "--model", "tiny", "--tokenizer", str(tokenizer_dir), "--device", "cpu",
            "--dtype", "float32", "--num-blocks", "32", "-n", "2", "-k", "1,2", "--max-tokens", "6", "--out", str(out)]
    assert main(argv) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b"] and all(len(r["samples"]) == r["n"] == 2 for r in records)
    assert all(s["finish_reason"] in ("stop", "length") and s["num_tokens"] <= 6 for r in records for s in r["samples"])
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    for k in (1, 2):
        values = [pass_at_k(r["n"], sum(s["status"] == "correct" for s in r["samples"]), k) for r in records]
        mean = sum(values) / 2
        assert summary["pass_at_k"][str(k)]["mean"] == pytest.approx(mean)
        assert f"| {k} | {mean:.4f} |" in report
    statuses = [s["status"] for r in records for s in r["samples"]]
    assert summary["verdicts"] == {v: statuses.count(v) for v in summary["verdicts"]}
    assert "pass@1 = " in capsys.readouterr().out
    assert main(argv) == 0  # a rerun resumes: nothing left to sample, the same lines
    assert [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()] == records


def test_dsv32_eval_refuses_bad_k_and_k_beyond_n(tmp_path, tokenizer_dir, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n")
    base = ["eval", "--tasks", str(tasks), "--base-url", "http://127.0.0.1:9/v1", "-n", "2", "--out", str(tmp_path / "o")]
    assert main(base + ["-k", "one"]) == 2 and "comma-separated integers" in capsys.readouterr().err
    assert main(base + ["-k", "1,4"]) == 2 and "1 <= k <= n, got k=1,4 with n=2" in capsys.readouterr().err


def test_dsv32_eval_runs_the_ioi_protocol_on_problems(tmp_path, tokenizer_dir, capsys):
    """The random tiny model never closes its thinking: both candidates are over length, none is
    submitted, and the problem scores 0 of its 100 points."""
    problems = tmp_path / "ioi.jsonl"
    problems.write_text(json.dumps({"id": "p", "prompt": "Print 1.", "samples": [{"input": "", "output": "1"}],
                                    "subtasks": [{"points": 100, "tests": [{"input": "", "output": "1"}]}]}) + "\n")
    out = tmp_path / "ioi"
    argv = ["eval", "--protocol", "ioi", "--tasks", str(problems), "--model", "tiny", "--tokenizer", str(tokenizer_dir),
            "--device", "cpu", "--dtype", "float32", "--num-blocks", "32", "-n", "2", "--max-tokens", "4",
            "--thinking", "--out", str(out)]
    assert main(argv) == 0
    [record] = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [c["within_length"] for c in record["candidates"]] == [False, False] and record["submitted"] == []
    assert record["score"] == 0.0 and "IOI score 0 of 100" in capsys.readouterr().out


def test_dsv32_eval_refuses_code_tasks_without_bubblewrap_unless_unsafe(tmp_path, capsys, monkeypatch):
    tasks = tmp_path / "code.jsonl"
    tasks.write_text(json.dumps({"prompt": "Print 1.", "grader": "code", "tests": "assert True"}) + "\n")
    monkeypatch.setattr("shutil.which", lambda name: None)
    argv = ["eval", "--tasks", str(tasks), "--base-url", "http://127.0.0.1:9/v1", "-n", "1", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "bubblewrap ('bwrap') was not found" in capsys.readouterr().err
