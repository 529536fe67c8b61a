"""Code grading in the sandbox: right programs pass, wrong ones fail, and a loop, a huge
allocation or a connection to the host are contained and graded as failures. Expected verdicts
are written out by hand for each program; the network oracle is a listener of ours on the host."""

import json
import shutil
import socket

import pytest
from scripted_sampler import Scripted

from dsv32.agent.sandbox import SandboxError
from dsv32.eval.code import (
    CaseFormatError,
    CodeJudge,
    check_tests,
    extract_program,
    grade_code,
    same_output,
)
from dsv32.eval.run import run_eval
from dsv32.eval.sample import SamplingConfig
from dsv32.eval.tasks import TaskError, load_tasks

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
JUDGE_TIME_LIMIT = 1.0  # seconds per test, for the `judge` fixture (conftest)
CASES = [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 5\n", "output": "0"}, {"input": "10 20", "output": "30"}]


def reply(program: str, lang: str = "python") -> str:
    return f"thinking about it</think>Here is my solution:\n```{lang}\n{program}```\n"


def test_the_program_is_the_last_fenced_block_of_the_answer():
    assert extract_program("```\nfirst\n```\ntext\n```cpp\nsecond\n```") == "second\n"
    assert extract_program("no code here") is None


def test_outputs_are_compared_token_by_token():
    assert same_output("3 4\n5\n\n", "3\n4 5")
    assert not same_output("3 4", "3 4 5") and not same_output("34", "3 4")


def test_malformed_tests_are_refused_naming_the_case():
    with pytest.raises(CaseFormatError, match=r"test 1: expected \{\"input\": str, \"output\": str\}"):
        check_tests([{"input": "", "output": ""}, {"input": "1"}])
    with pytest.raises(CaseFormatError, match="non-empty list"):
        check_tests([])


def test_a_correct_program_passes_every_stdin_stdout_case(judge):
    g = grade_code(judge, reply(ADD), CASES)
    assert (g.status, g.score, g.tests) == ("correct", 1.0, ("passed",) * 3)
    assert g.extracted == ADD


def test_a_wrong_program_fails_the_cases_it_gets_wrong(judge):
    g = grade_code(judge, reply("a, b = map(int, input().split())\nprint(abs(a) + b)\n"), CASES)
    # by hand: |1|+2 = 3 right, |-5|+5 = 10 wrong, |10|+20 = 30 right
    assert (g.status, g.tests) == ("wrong", ("passed", "wrong_answer", "passed"))
    assert g.score == pytest.approx(2 / 3) and "test 1: wrong_answer printed '10\\n', expected '0'" in g.detail


def test_asserts_are_one_test_run_after_the_program(judge):
    program = "def add(a, b):\n    return a + b\n"
    assert grade_code(judge, reply(program), "assert add(2, 3) == 5").tests == ("passed",)
    g = grade_code(judge, reply(program), "assert add(2, 3) == 6")
    assert g.tests == ("runtime_error",) and "AssertionError" in g.detail


def test_an_infinite_loop_is_a_time_limit_verdict(judge):
    g = grade_code(judge, reply("while True:\n    pass\n"), CASES[:1])
    assert (g.status, g.tests) == ("wrong", ("time_limit",))
    assert grade_code(judge, reply(ADD), CASES[:1]).correct  # the judge still works after the kill


def test_a_huge_allocation_is_a_runtime_error(judge):
    g = grade_code(judge, reply("x = bytearray(8 * 2**30)\nprint(3)\n"), CASES[:1])
    assert g.tests == ("runtime_error",) and "MemoryError" in g.detail


def test_a_connection_to_the_host_fails_inside_and_reaches_nothing(judge):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint(3)\n"
        g = grade_code(judge, reply(program), CASES[:1])
        assert g.tests == ("runtime_error",) and "ConnectionRefusedError" in g.detail
        with pytest.raises(TimeoutError):  # the oracle: our listener saw no connection
            server.accept()


def test_files_left_by_one_test_are_gone_for_the_next(judge):
    program = ("import os\nprint(int(os.path.exists('mark')))\nopen('mark', 'w').close()\n"
               "os.makedirs('locked/inner')\nos.chmod('locked/inner', 0)\nos.chmod('locked', 0)\n")
    g = grade_code(judge, reply(program), [{"input": "", "output": "0"}] * 2)
    assert g.tests == ("passed", "passed")


def test_truncated_and_codeless_replies_are_not_run(judge):
    assert grade_code(judge, "```python\nprint(3)\n```", CASES).status == "truncated"
    g = grade_code(judge, "done</think>The answer is 3.", CASES)
    assert (g.status, g.detail) == ("wrong", "no fenced code block in the answer")


def test_without_bubblewrap_the_judge_refuses_unless_unsafe(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxError, match=r"was not found.*unsafe_no_sandbox=True \(--unsafe-no-sandbox\)"):
        CodeJudge(tmp_path)
    with CodeJudge(tmp_path, unsafe_no_sandbox=True) as j:
        assert not j.isolated
        assert grade_code(j, reply(ADD), CASES).correct


def test_a_code_task_from_jsonl_is_graded_by_the_judge_in_a_run(judge, tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"id": "add", "prompt": "Add two numbers.", "grader": "code", "tests": CASES,
                                "time_limit": 1}) + "\n")
    [task] = load_tasks(str(path))
    assert task.messages[0]["content"] == "Add two numbers."  # no math template around a program
    texts = [reply(ADD), reply("print(3)\n"), "still thinking"]
    summary = run_eval([task], Scripted(texts), SamplingConfig(n=3), tmp_path / "out", ks=[1], judge=judge)
    [record] = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    # by hand: ADD passes all three; print(3) passes only the first case; the third never closed
    assert [(s["status"], s.get("tests")) for s in record["samples"]] == [
        ("correct", ["passed"] * 3), ("wrong", ["passed", "wrong_answer", "wrong_answer"]), ("truncated", [])]
    assert summary["pass_at_k"][1]["mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="task 'add' is graded by running code, which needs a CodeJudge"):
        run_eval([task], Scripted(texts), SamplingConfig(n=3), tmp_path / "again", ks=[1])


def test_a_code_task_without_tests_is_refused(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "Add.", "grader": "code"}) + "\n")
    with pytest.raises(TaskError, match=r"code.jsonl:1: a code task needs 'tests'"):
        load_tasks(str(path))
