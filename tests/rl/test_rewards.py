"""Rewards: the rules, the sandbox, the shaping terms, the generative reward model over a fake
OpenAI-compatible endpoint (an httpx mock transport), and tasks."""

import json
import random

import httpx
import pytest

from dsv32.rl.rewards import (
    GenerativeRM, RewardConfig, boxed_math, exact_answer, extract_code, language_consistency, length_penalty,
    parse_score, reward, self_verification_reward, unit_tests,
)
from dsv32.rl.tasks import Domain, Task, TaskMix, arithmetic_steps, arithmetic_task, calculate, load_tasks, run_tool


def test_boxed_math_grading():
    assert boxed_math("so \\boxed{12}", "12") == 1.0
    assert boxed_math("first \\boxed{3} then \\boxed{ 12 }.", "12") == 1.0  # the last box counts
    assert boxed_math("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert boxed_math("\\boxed{-\\dfrac{3}{4}}", "-0.75") == 1.0
    assert boxed_math("\\boxed{2/4}", "\\frac{1}{2}") == 1.0
    assert boxed_math("\\boxed{1,000}", "1000") == 1.0
    assert boxed_math("\\boxed{\\text{yes}}", "yes") == 1.0
    assert boxed_math("\\boxed{13}", "12") == 0.0
    assert boxed_math("12", "12") == 0.0            # no box, no reward
    assert boxed_math("\\boxed{12", "12") == 0.0     # unclosed
    assert boxed_math("\\boxed{1/0}", "1/0") == 1.0 and boxed_math("\\boxed{2/0}", "1/0") == 0.0


def test_exact_answer():
    assert exact_answer(" Paris. ", "Paris") == 1.0
    assert exact_answer("paris", "Paris") == 0.0


def test_unit_tests_in_a_sandbox():
    code = extract_code("Here:\n```python\ndef add(a, b):\n    return a + b\n```\n")
    assert unit_tests(code, "assert add(2, 3) == 5") == 1.0
    assert unit_tests(code, "assert add(2, 3) == 6") == 0.0
    assert unit_tests("def add(a, b) return", "assert True") == 0.0                    # syntax error
    assert unit_tests("while True:\n    pass", "", timeout=0.5) == 0.0                   # timeout
    assert unit_tests("import os\nassert os.environ.get('HOME') is None", "") == 1.0     # no environment
    assert unit_tests("x = bytearray(2 << 30)", "", memory_mb=256) == 0.0               # memory limit


def test_length_penalty_and_language_consistency():
    assert length_penalty(80, 100, 20) == 0.0
    assert length_penalty(90, 100, 20) == -0.5
    assert length_penalty(100, 100, 20) == -1.0 and length_penalty(130, 100, 20) == -1.0
    assert length_penalty(100, 100, 0) == 0.0
    assert language_consistency("abc 123", "en") == 1.0
    assert language_consistency("ab中文", "en") == 0.5
    assert language_consistency("ab中文", "zh") == 0.5
    assert language_consistency("42 + 1", "en") == 1.0
    with pytest.raises(ValueError, match="language"):
        language_consistency("x", "xx")


def test_reward_combines_per_domain():
    task = Task("math", [{"role": "user", "content": "q"}], answer="4")
    r = reward(task, "\\boxed{4}", "thinking 中 \\boxed{4}", 95, 100, RewardConfig(length_buffer=10, language_weight=0.5))
    letters = "thinkingboxed"
    lang = len(letters) / (len(letters) + 1)
    assert r["outcome"] == 1.0 and r["length"] == -0.5 and r["language"] == pytest.approx(lang)
    assert r["reward"] == pytest.approx(1.0 - 0.5 + 0.5 * lang)
    assert reward(task, "5", "5", 3, 100, RewardConfig())["reward"] == 0.0


def _judge(scores: list[str], seen: list[dict]):
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        content = scores[len(seen) - 1]
        return httpx.Response(200, json={
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]})
    return handler


def test_generative_reward_model_over_an_openai_compatible_endpoint():
    import openai

    seen = []
    client = openai.OpenAI(base_url="http://judge.test/v1", api_key="k",
                           http_client=httpx.Client(transport=httpx.MockTransport(
                               _judge(['{"score": 7}', "I think... {\"score\": 12}", "no score"], seen))))
    rm = GenerativeRM("judge-model", client=client)
    task = Task("general", [{"role": "user", "content": "Write a haiku"}], grader="rm", rubric="5-7-5 syllables")
    assert reward(task, "old pond", "old pond", 3, 100, RewardConfig(), rm)["outcome"] == pytest.approx(0.7)
    assert rm("p", "r", "x") == 1.0 and rm("p", "r", "x") == 0.0   # clamped; unparsable -> 0
    prompt = seen[0]["messages"][0]["content"]
    assert seen[0]["model"] == "judge-model" and "5-7-5 syllables" in prompt and "Write a haiku" in prompt
    assert "old pond" in prompt
    with pytest.raises(ValueError, match="reward model"):
        reward(task, "x", "x", 1, 10, RewardConfig())
    assert parse_score('{"score": 5} then {"other": 1}') == 0.5


def test_arithmetic_tasks_are_exact():
    assert arithmetic_steps([3, 4, 2, 5], ["+", "*", "-"]) == ["3+8-5", "11-5", "6"]
    rng = random.Random(0)
    for _ in range(50):
        t = arithmetic_task(rng)
        expr = t.messages[0]["content"].split("What is ")[1].split("?")[0]
        assert int(t.answer) == eval(expr)  # the test's independent truth
        assert boxed_math(t.solution[-1]["content"], t.answer) == 1.0
    tool = arithmetic_task(rng, tool=True)
    assert tool.tools and tool.thinking_mode == "thinking" and tool.solution[1]["content"] == tool.answer


def test_calculator_and_tool_calls():
    assert calculate("3+4*2-5") == "6" and calculate("-(2*3)//4") == "-2"
    assert calculate("__import__('os')").startswith("error") and calculate("1/0").startswith("error")
    assert calculate("1//0").startswith("error")
    call = {"function": {"name": "calculator", "arguments": '{"expression": "7*6"}'}}
    assert run_tool(call) == "42"
    assert run_tool({"function": {"name": "rm", "arguments": "{}"}}).startswith("error")


def test_task_mix_and_jsonl(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"domain": "code", "prompt": "write add", "grader": "code", "tests": "assert add(1,2)==3"})
                    + "\n\n" + json.dumps({"domain": "chat", "messages": [{"role": "user", "content": "hi"}],
                                           "grader": "rm", "rubric": "kind"}) + "\n")
    tasks = load_tasks(path)
    assert [t.domain for t in tasks] == ["code", "chat"] and tasks[0].messages[0]["content"] == "write add"
    mix = TaskMix([Domain.parse("arithmetic:0:3"), Domain.parse("code:0.05")], {"code": tasks[:1]})
    assert mix.beta("code") == 0.05 and mix.beta("arithmetic") == 0.0
    picks = mix.sample(random.Random(0), 400)
    share = sum(t.domain == "arithmetic" for t in picks) / 400
    assert 0.68 < share < 0.82  # weight 3 : 1
    with pytest.raises(ValueError, match="neither a generator"):
        TaskMix([Domain("nowhere")])
    with pytest.raises(ValueError, match="domain spec"):
        Domain.parse("a:b")
    with pytest.raises(ValueError, match="grader"):
        Task("x", [], grader="vibes")


@pytest.mark.parametrize("fmt, s, s_self, meta, expected", [
    (True, 1.0, 1.0, 1.0, 1.0),                  # 0.76·1 + 0.24·(1 − 0)·1
    (True, 0.5, 1.0, 1.0, 0.5),                  # 0.76·0.5 + 0.24·(1 − 0.5) = 0.38 + 0.12
    (True, 0.0, 0.0, 1.0, 0.24),                 # a wrong proof, honestly judged: 0 + 0.24·1
    (True, 0.0, 1.0, 1.0, 0.0),                  # a wrong proof claimed perfect: 0 + 0.24·0
    (True, 1.0, 0.5, 0.5, 0.82),                 # 0.76 + 0.24·0.5·0.5 = 0.76 + 0.06
    (False, 1.0, 1.0, 1.0, 0.0),                 # R_format = 0
])
def test_the_self_verification_reward_by_hand(fmt, s, s_self, meta, expected):
    assert self_verification_reward(fmt, s, s_self, meta) == pytest.approx(expected)


def test_the_self_verification_reward_refuses_scores_outside_0_1():
    with pytest.raises(ValueError, match="self_score must be in \\[0, 1\\], got 2"):
        self_verification_reward(True, 1.0, 2)


def test_a_proof_task_is_scored_by_the_reward_model_as_verifier():
    import openai

    seen = []
    client = openai.OpenAI(base_url="http://judge/v1", api_key="x", http_client=httpx.Client(
        transport=httpx.MockTransport(_judge(["a minor gap \\boxed{0.5}", "\\boxed{0.75}"], seen))))
    rm = GenerativeRM("verifier", client=client)
    task = Task("proof", [{"role": "user", "content": "Prove that 2 is prime."}], grader="proof")
    text = "Its divisors are 1 and 2.\n## Self-evaluation\nComplete. \\boxed{1}"
    # verifier s = 0.5, self-score s' = 1: 0.76·0.5 + 0.24·(1 − 0.5) = 0.5
    assert reward(task, text, text, 10, 100, RewardConfig(), rm)["outcome"] == pytest.approx(0.5)
    asked = seen[0]["messages"][0]["content"]
    assert "Prove that 2 is prime." in asked and "Its divisors are 1 and 2." in asked and "Self-evaluation" not in asked
    # an unparseable verdict is s = 0: 0 + 0.24·(1 − 1) = 0; no self-evaluation at all: R_format = 0
    assert reward(task, text, text, 10, 100, RewardConfig(), rm)["outcome"] == 0.0
    assert reward(task, "proof only", "proof only", 10, 100, RewardConfig(), rm)["outcome"] == 0.0
    assert len(seen) == 2  # the last answer never reached the verifier
