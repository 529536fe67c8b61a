"""Proofs (IMO/CMO, spec §6): generate → verify → refine, as DeepSeekMath-V2 does and as
V3.2-Speciale was evaluated, and the pieces of its self-verification reward.

A **verifier** is a model asked, with a rubric, to find the issues in a proof and end its reply
with `\\boxed{s}`, s one of 0, 0.5, 1 (1: complete and rigorous; 0.5: right ideas with minor gaps
or errors; 0: wrong, or with a fatal gap). The score is read strictly (`parse_score`): the last
`\\boxed{}` of the reply after `</think>` must hold exactly `0`, `0.5` or `1`; anything else is
unparseable, counts as 0, and is counted.

The **loop** (`generate_verify_refine`): the policy writes a proof; each round the verifier scores
it (`verifications` times; the proof's score is their mean); at a perfect score the loop stops,
otherwise the policy revises the proof given the lowest-scoring verification's findings, until
`max_rounds` proofs have been scored (DeepSeekMath-V2's public script uses 16). The answer is the
best-scored proof (the latest among equals).

For the reward (`dsv32.rl.rewards.self_verification_reward`), a generator writes its proof, then a
line `## Self-evaluation`, then its own analysis Z ending in `\\boxed{s'}`
(`split_self_evaluation`). The policy and verifier here are plain functions, messages → completion
text, so a scripted fake, our engine or an endpoint all fit.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from dsv32.chat import extract_boxed
from dsv32.eval.reply import split_reply

SCORES = {"0": 0.0, "0.5": 0.5, "1": 1.0}
SELF_EVALUATION = "## Self-evaluation"

Chat = Callable[[list[dict]], str]  # messages -> completion text (reasoning, </think>, answer)

RUBRIC = """\
Score the proof with exactly one of:
- 1: the proof is complete and rigorous; every step is justified.
- 0.5: the approach is right and the proof is essentially complete, but a step has a minor gap \
or error that is easy to repair.
- 0: the proof is wrong, proves something else, or has a gap that the argument cannot close as written.
Judge only what is written: a claim stated without proof is a gap."""

VERIFY = """\
You check a proof of a competition problem. List every issue you find in it, quoting the step \
and saying what is wrong, then give your score.

{rubric}

## Problem
{problem}

## Proof
{proof}

End your reply with the score alone in a box: \\boxed{{1}}, \\boxed{{0.5}} or \\boxed{{0}}."""

PROVE = """\
Prove the following. Write a complete and rigorous proof.

{problem}

After the proof, write a line "{marker}", then check your own proof as a strict grader would, \
listing any issue, and end with your score of it in a box: \\boxed{{1}}, \\boxed{{0.5}} or \\boxed{{0}}."""

REFINE = """\
A grader found issues in your proof. Write a corrected, complete proof that addresses every \
valid issue (and says why an issue is invalid, if one is).

## Problem
{problem}

## Your proof
{proof}

## The grader's findings
{feedback}

After the proof, write a line "{marker}", then check your own proof as a strict grader would, \
listing any issue, and end with your score of it in a box: \\boxed{{1}}, \\boxed{{0.5}} or \\boxed{{0}}."""


def parse_score(reply: str, thinking: bool = False) -> float | None:
    """The score of a verifier's reply (0, 0.5 or 1), or None when it has none in that form. In
    thinking mode only the answer after `</think>` counts (a reply that never closed has none)."""
    _, answer = split_reply(reply, thinking)
    box = extract_boxed(answer or "")
    return None if box is None else SCORES.get(box.strip())


def split_self_evaluation(answer: str) -> tuple[str, str | None, float | None]:
    """(proof Y, self-analysis Z, self-score s') of a generator's answer; Z is None without the
    `## Self-evaluation` line, s' None when Z has no strict score."""
    proof, sep, analysis = answer.rpartition(SELF_EVALUATION)
    if not sep:
        return answer.strip(), None, None
    return proof.strip(), analysis.strip(), parse_score(analysis)


def verify_messages(problem: str, proof: str, rubric: str = RUBRIC) -> list[dict]:
    return [{"role": "user", "content": VERIFY.format(rubric=rubric, problem=problem, proof=proof)}]


def prove_messages(problem: str) -> list[dict]:
    return [{"role": "user", "content": PROVE.format(problem=problem, marker=SELF_EVALUATION)}]


def refine_messages(problem: str, proof: str, feedback: str) -> list[dict]:
    return [{"role": "user", "content": REFINE.format(problem=problem, proof=proof, feedback=feedback,
                                                      marker=SELF_EVALUATION)}]


@dataclass(frozen=True)
class Round:
    proof: str
    score: float                 # the mean of the verifications (unparseable ones count 0)
    verdicts: list               # each verification's score, None where unparseable
    feedback: str                # the lowest-scoring verification's answer


@dataclass
class ProofResult:
    proof: str                   # the best-scored proof (the latest among equals)
    score: float
    rounds: list[Round] = field(default_factory=list)
    unparseable: int = 0         # verifications with no strict score
    truncated: int = 0           # policy replies whose thinking never closed (an empty proof)

    @property
    def perfect(self) -> bool:
        return self.score >= 1.0


def generate_verify_refine(problem: str, policy: Chat, verifier: Chat, max_rounds: int = 16,
                           verifications: int = 1, rubric: str = RUBRIC, thinking: bool = True) -> ProofResult:
    """Write, score and revise a proof until the verifier gives it 1 or max_rounds proofs were scored.
    `thinking`: the policy's and the verifier's texts are reasoning, `</think>`, answer."""
    if max_rounds < 1 or verifications < 1:
        raise ValueError(f"need max_rounds >= 1 and verifications >= 1, got {max_rounds} and {verifications}")
    result = ProofResult("", 0.0)

    def write(messages: list[dict]) -> str:
        text = policy(messages)
        _, answer = split_reply(text, thinking)
        if answer is None:
            result.truncated += 1
            return ""
        return split_self_evaluation(answer)[0]

    proof = write(prove_messages(problem))
    for r in range(max_rounds):
        replies = [verifier(verify_messages(problem, proof, rubric)) for _ in range(verifications)]
        verdicts = [parse_score(x, thinking) for x in replies]
        result.unparseable += sum(v is None for v in verdicts)
        scores = [v or 0.0 for v in verdicts]
        worst = min(range(verifications), key=lambda i: scores[i])
        feedback = split_reply(replies[worst], thinking)[1] or ""
        result.rounds.append(Round(proof, sum(scores) / verifications, verdicts, feedback))
        if result.rounds[-1].score >= result.score:
            result.proof, result.score = proof, result.rounds[-1].score
        if result.perfect or r == max_rounds - 1:
            break
        proof = write(refine_messages(problem, proof, feedback))
    return result
