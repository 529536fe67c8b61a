"""`dsv32 eval --protocol imo`: the generate → verify → refine loop (dsv32.eval.proof, spec §6)
over a JSONL file of proof problems, with any sampler as the prover and as the verifier.

A problem line: {"id"?, "prompt" (or "problem"), "rubric"?}. Each problem's loop runs to its end
and is written as one line of out_dir/results.jsonl (a rerun with the same folder skips the
problems already there); then summary.json and report.md: per problem the best proof's score,
the rounds it took and whether it reached 1. The score is the verifier's, not a human grade.
"""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from dsv32.eval.proof import RUBRIC, generate_verify_refine
from dsv32.eval.report import read_results
from dsv32.eval.sample import SamplingConfig
from dsv32.eval.tasks import Task, TaskError, read_jsonl


@dataclass(frozen=True)
class ProofProblem:
    id: str
    text: str
    rubric: str = RUBRIC


def _problem(obj, where: str, default_id: str) -> ProofProblem:
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object")
    text = obj.get("prompt", obj.get("problem"))
    if not isinstance(text, str) or not text.strip():
        raise TaskError(f"{where}: a proof problem needs a non-empty 'prompt' (or 'problem')")
    rubric = obj.get("rubric", RUBRIC)
    if not isinstance(rubric, str) or not rubric.strip():
        raise TaskError(f"{where}: 'rubric' must be a non-empty string")
    return ProofProblem(str(obj.get("id", default_id)), text, rubric)


def load_proof_problems(path: str | Path) -> list[ProofProblem]:
    return read_jsonl(path, _problem, "problem")


def chat(sampler, cfg: SamplingConfig, key: str):
    """messages -> one completion's text, through a sampler (engine or endpoint); each call its
    own seed, derived from `key` and a call counter, so a rerun draws the same texts."""
    calls = [0]

    def call(messages: list[dict]) -> str:
        calls[0] += 1
        task = Task(f"{key}#{calls[0]}", messages, "")
        ((_, samples),) = list(sampler.sample([task], replace(cfg, n=1)))
        return samples[0].text
    return call


def run_proofs(problems: list[ProofProblem], prover, verifier, cfg: SamplingConfig, out_dir: str | Path,
               max_rounds: int = 16, verifications: int = 1, title: str = "IMO protocol") -> dict:
    """The loop per problem (prover and verifier are samplers); returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {r["id"] for r in read_results(path)}
    for p in tqdm([p for p in problems if p.id not in done], desc="proofs", unit=" problem"):
        result = generate_verify_refine(p.text, chat(prover, cfg, f"{p.id}/prover"),
                                        chat(verifier, cfg, f"{p.id}/verifier"), max_rounds, verifications,
                                        p.rubric, cfg.thinking)
        row = {"id": p.id, "score": result.score, "perfect": result.perfect, "rounds": len(result.rounds),
               "unparseable": result.unparseable, "truncated": result.truncated, "proof": result.proof,
               "history": [asdict(r) for r in result.rounds]}
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    rows = {r["id"]: r for r in read_results(path)}
    rows = [rows[p.id] for p in problems if p.id in rows]
    n = len(rows)
    summary = {"title": title, "problems": n, "perfect": sum(r["perfect"] for r in rows),
               "mean_score": sum(r["score"] for r in rows) / n if n else 0.0,
               "mean_rounds": sum(r["rounds"] for r in rows) / n if n else 0.0,
               "unparseable": sum(r["unparseable"] for r in rows), "truncated": sum(r["truncated"] for r in rows),
               "max_rounds": max_rounds, "verifications": verifications}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# {title}", "", f"{summary['perfect']} of {n} problems reached a verifier score of 1; mean best "
             f"score {summary['mean_score']:.3f}, mean rounds {summary['mean_rounds']:.2f} (at most {max_rounds}, "
             f"{verifications} verification(s) a round). Scores are the verifier model's, not human grades.", "",
             f"Unparseable verifications (scored 0): {summary['unparseable']}; prover replies whose thinking never "
             f"closed: {summary['truncated']}.", "", "| problem | best score | rounds | perfect |", "|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['score']:g} | {r['rounds']} | {'yes' if r['perfect'] else 'no'} |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary
