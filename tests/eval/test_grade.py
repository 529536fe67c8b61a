"""Graders: verdicts on tricky math answers match math-verify called directly (the oracle), only
the text after </think> counts, an unclosed thought is truncated, and a hung grader is killed."""

import time

import pytest
from math_verify import parse, verify
from reasoning_gym import create_dataset

from dsv32.chat import EOS
from dsv32.eval.grade import GradingWorker, grade
from dsv32.eval.reply import split_reply


@pytest.fixture(scope="module")
def worker():
    with GradingWorker(timeout=20.0) as w:
        yield w


# (gold, the model's boxed answer): equivalent forms, intervals, sets, units, and mismatches
MATH_CASES = [
    ("\\frac{1}{2}", "0.5"), ("0.5", "1/2"), ("\\frac{1}{2}", "\\frac12"), ("\\frac{1}{2}", "0.51"),
    ("[0, 1)", "[0,1)"), ("[0, 1)", "(0,1]"), ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}"), ("\\{1, 2\\}", "\\{1, 3\\}"),
    ("5", "5\\text{ cm}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x^2 + 2x + 1", "(x+1)^2"), ("10", "9"),
    ("\\pi", "3.14159265358979"), ("-4", "-4"),
]


def oracle(gold, boxed):
    return verify(parse(f"${gold}$"), parse(f"\\boxed{{{boxed}}}"))


@pytest.mark.parametrize("gold,boxed", MATH_CASES)
def test_math_verdicts_agree_with_math_verify(worker, gold, boxed):
    text = f"let me think</think>The answer is $\\boxed{{{boxed}}}$.{EOS}"
    g = grade(worker, text, "math", gold)
    assert g.correct == oracle(gold, boxed) and g.extracted == boxed


def test_the_oracle_agrees_with_a_reader_on_the_plain_cases():
    assert oracle("\\frac{1}{2}", "0.5") and oracle("\\{1, 2, 3\\}", "\\{3, 2, 1\\}")
    assert not oracle("10", "9") and not oracle("[0, 1)", "(0,1]")


def test_the_last_box_of_the_answer_counts_and_a_missing_or_malformed_box_is_wrong(worker):
    assert grade(worker, "</think>first \\boxed{3}, no: \\boxed{4}", "math", "4").correct
    assert not grade(worker, "</think>first \\boxed{4}, no: \\boxed{3}", "math", "4").correct
    for answer in ["the answer is 4", "\\boxed{4", "\\boxed 4"]:
        g = grade(worker, "</think>" + answer, "math", "4")
        assert g.status == "wrong" and g.detail == "no \\boxed{} in the answer"


def test_only_the_text_after_the_thinking_is_graded(worker):
    assert not grade(worker, "maybe \\boxed{4}</think>so \\boxed{5}", "math", "4").correct
    assert grade(worker, "maybe \\boxed{5}</think>so \\boxed{4}", "math", "4").correct


def test_a_thought_that_never_closed_is_truncated_not_graded(worker):
    g = grade(worker, "it is \\boxed{4} ... still thinking", "math", "4")
    assert g.status == "truncated" and not g.correct
    assert split_reply("abc", thinking=True) == ("abc", None)
    # in chat mode there is no thinking: the whole reply is the answer
    assert grade(worker, "\\boxed{4}" + EOS, "math", "4", thinking=False).correct


def test_exact_and_numeric_graders(worker):
    assert grade(worker, "</think> \\boxed{ Paris }", "exact", "Paris").correct
    assert grade(worker, "</think>Paris\n", "exact", "Paris").correct
    assert not grade(worker, "</think>paris", "exact", "Paris").correct
    assert grade(worker, "</think>\\boxed{0.3333333}", "numeric", "0.33333333").correct
    assert not grade(worker, "</think>\\boxed{0.34}", "numeric", "0.33333333").correct
    assert grade(worker, "</think>\\boxed{one third}", "numeric", "0.3333").status == "wrong"


def test_reasoning_gym_answers_are_scored_by_its_own_scorer(worker):
    entry = create_dataset("basic_arithmetic", size=1, seed=3)[0]
    right, wrong = entry["answer"], str(int(entry["answer"]) + 1)
    assert grade(worker, f"</think>\\boxed{{{right}}}", "rg:basic_arithmetic", right, entry).correct
    assert not grade(worker, f"</think>\\boxed{{{wrong}}}", "rg:basic_arithmetic", right, entry).correct


def test_a_hung_grader_is_killed_reported_and_the_next_grade_works():
    with GradingWorker(timeout=3.0) as w:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="ran past 3.0s"):
            w.call(time.sleep, 60)
        assert time.monotonic() - t0 < 20
        assert grade(w, "</think>\\boxed{1/2}", "math", "0.5").correct  # a fresh worker
        dead = w.proc
        w.timeout = 0.0  # every verdict now times out, and is reported so
        g = grade(w, "</think>\\boxed{1/2}", "math", "0.5")
        assert g.status == "timeout" and not dead.is_alive()


def test_a_grader_that_raises_is_reported_as_an_error(worker):
    g = grade(worker, "</think>\\boxed{1}", "nonsense", "1")
    assert g.status == "error" and "unknown grader" in g.detail


def test_a_chatml_models_end_of_turn_is_not_part_of_its_answer(worker):
    """SmolLM2's replies end in <|im_end|> (or <|endoftext|>), which the engine's text keeps: an
    unboxed answer read whole must not carry it, or "6<|im_end|>" is graded wrong against 6."""
    assert split_reply("6<|im_end|>", thinking=False) == ("", "6")
    assert split_reply("6<|endoftext|>", thinking=False) == ("", "6")
    assert grade(worker, "6<|im_end|>", "exact", "6", thinking=False).correct
    assert grade(worker, "x</think>6<|im_end|>", "numeric", "6").correct


def test_without_reasoning_gym_an_rg_answer_is_an_error_that_names_it(monkeypatch):
    """Where the eval extra is missing (a GPU machine that only samples), grading an rg: answer
    raises an error naming reasoning-gym (the worker reports it as the 'error' verdict); the
    other graders do not need it."""
    import dsv32.eval.grade as g
    monkeypatch.setattr(g, "get_score_answer_fn", None)
    with pytest.raises(ValueError, match="reasoning-gym"):
        g.judge("rg:basic_arithmetic", "\\boxed{3}", "3", {"question": "1 + 2", "answer": "3", "metadata": {}})
    assert g.judge("exact", "3", "3") == (1.0, "3")
