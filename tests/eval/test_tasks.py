"""Task sources: a JSONL file (prompts in the math template, conversations as written, bad lines
named), and reasoning-gym datasets generated offline and scored by reasoning-gym itself."""

import json

import pytest
from reasoning_gym import create_dataset

from dsv32.chat import math_prompt
from dsv32.eval.grade import GradingWorker, grade
from dsv32.eval.tasks import TaskError, load_jsonl, load_tasks


def write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_prompts_get_the_math_template_and_conversations_stay_as_written(tmp_path):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    f = write(tmp_path / "t.jsonl", [{"id": "a", "prompt": "1+1?", "answer": 2},
                                     "", {"messages": conv, "answer": "4", "grader": "exact"}])
    a, b = load_tasks(str(f))
    assert a.id == "a" and a.messages == [{"role": "user", "content": math_prompt("1+1?")}]
    assert a.answer == "2" and a.grader == "math"
    assert b.id == "t:3" and b.messages == conv and b.grader == "exact"
    assert load_jsonl(f, template="none")[0].messages[0]["content"] == "1+1?"


@pytest.mark.parametrize("line,error", [
    ("{not json", r"t.jsonl:2: not JSON"),
    ([1, 2], r"t.jsonl:2: a task is a JSON object"),
    ({"answer": "1"}, r"t.jsonl:2: give exactly one of 'prompt' and 'messages'"),
    ({"prompt": "q", "messages": [], "answer": "1"}, r"t.jsonl:2: give exactly one"),
    ({"prompt": "q"}, r"t.jsonl:2: 'answer' is missing"),
    ({"prompt": "q", "answer": "1", "grader": "llm"}, r"t.jsonl:2: unknown grader 'llm'"),
    ({"messages": "hi", "answer": "1"}, r"t.jsonl:2: 'messages' is not a non-empty list"),
    ({"id": "a", "prompt": "q", "answer": "1"}, r"t.jsonl:2: duplicate task id 'a'"),
])
def test_bad_lines_are_refused_with_their_file_and_line(tmp_path, line, error):
    f = write(tmp_path / "t.jsonl", [{"id": "a", "prompt": "ok", "answer": "1"}, line])
    with pytest.raises(TaskError, match=error):
        load_tasks(str(f))


def test_reasoning_gym_tasks_are_its_seeded_problems_scored_by_its_scorer(tmp_path):
    tasks = load_tasks("rg:basic_arithmetic:3", seed=7)
    want = create_dataset("basic_arithmetic", size=3, seed=7)
    assert [t.id for t in tasks] == [f"rg:basic_arithmetic:7:{i}" for i in range(3)]
    assert [t.messages[0]["content"] for t in tasks] == [math_prompt(e["question"]) for e in want]
    t = tasks[0]
    with GradingWorker() as w:
        assert grade(w, f"</think>So \\boxed{{{t.answer}}}", t.grader, t.answer, t.entry).correct
        assert not grade(w, "</think>So \\boxed{12345678}", t.grader, t.answer, t.entry).correct
    with pytest.raises(TaskError, match="rg:no_such_set: not a reasoning-gym dataset"):
        load_tasks("rg:no_such_set:2")
    with pytest.raises(TaskError, match="rg:NAME:N"):
        load_tasks("rg:basic_arithmetic:many")
