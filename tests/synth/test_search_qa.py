"""Search QA synthesis (spec §5): long-tail entities, the keep rule, the solvability filter and the
resumable command, with scripted agents over a multihop World corpus. The oracles are the World's
own mentor chain (the true answers and the lines that state them), document frequencies counted
by scanning every document's terms, and pass@k computed by hand from its binomial definition."""

import json
import random
from math import comb

import pytest
from search_fakes import (
    Dispatch,
    Script,
    constructor_replies,
    final,
    tool,
    two_hops,
    url,
    verdict,
    world_corpus,
    wrong_answer,
)

from dsv32.agent.corpus import terms
from dsv32.agent.documents import strip_links
from dsv32.agent.loop import AgentConfig
from dsv32.agent.multihop import ExpertPolicy, mentor_line
from dsv32.engine import SamplingParams
from dsv32.eval.tasks import load_jsonl
from dsv32.rl.tasks import load_tasks
from dsv32.synth import search_cli
from dsv32.synth.cli import main
from dsv32.synth.entities import long_tail, sample_entities
from dsv32.synth.search_prompts import ANSWER_STYLES, CONSTRUCT_SYSTEM, VERIFY_SYSTEM
from dsv32.synth.search_qa import Role, SearchQA
from dsv32.synth.solvability import solvability

S = SamplingParams(max_tokens=4096)
CONFIG = AgentConfig(max_steps=4)


@pytest.fixture(scope="module")
def world():
    return world_corpus()


def pipeline(corpus, constructor, answerers, verifier, passes=1) -> SearchQA:
    return SearchQA(corpus, Role("constructor", constructor, S),
                    [Role(f"answer-{i}", p, S, style=i) for i, p in enumerate(answerers)],
                    Role("verifier", verifier, S), CONFIG, passes=passes)


def entity(corpus, i=0):
    return sample_entities(corpus, i + 1, max_df=10, seed=1)[i]


# ---- entities ----

def test_long_tail_entities_are_the_documents_whose_title_few_documents_mention(world):
    _, corpus = world
    held = [set(terms(d.title + "\n" + strip_links(d.text))) for d in corpus.documents]
    for max_df in (2, 4, 30):
        want = []
        for d in corpus.documents:
            df = sum(set(terms(d.title)) <= h for h in held)
            if df <= max_df:
                want.append((d.url, df))
        assert [(e.url, e.df) for e in long_tail(corpus, max_df)] == want
    assert len(long_tail(corpus, 30)) == len(corpus)  # a World's 30 pages mention anyone at most 30 times


def test_a_sample_is_a_seeded_shuffle_whose_prefixes_agree(world):
    _, corpus = world
    every = long_tail(corpus, 4)
    expected = list(every)
    random.Random(7).shuffle(expected)
    assert sample_entities(corpus, 100, 4, seed=7) == expected
    assert sample_entities(corpus, 3, 4, seed=7) == expected[:3]
    assert sample_entities(corpus, 3, 4, seed=8) != expected[:3]


# ---- the keep rule ----

def test_a_question_is_kept_when_the_truth_is_verified_and_every_candidate_is_shown_wrong(world):
    w, corpus = world
    e = entity(corpus)
    question, answer, evidence = two_hops(w, e.title)
    assert answer == w.chain(e.title, 2)[-1]
    wrong = wrong_answer(w, e.title)
    constructor = Script(constructor_replies(w, e.title))
    answerers = [Script([tool("search", query=e.title), final(wrong)]),
                 Script([tool("search", query="mentor")] * CONFIG.max_steps)]  # never answers
    verifier = Script(verdict("correct", evidence) + verdict("wrong", evidence[1:]))
    d = pipeline(corpus, constructor, answerers, verifier).decide(e)
    assert (d.accepted, d.reason) == (True, None)
    assert d.qa.question == question and d.qa.answer == answer
    assert [(c.answer, c.end) for c in d.candidates] == [(wrong, "answer"), (None, "max_steps")]
    assert [v.label for v in d.truth] == ["correct"] and [v.label for v in d.candidates[0].verdicts] == ["wrong"]
    assert f"Candidate answer: {wrong}" in verifier.seen[-1][-3]["content"]  # the candidate's task
    assert verifier.replies == [] and constructor.replies == []
    for line in (mentor_line(*w.chain(e.title, 1)), mentor_line(*w.chain(e.title, 2)[1:])):
        assert line in {q.quote for q in d.qa.evidence}


def test_a_question_that_an_answer_agent_solves_is_rejected_as_too_easy(world):
    w, corpus = world
    e = entity(corpus)
    _, answer, evidence = two_hops(w, e.title)
    expert = ExpertPolicy(1_000_000)   # solves the multihop question by browsing
    verifier = Script(verdict("correct", evidence))
    d = pipeline(corpus, Script(constructor_replies(w, e.title)),
                 [Script([final(wrong_answer(w, e.title))]), expert], verifier).decide(e)
    assert d.candidates[1].answer == answer == w.chain(e.title, 2)[-1]
    assert (d.accepted, d.reason) == (False, "candidate_correct")
    assert "answer-1" in d.detail and verifier.replies == []   # no candidate needed the verifier


def test_a_candidate_the_verifier_finds_correct_is_rejected(world):
    w, corpus = world
    e = entity(corpus)
    _, answer, evidence = two_hops(w, e.title)
    verifier = Script(verdict("correct", evidence) * 2)
    d = pipeline(corpus, Script(constructor_replies(w, e.title)), [Script([final(f"It is {answer}")])],
                 verifier).decide(e)
    assert (d.accepted, d.reason) == (False, "candidate_correct") and "the verifier found" in d.detail


@pytest.mark.parametrize("verifier_says, why", [
    (lambda ev: verdict("undecided", []), "undecided"),
    (lambda ev: verdict("wrong", ev), "wrong"),
    (lambda ev: verdict("correct", [{"url": ev[0]["url"], "quote": "the moon is made of cheese"}]), "does not contain"),
    (lambda ev: verdict("correct", []), "without evidence"),
    (lambda ev: [final("I think it is right")], "no JSON object"),
])
def test_a_ground_truth_the_verifier_cannot_verify_is_rejected(world, verifier_says, why):
    w, corpus = world
    e = entity(corpus)
    _, _, evidence = two_hops(w, e.title)
    answerer = Script([final("anyone")])
    d = pipeline(corpus, Script(constructor_replies(w, e.title)), [answerer], Script(verifier_says(evidence))).decide(e)
    assert (d.accepted, d.reason) == (False, "truth_not_verified") and why in d.detail
    assert answerer.seen == []   # nobody answered a question whose truth is not established


@pytest.mark.parametrize("candidate_verdicts, passes", [
    (lambda ev: verdict("undecided", []), 1),
    (lambda ev: verdict("wrong", []), 1),                               # wrong, but shown by nothing
    (lambda ev: verdict("wrong", ev) + verdict("undecided", []), 2),    # the passes disagree
])
def test_a_candidate_the_verifier_cannot_decide_is_rejected(world, candidate_verdicts, passes):
    w, corpus = world
    e = entity(corpus)
    _, _, evidence = two_hops(w, e.title)
    verifier = Script(verdict("correct", evidence) * passes + candidate_verdicts(evidence))
    d = pipeline(corpus, Script(constructor_replies(w, e.title)), [Script([final(wrong_answer(w, e.title))])],
                 verifier, passes=passes).decide(e)
    assert (d.accepted, d.reason) == (False, "candidate_undecided") and "answer-0" in d.detail
    assert len(d.candidates[0].verdicts) == passes


@pytest.mark.parametrize("override, reason", [
    ({"evidence": [{"url": "https://people.local/Nobody", "quote": "Nobody studied under anyone."}]},
     "evidence_not_found"),
    ({"evidence": []}, "construction_failed"),
    ({"answer": ""}, "construction_failed"),
])
def test_a_constructor_reply_without_grounded_evidence_is_rejected(world, override, reason):
    w, corpus = world
    e = entity(corpus)
    verifier = Script([])
    d = pipeline(corpus, Script(constructor_replies(w, e.title, **override)), [Script([])], verifier).decide(e)
    assert (d.accepted, d.reason) == (False, reason) and verifier.seen == []


def test_a_question_holding_its_answer_and_a_broken_answer_agent_are_rejected(world):
    w, corpus = world
    e = entity(corpus)
    question, answer, evidence = two_hops(w, e.title)
    leaky = constructor_replies(w, e.title, question=f"{question} (Hint: {answer.upper()}.)")
    d = pipeline(corpus, Script(leaky), [Script([])], Script([])).decide(e)
    assert (d.accepted, d.reason) == (False, "answer_in_question")
    d = pipeline(corpus, Script(constructor_replies(w, e.title)), [Script([RuntimeError("endpoint down")])],
                 Script(verdict("correct", evidence))).decide(e)
    assert (d.accepted, d.reason) == (False, "answer_agent_failed") and "policy_error" in d.detail


# ---- solvability ----

def test_pass_at_k_keeps_a_question_solved_once_and_drops_one_never_solved(world):
    w, corpus = world
    (q0, a0, _), (q1, a1, _) = two_hops(w, entity(corpus, 0).title), two_hops(w, entity(corpus, 1).title)
    right = {0: [False, True, False, False], 1: [False] * 4}   # attempt i of each question
    replies = [final([a0, a1][t] if right[t][i] else "Nobody Known") for i in range(4) for t in (0, 1)]
    results = solvability([(q0, a0), (q1, a1)], Script(replies), list, k=4, config=CONFIG)
    assert [(r.n, r.correct) for r in results] == [(4, 1), (4, 0)]
    # pass@k = 1 - C(n-c, k) / C(n, k)
    assert results[0].pass_at_k == 1 - comb(3, 4) / comb(4, 4) == 1.0 and results[0].kept
    assert results[1].pass_at_k == 0.0 and not results[1].kept
    again = solvability([(q0, a0)], Script([final(a0 if r else "x") for r in right[0]]), list, k=2, n=4,
                        config=CONFIG)[0]
    assert again.pass_at_k == pytest.approx(1 - comb(3, 2) / comb(4, 2)) == pytest.approx(0.5)


# ---- the resumable run ----

def accepted_replies(w, start):
    _, _, evidence = two_hops(w, start)
    return constructor_replies(w, start), verdict("correct", evidence) + verdict("wrong", evidence), \
        [final(wrong_answer(w, start))]


def test_a_killed_run_resumes_without_losing_or_redoing_a_decision(world, tmp_path):
    w, corpus = world
    es = sample_entities(corpus, 3, max_df=10, seed=1)
    c0, v0, a0 = accepted_replies(w, es[0].title)
    killed = Script(c0 + [tool("search", query=es[1].title), KeyboardInterrupt()])
    p = pipeline(corpus, killed, [Script(a0)], Script(v0))
    with pytest.raises(KeyboardInterrupt):
        search_cli.synthesize(p, es, tmp_path)
    assert [d["entity"]["url"] for d in search_cli.read_jsonl(tmp_path / "decisions.jsonl")] == [es[0].url]
    assert len(search_cli.read_jsonl(tmp_path / "tasks.jsonl")) == 1   # the kept one is already a task
    # the rerun does entity 1 (solved by an answer agent: rejected) and 2 (kept), and not entity 0 again
    _, answer1, evidence1 = two_hops(w, es[1].title)
    c2, v2, a2 = accepted_replies(w, es[2].title)
    constructor = Script(constructor_replies(w, es[1].title) + c2)
    p = pipeline(corpus, constructor, [Script([final(answer1)] + a2)], Script(verdict("correct", evidence1) + v2))
    search_cli.synthesize(p, es, tmp_path)
    assert [m[-1]["content"].split(" (its page")[0] for m in constructor.seen[::3]] == [
        f"The entity: {es[1].title}", f"The entity: {es[2].title}"]
    decisions = search_cli.read_jsonl(tmp_path / "decisions.jsonl")
    assert [(d["entity"]["url"], d["reason"]) for d in decisions] == [
        (es[0].url, None), (es[1].url, "candidate_correct"), (es[2].url, None)]
    rl_tasks, eval_tasks = load_tasks(tmp_path / "tasks.jsonl"), load_jsonl(tmp_path / "tasks.jsonl", template="none")
    assert [t.answer for t in rl_tasks] == [w.chain(es[0].title, 2)[-1], w.chain(es[2].title, 2)[-1]]
    assert [t.answer for t in eval_tasks] == [t.answer for t in rl_tasks]
    assert all(t.grader == "exact" and {f["function"]["name"] for f in t.tools} == {"search", "open", "find"}
               for t in rl_tasks)
    assert eval_tasks[0].messages[0]["content"].startswith(two_hops(w, es[0].title)[0])


def test_the_solvability_filter_is_resumable_and_writes_only_solvable_tasks(world, tmp_path):
    w, corpus = world
    es = sample_entities(corpus, 2, max_df=10, seed=1)
    (c0, v0, a0), (c1, v1, a1) = accepted_replies(w, es[0].title), accepted_replies(w, es[1].title)
    answer1 = w.chain(es[1].title, 2)[-1]
    p = pipeline(corpus, Script(c0 + c1), [Script(a0 + a1)], Script(v0 + v1))
    solver = Script([final("nobody"), KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):
        search_cli.synthesize(p, es, tmp_path, solver, k=2, config=CONFIG)
    assert search_cli.read_jsonl(tmp_path / "solvability.jsonl") == []   # the decision is kept, unchecked
    assert "| kept, solvability not checked | 1 |" in search_cli.summary(tmp_path, 2)
    p = pipeline(corpus, Script(c1), [Script(a1)], Script(v1))
    solver = Script([final("nobody"), final("nobody"), final("nobody"), final(answer1)])
    search_cli.synthesize(p, es, tmp_path, solver, k=2, config=CONFIG)
    checked = search_cli.read_jsonl(tmp_path / "solvability.jsonl")
    assert [(r["url"], r["correct"], r["pass_at_k"]) for r in checked] == [(es[0].url, 0, 0.0), (es[1].url, 1, 1.0)]
    assert [t.answer for t in load_tasks(tmp_path / "tasks.jsonl")] == [answer1]
    table = search_cli.summary(tmp_path, 2)
    assert "| kept | 1 |" in table and "| dropped: pass@2 = 0 | 1 |" in table and "| total | 2 |" in table


def test_the_command_writes_tasks_and_a_summary_table(world, tmp_path, monkeypatch, capsys):
    w, corpus = world
    corpus.save(tmp_path / "corpus")
    e = sample_entities(corpus, 1, max_df=3, seed=0)[0]
    c, v, a = accepted_replies(w, e.title)
    answer = Script(a + [final("Someone Else")])
    verifier = Script(v + verdict("wrong", two_hops(w, e.title)[2]))   # the truth, then two candidates
    endpoint = Dispatch({CONSTRUCT_SYSTEM[:40]: Script(c), VERIFY_SYSTEM[:40]: verifier}
                        | {s[:40]: answer for s in ANSWER_STYLES})
    monkeypatch.setattr(search_cli, "OpenAIPolicy", lambda *args, **kwargs: endpoint)
    argv = ["search", "--corpus", str(tmp_path / "corpus"), "--n", "1", "--base-url", "http://endpoint/v1",
            "--answer-agents", "2", "--out", str(tmp_path / "qa")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| kept | 1 |" in printed and "1 tasks in" in printed and verifier.replies == []
    row = json.loads((tmp_path / "qa" / "tasks.jsonl").read_text())
    assert row["answer"] == w.chain(e.title, 2)[-1] and url(e.title) in json.dumps(
        search_cli.read_jsonl(tmp_path / "qa" / "decisions.jsonl"))
    assert main(argv) == 0 and "| total | 1 |" in capsys.readouterr().out   # nothing redone
