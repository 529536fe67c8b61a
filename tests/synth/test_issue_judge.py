"""The issue judge: its verdicts parsed from a judge's reply, its calls to an OpenAI-compatible
endpoint (a scripted one on a local port), malformed replies and failing endpoints turned into
judge-error without a crash, and what the miner and the command do with each verdict."""

import json

import pytest
from fake_openai import FakeOpenAI
from tiny_repos import make_history

from dsv32.agent.policy import OpenAIPolicy
from dsv32.synth.cli import main
from dsv32.synth.code_miner import MineOptions, mine
from dsv32.synth.code_task import CodeTask
from dsv32.synth.issue_judge import (
    IssueJudge,
    IssueVerdict,
    JudgeReplyError,
    judge_messages,
    parse_verdict,
)

ISSUE = "Fix add: add(2, 3) returns -1 instead of 5"
GOLD = "--- a/calc.py\n+++ b/calc.py\n-    return a - b\n+    return a + b\n"
TESTS = "--- a/tests/test_add.py\n+++ b/tests/test_add.py\n+def test_add():\n+    assert add(2, 3) == 5\n"


def judge(fake: FakeOpenAI, **kw) -> IssueJudge:
    return IssueJudge(OpenAIPolicy(fake.url, thinking_mode="chat"), **kw)


@pytest.mark.parametrize("text, expected", [
    ('{"usable": true, "reason": "States the bug."}', (True, "States the bug.")),
    ('```json\n{"usable": false, "reason": " Only says fix. "}\n```', (False, "Only says fix.")),
    ('First {"usable": true, "reason": "a"} then, on reflection, {"usable": false, "reason": "b"}', (False, "b")),
    ('Note {"x": 1}. Verdict: {"reason": "Clear.", "usable": true}', (True, "Clear.")),
])
def test_the_verdict_is_the_last_json_object_with_a_usable_key(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text, problem", [
    ("", 'the reply holds no JSON object with a "usable" key'),
    ("Yes, it is usable.", 'the reply holds no JSON object with a "usable" key'),
    ("{usable: true, reason: 'x'}", 'the reply holds no JSON object with a "usable" key'),
    ('[true, "a list"]', 'the reply holds no JSON object with a "usable" key'),
    ('{"usable": "yes", "reason": "x"}', '"usable" must be true or false, got "yes"'),
    ('{"usable": 1, "reason": "x"}', '"usable" must be true or false, got 1'),
    ('{"usable": true}', '"reason" must be a non-empty string'),
    ('{"usable": false, "reason": "  "}', '"reason" must be a non-empty string'),
])
def test_a_reply_without_a_verdict_names_what_is_wrong(text, problem):
    with pytest.raises(JudgeReplyError) as e:
        parse_verdict(text)
    assert str(e.value) == problem


def test_a_verdict_over_the_endpoint_and_what_the_judge_is_shown():
    with FakeOpenAI(['{"usable": true, "reason": "It states the bug without the fix."}']) as fake:
        verdict = judge(fake)(ISSUE, GOLD, TESTS)
    assert verdict == IssueVerdict("usable", "It states the bug without the fix.", "judge-model", 1)
    (request,) = fake.seen
    assert request["model"] == "judge-model" and request["temperature"] == 0.0 and "tools" not in request
    system, user = request["messages"]
    assert system["role"] == "system" and "does not give the solution away" in system["content"]
    assert ISSUE in user["content"] and GOLD in user["content"] and TESTS in user["content"]


def test_a_malformed_reply_is_asked_again_with_what_was_wrong():
    with FakeOpenAI(["It looks fine to me.", '{"usable": false, "reason": "It quotes the patch."}']) as fake:
        verdict = judge(fake)(ISSUE, GOLD, TESTS)
    assert verdict == IssueVerdict("unusable", "It quotes the patch.", "judge-model", 2)
    again = fake.seen[1]["messages"]
    assert again[:2] == fake.seen[0]["messages"]
    assert again[2] == {"role": "assistant", "content": "It looks fine to me."}
    assert again[3]["role"] == "user" and 'no JSON object with a "usable" key' in again[3]["content"]


def test_replies_that_never_hold_a_verdict_are_a_judge_error():
    with FakeOpenAI(["", '{"usable": "yes", "reason": "fine"}']) as fake:
        verdict = judge(fake)(ISSUE, GOLD, TESTS)
    assert verdict.verdict == "judge-error" and verdict.calls == 2 and len(fake.seen) == 2
    assert verdict.reason == 'no verdict after 2 replies: "usable" must be true or false, got "yes"'


@pytest.mark.parametrize("reply", [
    400,                                                                                # the endpoint refuses
    b"<html>not json</html>",                                                           # a body that is not JSON
    {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": []},  # no choice at all
], ids=["http-400", "not-json", "no-choices"])
def test_a_failing_endpoint_is_a_judge_error_not_a_crash(reply):
    with FakeOpenAI([reply]) as fake:
        verdict = judge(fake)(ISSUE, GOLD, TESTS)
    assert verdict.verdict == "judge-error" and verdict.calls == 1 and len(fake.seen) == 1
    assert verdict.reason.startswith("the judge's call failed: ")


def test_long_patches_are_cut_in_the_prompt_and_say_so():
    user = judge_messages(ISSUE, "g" * 150, "t" * 80, max_patch_chars=100)[1]["content"]
    assert "g" * 100 + "\n[... 50 characters cut]" in user and "g" * 101 not in user and "t" * 80 in user


def test_the_judge_needs_an_attempt():
    with pytest.raises(ValueError, match="at least one attempt"):
        IssueJudge(policy=None, attempts=0)


# --- the miner and the command -------------------------------------------------------------------
# The repository's "test suite" is a JUnit report that the fix flips from failed to passed, and the
# test command copies it: the judge's rules need a commit that passes the test rules, not a real run.

FAILED = '<testsuite><testcase classname="t" name="a"><failure message="no"/></testcase></testsuite>\n'
PASSED = '<testsuite><testcase classname="t" name="a"/></testsuite>\n'
CMD = "cp report.xml {junit}"


@pytest.fixture(scope="module")
def flip_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("flip") / "repo"
    shas = make_history(repo, [("Start", {"report.xml": FAILED, "tests/test_a.py": "# a\n"}),
                               (ISSUE, {"report.xml": PASSED, "tests/test_a.py": "# a, checked\n"})])
    return repo, shas


def test_a_usable_issue_is_accepted_with_its_verdict_in_the_task(flip_repo, run_options, tmp_path):
    repo, shas = flip_repo
    seen = []

    def usable(issue, gold, tests):
        seen.append((issue, gold, tests))
        return IssueVerdict("usable", "clear", "m", 1)

    out = tmp_path / "out"
    rows = mine(repo, out, options=MineOptions(CMD, run=run_options, judge=usable))
    fix = next(r for r in rows if r["commit"] == shas[1])
    assert fix["reason"] == "accepted" and fix["judge"] == {"verdict": "usable", "reason": "clear", "model": "m",
                                                            "calls": 1}
    assert len(seen) == 1  # not called for the root commit, which no other rule accepts
    issue, gold, tests = seen[0]
    assert issue.strip() == ISSUE and "+++ b/report.xml" in gold and "+++ b/tests/test_a.py" in tests
    task = CodeTask.load(out / fix["task"]["env"])
    assert task.judge == fix["judge"]
    assert json.loads((out / "tasks.jsonl").read_text().splitlines()[0])["judge"] == fix["judge"]


def test_an_unusable_issue_rejects_the_commit_with_the_judges_reason(flip_repo, run_options, tmp_path):
    repo, shas = flip_repo
    out = tmp_path / "out"
    options = MineOptions(CMD, run=run_options, judge=lambda *a: IssueVerdict("unusable", "only says fix", "m", 1))
    fix = next(r for r in mine(repo, out, options=options) if r["commit"] == shas[1])
    assert fix["reason"] == "issue-judged-unusable" and fix["detail"] == "only says fix"
    assert fix["f2p"] == ["t::a"] and fix["judge"]["verdict"] == "unusable"
    assert not (out / "tasks.jsonl").exists() and list((out / "envs").iterdir()) == []


@pytest.mark.parametrize("rule, reason", [("keep", "accepted"), ("reject", "judge-error")])
def test_a_judge_error_keeps_or_rejects_the_commit_by_the_rule(flip_repo, run_options, tmp_path, rule, reason):
    repo, shas = flip_repo
    with FakeOpenAI(["no idea", "still no idea"]) as fake:
        options = MineOptions(CMD, run=run_options, judge=judge(fake), judge_errors=rule)
        fix = next(r for r in mine(repo, tmp_path / "out", options=options) if r["commit"] == shas[1])
    assert fix["reason"] == reason and fix["judge"]["verdict"] == "judge-error" and len(fake.seen) == 2


def test_the_judge_flags_reach_the_endpoint_and_the_table_counts_the_rejection(flip_repo, run_options, tmp_path,
                                                                              capsys):
    repo, _ = flip_repo
    flags = ["--timeout", "60", "--sandbox-root", run_options.sandbox_root, "--test-cmd", CMD]
    flags += ["--unsafe-no-sandbox"] if run_options.unsafe_no_sandbox else []
    with FakeOpenAI(['{"usable": false, "reason": "It only says fix."}'], model="the-judge") as fake:
        assert main(["code", str(repo), "--out", str(tmp_path / "out"), "--judge-base-url", fake.url,
                     "--judge-model", "the-judge", *flags]) == 0
    assert "| rejected | issue-judged-unusable | 1 |" in capsys.readouterr().out
    assert [r["model"] for r in fake.seen] == ["the-judge"]
    assert main(["code", str(repo), "--out", str(tmp_path / "o2"), "--judge-model", "m", *flags]) == 2
    assert "--judge-model needs --judge-base-url" in capsys.readouterr().err
