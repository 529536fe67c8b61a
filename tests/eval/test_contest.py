"""The IOI/ICPC protocol on real candidates: a scripted sampler answers one problem (print
1 + 2 + ... + n) with hand-written replies; their programs run in the sandbox; the expected
filtering, submissions and scores are worked out by hand below."""

import json

import pytest
from scripted_sampler import Scripted

from dsv32.eval.contest import judge_problem, load_problems, refuses, run_contest
from dsv32.eval.sample import Sample, SamplingConfig
from dsv32.eval.tasks import TaskError

PROBLEM = {"id": "sum", "prompt": "Print 1 + 2 + ... + n.", "samples": [{"input": "3\n", "output": "6\n"}],
           "subtasks": [{"points": 30, "tests": [{"input": "1", "output": "1"}, {"input": "10", "output": "55"}]},
                        {"points": 70, "tests": [{"input": "1000000", "output": "500000500000"},
                                                 {"input": "10000", "output": "50005000"}]}],
           "time_limit": 1}

READ = "n = int(input())\n"
RIGHT = READ + "print(n * (n + 1) // 2)\n"
SMALL_ONLY = READ + "print(sum(range(min(n, 100) + 1)))\n"             # right for n <= 100: subtask 1
LARGE_ONLY = READ + "print(n * (n + 1) // 2 if n == 3 or n > 100 else 0)\n"  # sample and subtask 2
ECHO = READ + "print(n)\n"                                             # fails the sample


def reply(think: int, program: str | None, prose: str = "Solution:", closed: bool = True) -> str:
    text = "t" * think
    if not closed:
        return text
    return text + "</think>" + prose + (f"\n```python\n{program}```\n" if program else "")


# id, (thinking chars, program, prose, thinking closed), finish reason
SCRIPT = [
    ("c0", reply(100, RIGHT), "stop"),                   # survives, full marks
    ("c1", reply(500, SMALL_ONLY), "stop"),              # survives, subtask 1 only
    ("c2", reply(900, ECHO), "stop"),                    # fails the sample test
    ("c3", reply(800, RIGHT), "length"),                 # over length (hit the token limit)
    ("c4", reply(700, RIGHT, "I cannot fully solve this; a partial attempt:"), "stop"),  # refuses
    ("c5", reply(1000, None, closed=False), "length"),   # thinking never closed
    ("c6", reply(300, LARGE_ONLY), "stop"),              # survives, subtask 2 only
]
# Survivors by thinking length: c1 (500), c6 (300), c0 (100).


@pytest.fixture
def problem(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(PROBLEM) + "\n")
    return load_problems(path)[0]


def samples():
    return [Sample(text, reason, len(text)) for _, text, reason in SCRIPT]


def test_the_filter_keeps_what_passes_the_sample_within_length_without_refusing(judge, problem):
    r = judge_problem(judge, problem, samples(), "ioi", thinking=True, submissions=50)
    flags = {c["id"].split("#")[1]: (c["passes_samples"], c["within_length"], c["refused"]) for c in r["candidates"]}
    assert flags == {"0": (True, True, False), "1": (True, True, False), "2": (False, True, False),
                     "3": (True, False, False), "4": (True, True, True), "5": (False, False, False),
                     "6": (True, True, False)}
    assert r["submitted"] == ["sum#1", "sum#6", "sum#0"]  # longest thinking first


def test_ioi_scores_each_subtask_by_its_best_submission(judge, problem):
    # limit 1: c1 alone, subtask 1 only: 30. limit 2: c1 + c6 cover both subtasks: 30 + 70 = 100.
    one = judge_problem(judge, problem, samples(), "ioi", thinking=True, submissions=1)
    assert (one["submitted"], one["score"]) == (["sum#1"], 30.0)
    two = judge_problem(judge, problem, samples(), "ioi", thinking=True, submissions=2)
    assert two["score"] == 100.0
    scores = {c["id"]: c["subtask_scores"] for c in two["candidates"] if c["subtask_scores"] is not None}
    assert scores == {"sum#1": [1.0, 0.0], "sum#6": [0.0, 1.0]}


def test_icpc_counts_attempts_up_to_the_first_accepted_submission(judge, problem):
    # c1 (fails subtask 2), c6 (fails subtask 1), c0 (passes all): solved at the third attempt.
    r = judge_problem(judge, problem, samples(), "icpc", thinking=True)
    assert (r["solved"], r["attempts"]) == (True, 3)
    r = judge_problem(judge, problem, samples()[1:], "icpc", thinking=True)  # without c0
    assert (r["solved"], r["attempts"]) == (False, 2)


def test_a_contest_run_writes_resumes_and_totals(judge, problem, tmp_path):
    other = {**PROBLEM, "id": "echo", "subtasks": [{"points": 100, "tests": [{"input": "4", "output": "4"}]}],
             "samples": [{"input": "3", "output": "3"}]}
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps(PROBLEM) + "\n" + json.dumps(other) + "\n")
    problems = load_problems(path)
    texts = {"sum": [(t, r) for _, t, r in SCRIPT], "echo": [(reply(10, ECHO), "stop"), (reply(20, RIGHT), "stop")]}
    cfg = SamplingConfig(n=7)
    first = Scripted(texts)
    run_contest(problems[:1], first, cfg, tmp_path / "out", "ioi", judge, submissions=2)
    again = Scripted(texts)
    summary = run_contest(problems, again, cfg, tmp_path / "out", "ioi", judge, submissions=2)
    assert (first.asked, again.asked) == (["sum"], ["echo"])
    # sum: 100 of 100; echo: ECHO passes its sample and its test, RIGHT fails the sample: 100 of 100
    assert (summary["score"], summary["max_score"]) == (200.0, 200.0)
    assert (summary["candidates"], summary["failed_samples"], summary["refused"]) == (9, 3, 1)
    assert "IOI score 200 of 200" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValueError, match="judged under \\['ioi'\\], not icpc"):
        run_contest(problems, again, cfg, tmp_path / "out", "icpc", judge)


def test_the_refusal_heuristic_reads_the_prose_not_the_code():
    assert refuses("I can't solve this within the limits.") and refuses("We are unable to find a full solution")
    assert not refuses("We cannot use recursion here, so we iterate.\n```python\nprint(1)\n```")
    assert not refuses("Solution:\n```python\n# I cannot solve this part\nprint(1)\n```")


def test_bad_problems_are_refused_with_file_line_and_reason(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({**PROBLEM, "subtasks": [{"points": 10, "tests": "assert True"}]}) + "\n")
    with pytest.raises(TaskError, match=r"p.jsonl:1: subtask 0: 'tests': expected stdin/stdout cases"):
        load_problems(path)
    path.write_text(json.dumps({**PROBLEM, "subtasks": [{"tests": PROBLEM["samples"]}]}) + "\n")
    with pytest.raises(TaskError, match=r"p.jsonl:1: subtask 0: 'points' must be a number >= 0"):
        load_problems(path)
