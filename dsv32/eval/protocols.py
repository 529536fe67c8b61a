"""Speciale's competition protocol for IOI and ICPC (V3.2 paper, Appendix D; spec §6).

Per problem: sample many candidates (IOI 500, ICPC 32), drop those that fail the statement's
sample tests, exceed the length limit, or say they cannot or will not solve the problem (judged
by a model: here a flag on the candidate), then submit the candidates with the longest thinking,
as many as the contest allows (IOI: 50). An IOI problem scores, for each subtask, the best any
submission got on it. An ICPC problem is solved when a submission passes every test; its
submissions are tried in the same longest-thinking order, and the attempts count up to the first
accepted one.

This module is the pure part: selection and scoring on given candidates. `eval/contest.py` makes
the candidates from sampled replies and runs them in the sandbox.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    id: str
    thinking_length: int      # tokens where a tokenizer is at hand, else characters; compared within a problem
    passes_samples: bool
    within_length: bool = True
    refused: bool = False
    subtask_scores: list[float] = field(default_factory=list)  # fraction of each subtask's points, 0..1


def filter_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates left after dropping failed sample tests, over-length replies and refusals."""
    return [c for c in candidates if c.passes_samples and c.within_length and not c.refused]


def select_submissions(candidates: list[Candidate], limit: int = 50) -> list[Candidate]:
    """The `limit` filtered candidates with the longest thinking (ties in sampling order)."""
    kept = filter_candidates(candidates)
    return sorted(kept, key=lambda c: -c.thinking_length)[:limit]


def ioi_score(submissions: list[Candidate], points: list[float]) -> float:
    """The problem's score: per subtask, its points times the best fraction any submission got."""
    for c in submissions:
        if len(c.subtask_scores) != len(points):
            raise ValueError(f"candidate {c.id} has {len(c.subtask_scores)} subtask scores, the problem "
                             f"has {len(points)} subtasks")
    return sum(p * max((c.subtask_scores[i] for c in submissions), default=0.0) for i, p in enumerate(points))


def icpc_result(submissions: list[Candidate]) -> tuple[bool, int]:
    """(solved, attempts): submissions are tried in order until one passes every subtask's tests
    (all scores 1); attempts counts them up to and including that one, or all of them if none does."""
    for i, c in enumerate(submissions):
        if c.subtask_scores and all(s >= 1.0 for s in c.subtask_scores):
            return True, i + 1
    return False, len(submissions)
