"""Sampling and the run: stop strings end only the answer, results are written per task and
resumed, and the report's numbers are those of the results file."""

import json

import pytest
import torch
from scripted_sampler import Scripted

from dsv32.engine import LLM, EngineConfig
from dsv32.eval.passk import pass_at_k
from dsv32.eval.run import run_eval
from dsv32.eval.sample import AnswerStop, EngineSampler, SamplingConfig
from dsv32.eval.tasks import Task
from dsv32.loader import load


def test_a_stop_string_in_the_reasoning_does_not_fire_one_in_the_answer_does():
    w = AnswerStop(["STOP"], thinking=True)
    assert not w.feed("I could STOP here") and not w.feed(" or ST") and not w.feed("OP.</th")
    assert not w.feed("ink>The answer is 4. ST")
    assert w.feed("OP and more") and w.text == "I could STOP here or STOP.</think>The answer is 4. "
    chat = AnswerStop(["STOP"], thinking=False)
    assert chat.feed("a STOP b") and chat.text == "a "
    assert AnswerStop([], thinking=True).feed("x</think>y") is False


@pytest.fixture(scope="module")
def llm(tokenizer_dir):
    model, tok = load("tiny", tokenizer=tokenizer_dir, dtype=torch.float32, device="cpu", seed=0)
    return LLM(model, EngineConfig(num_blocks=64), tokenizer=tok)


def one(llm, cfg):
    task = Task("t", [{"role": "user", "content": "def f(x):"}], "1")
    [(_, [sample])] = list(EngineSampler(llm).sample([task], cfg))
    return sample


def test_the_engine_sampler_does_not_end_a_sample_at_a_stop_string_inside_the_thinking(llm):
    """The random tiny model never writes </think>: its whole text is reasoning. A stop string
    taken from that text ends the chat-mode sample there, and leaves the thinking one whole."""
    greedy = dict(n=1, temperature=0.0, max_tokens=16)
    free = one(llm, SamplingConfig(thinking=True, **greedy))
    assert "</think>" not in free.text and free.finish_reason == "length" and free.num_tokens == 16
    stop = free.text[4:7]
    if not stop.strip() or free.text.find(stop) < 1:
        pytest.skip("greedy text has no usable stop string")
    thought = one(llm, SamplingConfig(thinking=True, stop=(stop,), **greedy))
    assert thought.text == free.text and thought.finish_reason == "length"
    chat_free = one(llm, SamplingConfig(thinking=False, **greedy))
    if stop in chat_free.text:
        chat = one(llm, SamplingConfig(thinking=False, stop=(stop,), **greedy))
        assert chat.finish_reason == "stop" and chat.text == chat_free.text[:chat_free.text.find(stop)]



def test_results_are_written_per_task_resumed_and_reported_from_the_file(tmp_path):
    tasks = [Task(f"q{i}", [{"role": "user", "content": "?"}], "4") for i in range(3)]
    right, wrong, cut = "hm</think>\\boxed{4}", "hm</think>\\boxed{5}", "hm, still thinking"
    texts = {"q0": [right, wrong, cut, right], "q1": [wrong] * 4, "q2": [right] * 4}
    cfg = SamplingConfig(n=4)
    first = Scripted(texts)
    run_eval(tasks[:2], first, cfg, tmp_path, ks=[1, 2])
    again = Scripted(texts)
    summary = run_eval(tasks, again, cfg, tmp_path, ks=[1, 2, 4])
    assert first.asked == ["q0", "q1"] and again.asked == ["q2"]  # q0, q1 were in the file already
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["id"], r["correct"]) for r in records] == [("q0", 2), ("q1", 0), ("q2", 4)]
    assert [s["status"] for s in records[0]["samples"]] == ["correct", "wrong", "truncated", "correct"]
    for k in (1, 2, 4):
        want = sum(pass_at_k(4, c, k) for c in (2, 0, 4)) / 3
        assert summary["pass_at_k"][k]["mean"] == pytest.approx(want)
    assert summary["verdicts"] == {"correct": 6, "wrong": 5, "truncated": 1, "timeout": 0, "error": 0}
    assert json.loads((tmp_path / "summary.json").read_text())["pass_at_k"]["2"]["mean"] == pytest.approx(
        summary["pass_at_k"][2]["mean"])
    assert f"| 2 | {summary['pass_at_k'][2]['mean']:.4f} |" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="n=\\[4\\], not n=2"):
        run_eval(tasks, Scripted(texts), SamplingConfig(n=2), tmp_path, ks=[1])
    with pytest.raises(ValueError, match="pass@8 needs at least 8 samples"):
        run_eval(tasks, Scripted(texts), cfg, tmp_path / "other", ks=[1, 8])
