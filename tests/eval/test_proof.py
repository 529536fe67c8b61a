"""Generate → verify → refine with a scripted policy and verifier (fakes returning fixed texts):
when the loop stops, which proof it keeps, and how strictly scores are read."""

import pytest

from dsv32.eval.proof import (
    SELF_EVALUATION,
    generate_verify_refine,
    parse_score,
    split_self_evaluation,
)


def answer(proof: str, self_score: str = "1") -> str:
    return f"let me think</think>{proof}\n{SELF_EVALUATION}\nlooks right \\boxed{{{self_score}}}"


class Policy:
    """Writes the proofs P1, P2, ... in turn and keeps what it was asked."""

    def __init__(self):
        self.asked = []

    def __call__(self, messages):
        self.asked.append(messages[-1]["content"])
        return answer(f"P{len(self.asked)}")


class Verifier:
    """Scores a proof by a table (proof -> replies, one per verification in turn)."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def __call__(self, messages):
        proof = messages[-1]["content"].split("## Proof\n")[1].split("\n")[0]
        self.asked.append(proof)
        replies = self.table[proof]
        return replies[sum(p == proof for p in self.asked[:-1]) % len(replies)]


def test_the_loop_stops_at_the_first_perfect_score_and_refines_with_the_findings():
    policy = Policy()
    verifier = Verifier({"P1": ["ok</think>step 2 is unjustified \\boxed{0}"],
                         "P2": ["ok</think>minor gap in step 3 \\boxed{0.5}"], "P3": ["ok</think>\\boxed{1}"]})
    r = generate_verify_refine("Prove 1 = 1.", policy, verifier, max_rounds=16)
    assert (r.proof, r.score, r.perfect, len(r.rounds)) == ("P3", 1.0, True, 3)
    assert verifier.asked == ["P1", "P2", "P3"] and len(policy.asked) == 3
    assert "P1" in policy.asked[1] and "step 2 is unjustified" in policy.asked[1]  # refined with the findings
    assert [x.score for x in r.rounds] == [0.0, 0.5, 1.0] and r.unparseable == 0
    assert SELF_EVALUATION not in verifier.asked[0]  # the verifier sees the proof, not the self-analysis


def test_at_the_round_limit_the_best_proof_is_kept_the_latest_among_equals():
    scores = {"P1": "0.5", "P2": "0", "P3": "0.5", "P4": "0", "P5": "1"}
    verifier = Verifier({p: [f"</think>\\boxed{{{s}}}"] for p, s in scores.items()})
    r = generate_verify_refine("Prove it.", Policy(), verifier, max_rounds=4)
    # four proofs scored (P5 never written): 0.5, 0, 0.5, 0 -> P3, the later of the two 0.5s
    assert (len(r.rounds), r.proof, r.score, r.perfect) == (4, "P3", 0.5, False)


def test_several_verifications_average_and_the_harshest_gives_the_feedback():
    policy = Policy()
    verifier = Verifier({"P1": ["</think>fine \\boxed{1}", "</think>lemma 2 is false \\boxed{0}"],
                         "P2": ["</think>\\boxed{1}"]})
    r = generate_verify_refine("Prove it.", policy, verifier, max_rounds=3, verifications=2)
    assert [x.score for x in r.rounds] == [0.5, 1.0] and r.rounds[0].verdicts == [1.0, 0.0]
    assert "lemma 2 is false" in policy.asked[1]


def test_unparseable_verdicts_count_as_zero_and_are_counted():
    replies = ["</think>\\boxed{0.7}", "</think>score: 1", "\\boxed{1} but the thinking never closed"]
    verifier = Verifier({f"P{i}": [x] for i, x in enumerate(replies, 1)})
    r = generate_verify_refine("Prove it.", Policy(), verifier, max_rounds=3)
    assert [x.score for x in r.rounds] == [0.0, 0.0, 0.0] and r.unparseable == 3
    assert r.rounds[0].verdicts == [None]


def test_a_truncated_policy_reply_is_an_empty_proof_and_is_counted():
    r = generate_verify_refine("Prove it.", lambda m: "thinking forever", Verifier({"": ["</think>\\boxed{0}"]}),
                               max_rounds=2)
    assert r.truncated == 2 and [x.proof for x in r.rounds] == ["", ""]


@pytest.mark.parametrize("reply, score", [
    ("\\boxed{1}", 1.0), ("\\boxed{ 0.5 }", 0.5), ("\\boxed{0}", 0.0), ("\\boxed{1} no, \\boxed{0}", 0.0),
    ("\\boxed{1.0}", None), ("\\boxed{1/2}", None), ("\\boxed{0.50}", None), ("score 1", None), ("", None)])
def test_scores_are_read_strictly_from_the_last_box(reply, score):
    assert parse_score(reply) == score


def test_in_thinking_mode_a_box_inside_the_reasoning_does_not_count():
    assert parse_score("\\boxed{1}</think>no box", thinking=True) is None
    assert parse_score("\\boxed{0}</think>\\boxed{1}", thinking=True) == 1.0


def test_an_answer_splits_into_proof_analysis_and_self_score():
    assert split_self_evaluation(f"proof\n{SELF_EVALUATION}\nall fine \\boxed{{0.5}}") == (
        "proof", "all fine \\boxed{0.5}", 0.5)
    assert split_self_evaluation("proof only") == ("proof only", None, None)
    assert split_self_evaluation(f"proof\n{SELF_EVALUATION}\nno score")[2] is None
