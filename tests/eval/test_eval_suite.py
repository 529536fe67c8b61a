"""experiments/eval_suite.py --quick on the random tiny preset (no download): both arms run through
the engine, and the suite's pass@k equals a recomputation from the per-sample verdicts of the
results files, also after some verdicts are flipped to correct and the suite resumes."""

import importlib.util
import json
from pathlib import Path

import pytest

import dsv32.eval.run
from dsv32.eval.passk import pass_at_k

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "eval_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("eval_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _recomputed(path: Path, family: str | None, k: int) -> float:
    records = [json.loads(x) for x in path.read_text().splitlines()]
    if family:
        records = [r for r in records if r["id"].split(":")[1] == family]
    values = [pass_at_k(len(r["samples"]), sum(s["status"] == "correct" for s in r["samples"]), k) for r in records]
    return sum(values) / len(values)


def test_quick_suite_reports_pass_at_k_as_recomputed_from_the_samples(suite, tmp_path, tokenizer_dir):
    out = tmp_path / "suite"
    argv = ["--quick", "--model", "tiny", "--tokenizer", str(tokenizer_dir), "--device", "cpu", "--dtype", "float32",
            "--num-blocks", "32", "--out", str(out)]
    s = suite.main(argv)
    families = s["families"]
    assert len(families) == 2 and set(s["arms"]) == {"dense", "dsa"}
    assert s["arms"]["dense"]["index_topk"] == 1024 and s["arms"]["dsa"]["index_topk"] == 16  # tiny: k=16 < context
    for arm in ("dense", "dsa"):
        records = [json.loads(x) for x in (out / arm / "results.jsonl").read_text().splitlines()]
        assert len(records) == 4 and all(len(r["samples"]) == 4 for r in records)
        assert s["arms"][arm]["throughput"]["samples_per_s"] > 0
    assert s["arms"]["dense"]["sparse_decode_share"] == 0.0 and s["arms"]["dsa"]["sparse_decode_share"] > 0

    # flip some verdicts to correct (a random tiny model gets none right), then resume: nothing is
    # sampled again, and the numbers follow the results files
    path = out / "dsa" / "results.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    for i, r in enumerate(records):
        for s_ in r["samples"][: i + 1]:
            s_["status"] = "correct"
        r["correct"] = sum(x["status"] == "correct" for x in r["samples"])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = suite.main(argv)
    assert (out / "suite.md").is_file() and (out / "pass1.png").stat().st_size > 0
    for arm in ("dense", "dsa"):
        res = out / arm / "results.jsonl"
        for k in (1, 2, 4):
            assert s["arms"][arm]["pass_at_k"][k]["mean"] == pytest.approx(_recomputed(res, None, k))
        for f in families:
            assert s["arms"][arm]["per_family"][f][1]["mean"] == pytest.approx(_recomputed(res, f, 1))
    assert s["arms"]["dsa"]["pass_at_k"][1]["mean"] == pytest.approx((1 + 2 + 3 + 4) / 16)
    assert s["dsa_minus_dense_pass1"]["all"]["mean"] == pytest.approx((1 + 2 + 3 + 4) / 16 - _recomputed(
        out / "dense" / "results.jsonl", None, 1))
    assert len(json.loads((out / "dsa" / "timing.json").read_text())["sessions"]) == 1  # the resume sampled nothing
    # --regrade grades the stored texts again: the flipped verdicts are the graders' again
    s = suite.main(argv + ["--regrade"])
    assert s["arms"]["dsa"]["pass_at_k"][1]["mean"] == pytest.approx(_recomputed(path, None, 1))
    assert all(0 <= s["arms"][a]["lenient_pass_at_k"][1]["mean"] <= 1 for a in ("dense", "dsa"))


def test_lenient_reading_takes_the_last_box_else_the_last_number(suite):
    assert suite.lenient_correct("1 + 5 = 6.<|im_end|>", "6")
    assert suite.lenient_correct("so 4 - 9 = -5", "-5")
    assert suite.lenient_correct("it is \\boxed{12} not 13", "12")
    assert not suite.lenient_correct("6 is wrong, it is 7", "6")
    assert not suite.lenient_correct("no number here", "6")


def test_tasks_saved_to_a_file_read_back_as_the_same_tasks(suite, tmp_path):
    """--save-tasks then --tasks-file: the same ids, prompts, answers, graders and reasoning-gym
    entries as the suite generates, the entries as JSON has them (tuples read back as lists), so a
    machine without reasoning-gym samples the same problems; grading (--regrade) regenerates them."""
    path = tmp_path / "tasks.jsonl"
    assert suite.main(["--out", str(tmp_path / "o"), "--tasks-per-family", "3", "--save-tasks", str(path)]) == {"tasks": 12}
    got, want = suite.read_tasks(path), suite.suite_tasks(list(suite.DEFAULT_FAMILIES), 3, 0)
    assert [(t.id, t.messages, t.answer, t.grader) for t in got] == [(t.id, t.messages, t.answer, t.grader) for t in want]
    assert [t.entry for t in got] == [json.loads(json.dumps(t.entry)) for t in want]
    with pytest.raises(SystemExit, match="families"):
        suite.main(["--out", str(tmp_path / "o"), "--families", "products", "--tasks-file", str(path),
                    "--save-tasks", str(tmp_path / "again.jsonl")])


def test_a_run_cut_after_its_first_task_keeps_that_tasks_throughput(suite, tmp_path, tokenizer_dir, monkeypatch):
    def cut_after_one(tasks, sampler, cfg, out, ks, **kw):
        for task, samples in sampler.sample(tasks, cfg):
            raise KeyboardInterrupt  # the time limit, right after the first task's samples

    monkeypatch.setattr(dsv32.eval.run, "run_eval", cut_after_one)
    out = tmp_path / "cut"
    argv = ["--quick", "--arms", "dsa", "--model", "tiny", "--tokenizer", str(tokenizer_dir), "--device", "cpu",
            "--dtype", "float32", "--num-blocks", "32", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        suite.main(argv)
    timing = json.loads((out / "dsa" / "timing.json").read_text())
    (session,) = timing["sessions"]
    assert session["samples"] == 4 and session["tokens"] > 0 and session["seconds"] > 0   # n = 4 in --quick
    assert session["cuda_graphs"] is False
