"""The issue judge: an LLM reads a mined code task's issue text (the commit message) beside its
gold patch and test patch, and says whether the text is a usable task statement (spec §5, "Code
agent": issue-fix pairs filtered with heuristics and an LLM).

Usable means, by the rubric in `RUBRIC`: the text states a problem or a wanted behaviour that a
developer could work from without seeing the commit, the tests check what it asks for, and it
does not give the solution away (no patch code, no step-by-step edit instructions). The judge
answers with one JSON object, `{"usable": true|false, "reason": "..."}`.

A reply that does not hold such an object (no JSON, `usable` not a boolean, no reason) is asked
again once, with what was wrong (`attempts` calls in all). When no attempt gives a verdict, or
the endpoint fails, the verdict is `judge-error`, with the reason; nothing here raises for a bad
reply. What the miner does with each verdict is its rule (dsv32.synth.code_miner): `unusable`
rejects the commit as `issue-judged-unusable`; `judge-error` keeps it, or rejects it as
`judge-error` when asked to.

The policy is any `dsv32.agent.policy.Policy`; `dsv32 synth code --judge-base-url` uses
`OpenAIPolicy` (any OpenAI-compatible endpoint), in chat mode (no thinking asked for).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from dsv32.agent.policy import Policy
from dsv32.engine import SamplingParams

VERDICTS = ("usable", "unusable", "judge-error")
MAX_PATCH_CHARS = 12000   # each patch is cut to this many characters in the prompt

RUBRIC = """You judge whether a commit message can serve as the task statement (the "issue") of a coding task.
A solver will see only the issue text and the repository before the commit. Hidden tests (the test patch below)
decide whether the solver's change is right; the gold patch below is the commit's own change to the source.

The issue is USABLE only if all of these hold:
1. It states a problem to fix or a behaviour to add, concretely enough that a developer who has not seen the
   commit could work out what to do (not just "fix", "wip", "update", "address review comments", a version bump,
   or a reference such as "see #123" with nothing else).
2. What it asks for is what the tests check: a solver who does what it says can make the tests pass.
3. It does not give the solution away: it does not contain the patch's code, a diff, or edit-by-edit
   instructions that amount to the patch. Naming the function, file or module to change is allowed.

Answer with one JSON object and nothing else:
{"usable": true or false, "reason": "one sentence: which rule decides, and why"}"""

TASK = """## Issue text (the commit message)

{issue}

## Gold patch (the commit's source change; the solver does not see it)

{gold}

## Test patch (the hidden tests)

{tests}"""

RETRY = """Your reply could not be used: {why}.
Answer again with one JSON object and nothing else: {{"usable": true or false, "reason": "one sentence"}}"""


class JudgeReplyError(ValueError):
    """A judge's reply holds no usable verdict; the message says what is wrong with it."""


@dataclass(frozen=True)
class IssueVerdict:
    verdict: str        # one of VERDICTS
    reason: str         # the judge's reason, or what went wrong (judge-error)
    model: str = ""     # the judge's model, when the policy names one
    calls: int = 0      # policy calls made

    def to_json(self) -> dict:
        return asdict(self)


def cut(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and a note of how many were cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} characters cut]"


def judge_messages(issue: str, gold_patch: str, test_patch: str, max_patch_chars: int = MAX_PATCH_CHARS) -> list[dict]:
    """The judge's first prompt: the rubric as the system message, the task as the user message."""
    task = TASK.format(issue=issue.strip() or "(empty)", gold=cut(gold_patch, max_patch_chars),
                       tests=cut(test_patch, max_patch_chars))
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": task}]


def parse_verdict(text: str) -> tuple[bool, str]:
    """(usable, reason) from a judge's reply: the last JSON object in it that has a "usable" key
    (text or a code fence around it is allowed). Raises JudgeReplyError naming the problem."""
    decoder, found = json.JSONDecoder(), None
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                obj, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            if isinstance(obj, dict) and "usable" in obj:
                found = obj
    if found is None:
        raise JudgeReplyError('the reply holds no JSON object with a "usable" key')
    usable, reason = found["usable"], found.get("reason")
    if not isinstance(usable, bool):
        raise JudgeReplyError(f'"usable" must be true or false, got {json.dumps(usable)}')
    if not isinstance(reason, str) or not reason.strip():
        raise JudgeReplyError('"reason" must be a non-empty string')
    return usable, reason.strip()


@dataclass
class IssueJudge:
    """(issue, gold patch, test patch) -> IssueVerdict over a policy; see the module docstring."""

    policy: Policy
    attempts: int = 2
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=1024, temperature=0.0))
    max_patch_chars: int = MAX_PATCH_CHARS

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"the judge needs at least one attempt, got attempts={self.attempts}")

    @property
    def model(self) -> str:
        return str(getattr(self.policy, "model", ""))

    def __call__(self, issue: str, gold_patch: str, test_patch: str) -> IssueVerdict:
        messages = judge_messages(issue, gold_patch, test_patch, self.max_patch_chars)
        why = ""
        for call in range(1, self.attempts + 1):
            try:
                reply = self.policy(messages, [], self.sampling)
            except Exception as e:  # noqa: BLE001 - an optional filter: any failure of the call is a judge-error
                return IssueVerdict("judge-error", f"the judge's call failed: {type(e).__name__}: {e}", self.model,
                                    call)
            if reply.message is None:
                why = reply.error or "the reply does not parse"
                text = reply.text
            else:
                text = reply.message.get("content") or ""
                try:
                    usable, reason = parse_verdict(text)
                    return IssueVerdict("usable" if usable else "unusable", reason, self.model, call)
                except JudgeReplyError as e:
                    why = str(e)
            messages = [*messages, {"role": "assistant", "content": text},
                        {"role": "user", "content": RETRY.format(why=why)}]
        return IssueVerdict("judge-error", f"no verdict after {self.attempts} replies: {why}", self.model,
                            self.attempts)
