"""`dsv32 eval --protocol imo`: the verify-and-refine loop over a problems file, with scripted
samplers as prover and verifier; the expected rounds and scores are worked out by hand."""

import json
import re

import pytest

from dsv32.eval.cli import main
from dsv32.eval.proof_run import load_proof_problems, run_proofs
from dsv32.eval.sample import Sample, SamplingConfig
from dsv32.eval.tasks import TaskError

CFG = SamplingConfig(n=1, thinking=False, max_tokens=64)


class Prover:
    """Writes "proof of P, version k", k counting this problem's calls."""

    def __init__(self):
        self.calls, self.versions = 0, {}

    def sample(self, tasks, cfg, progress=None):
        for t in tasks:
            self.calls += 1
            problem = t.messages[-1]["content"].split("PROBLEM<")[1].split(">")[0]
            self.versions[problem] = self.versions.get(problem, 0) + 1
            yield t, [Sample(f"proof of {problem}, version {self.versions[problem]}", "stop")]


class Verifier:
    """Scores by the version it reads: `scores[problem][version - 1]`."""

    def __init__(self, scores):
        self.scores, self.calls = scores, 0

    def sample(self, tasks, cfg, progress=None):
        for t in tasks:
            self.calls += 1
            problem, version = re.search(r"proof of (\w+), version (\d+)", t.messages[-1]["content"]).groups()
            version = int(version)
            yield t, [Sample(f"Findings. \\boxed{{{self.scores[problem][version - 1]}}}", "stop")]


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "imo.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"PROBLEM<{i}> show it"}) + "\n" for i in ("a", "b")))
    return path


def test_each_problem_refines_until_the_verifier_gives_one_or_the_rounds_run_out(problems, tmp_path):
    prover = Prover()
    verifier = Verifier({"a": ["0", "0.5", "1", "1"], "b": ["0.5", "0", "0"]})
    summary = run_proofs(load_proof_problems(problems), prover, verifier, CFG, tmp_path / "out", max_rounds=3)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    # a: versions 1, 2, 3 scored 0, 0.5, 1 -> stops at round 3 with version 3
    assert (rows["a"]["rounds"], rows["a"]["score"], rows["a"]["perfect"]) == (3, 1.0, True)
    assert rows["a"]["proof"].endswith("version 3")
    # b: 0.5, 0, 0 over its 3 rounds -> the best is round 1's proof
    assert (rows["b"]["rounds"], rows["b"]["score"], rows["b"]["perfect"]) == (3, 0.5, False)
    assert (summary["perfect"], summary["problems"], summary["mean_score"]) == (1, 2, 0.75)
    assert "1 of 2 problems reached a verifier score of 1" in (tmp_path / "out" / "report.md").read_text()


def test_a_rerun_skips_the_problems_already_written(problems, tmp_path):
    scores = {"a": ["1"], "b": ["1"]}
    run_proofs(load_proof_problems(problems), Prover(), Verifier(scores), CFG, tmp_path / "out")
    again = Prover()
    summary = run_proofs(load_proof_problems(problems), again, Verifier(scores), CFG, tmp_path / "out")
    assert again.calls == 0 and summary["perfect"] == 2


def test_a_problem_without_text_is_refused_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n{"id": "x", "rubric": "r"}\n')
    with pytest.raises(TaskError, match="bad.jsonl:2: a proof problem needs"):
        load_proof_problems(path)


def test_the_command_refuses_zero_rounds_before_loading_a_model(problems, tmp_path, capsys):
    assert main(["--tasks", str(problems), "--protocol", "imo", "--max-rounds", "0", "--model", "tiny",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--max-rounds" in capsys.readouterr().err


def test_the_command_runs_the_loop_through_our_engine(problems, tmp_path, tokenizer_dir, capsys):
    """A random tiny model as prover and verifier: it never writes a strict score, so every
    verification is unparseable and counted, each problem uses its 2 rounds, and nothing is
    perfect."""
    from dsv32.cli import main as dsv32_main

    out = tmp_path / "imo"
    argv = ["eval", "--tasks", str(problems), "--protocol", "imo", "--model", "tiny", "--tokenizer",
            str(tokenizer_dir), "--device", "cpu", "--dtype", "float32", "--num-blocks", "32", "--max-tokens", "6",
            "--max-rounds", "2", "--out", str(out)]
    assert dsv32_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["problems"], summary["perfect"], summary["unparseable"], summary["mean_rounds"]) == (2, 0, 4, 2)
    assert "0 of 2 proofs reached a verifier score of 1" in capsys.readouterr().out
