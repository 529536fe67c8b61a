"""Search QA synthesis over a local corpus (spec §5, search agent): one long-tail entity in, one
decision out, kept or rejected with its reason.

Three kinds of agent, each an `AgentLoop` over its own `Policy` with the browser's `search`,
`open` and `find` (a fresh browser per episode):
- the question constructor explores the entity and writes a question, its ground-truth answer
  and the evidence: lines of corpus documents, each checked to be in the document it cites;
- N answer agents (each its own policy, system prompt and sampling) answer the question;
- the verifier, given the question and an answer (and the ground truth, for a candidate), says
  "correct", "wrong" or "undecided" with evidence, itself checked against the corpus; it runs
  `passes` times per answer and a label stands only if every pass gives it.

The keep rule is the paper's: the ground truth is verified correct AND every candidate answer is
verifiably wrong. So a question is rejected, with the first reason that applies, when
  construction_failed   the constructor gave no question, answer and evidence that parse
  evidence_not_found    a quote of its evidence is not in the document it cites
  answer_in_question    the question contains its own answer
  truth_not_verified    the verifier did not find the ground truth correct
  answer_agent_failed   an answer agent's run broke (policy error, unparsable reply): no candidate
  candidate_correct     a candidate is the ground truth (too easy), or the verifier found it correct
  candidate_undecided   the verifier could not show a candidate wrong
An answer agent that ran out of steps or tokens without answering has no candidate, which is
wrong without a verifier's call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from dsv32.agent.browser import Browser
from dsv32.agent.corpus import Corpus
from dsv32.agent.documents import strip_links
from dsv32.agent.loop import AgentConfig, AgentLoop, Episode
from dsv32.agent.policy import Policy
from dsv32.engine import SamplingParams
from dsv32.eval.grade import final_answer
from dsv32.synth.entities import Entity
from dsv32.synth.search_prompts import (
    ReplyError,
    answer_messages,
    construct_messages,
    evidence_list,
    json_reply,
    text_field,
    verify_messages,
)

VERDICTS = ("correct", "wrong", "undecided")
REASONS = ("construction_failed", "evidence_not_found", "answer_in_question", "truth_not_verified",
           "answer_agent_failed", "candidate_correct", "candidate_undecided")
BROKEN = ("policy_error", "bad_reply", "tool_setup")   # an episode end that says nothing about the question
MIN_QUOTE_WORDS = 3


@dataclass(frozen=True)
class Evidence:
    url: str
    quote: str


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True)
class Verdict:
    label: str                  # one of VERDICTS
    reason: str = ""
    evidence: tuple[Evidence, ...] = ()


@dataclass
class Candidate:
    agent: str
    answer: str | None          # None: the agent ended without answering
    end: str                    # its episode's end
    verdicts: list[Verdict] = field(default_factory=list)   # one per verifier pass


@dataclass
class Decision:
    entity: Entity
    accepted: bool
    reason: str | None = None   # one of REASONS when rejected
    detail: str = ""
    qa: QA | None = None
    truth: list[Verdict] = field(default_factory=list)       # the ground truth's verdicts, one per pass
    candidates: list[Candidate] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["entity"] = self.entity.to_json()
        return out


@dataclass(frozen=True)
class Role:
    """One agent's configuration: its policy, sampling and (answer agents) system prompt style."""
    name: str
    policy: Policy
    sampling: SamplingParams
    style: int = 0


def normalise(text: str) -> str:
    """Casefolded words: punctuation and markdown links' targets dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", strip_links(text)).casefold().split())


def same_answer(a: str, b: str) -> bool:
    """Whether two answers are the same text up to case, punctuation and spacing."""
    return normalise(a) == normalise(b)


def quote_found(corpus: Corpus, evidence: Evidence) -> str | None:
    """Why a quote does not stand as evidence (None when it does): it must hold MIN_QUOTE_WORDS
    words and appear, up to case, punctuation and spacing, in the document at its url."""
    doc = corpus.get(evidence.url)
    quote = normalise(evidence.quote)
    if len(quote.split()) < MIN_QUOTE_WORDS:
        return f"the quote {evidence.quote!r} has fewer than {MIN_QUOTE_WORDS} words"
    if doc is None:
        return f"{evidence.url} is not a document of the corpus"
    if f" {quote} " not in f" {normalise(doc.title + chr(10) + doc.text)} ":
        return f"{evidence.url} does not contain {evidence.quote!r}"
    return None


def combine(verdicts: list[Verdict]) -> str:
    """The label of several passes: the one they all give, else undecided."""
    labels = {v.label for v in verdicts}
    return labels.pop() if len(labels) == 1 else "undecided"


class SearchQA:
    """The pipeline over one corpus. `config` bounds every agent's run (steps, tokens, tool calls)."""

    def __init__(self, corpus: Corpus, constructor: Role, answerers: list[Role], verifier: Role,
                 config: AgentConfig | None = None, passes: int = 1, depth: int = 2, breadth: int = 3,
                 on_episode: Callable[[str, Episode], None] | None = None):
        if not answerers:
            raise ValueError("the keep rule needs at least one answer agent")
        if passes < 1 or depth < 1 or breadth < 1:
            raise ValueError(f"passes, depth and breadth must be >= 1, got {passes}, {depth}, {breadth}")
        self.corpus, self.constructor, self.answerers, self.verifier = corpus, constructor, answerers, verifier
        self.config, self.passes, self.depth, self.breadth = config or AgentConfig(max_steps=40), passes, depth, breadth
        self.on_episode = on_episode or (lambda role, episode: None)

    def tools(self) -> list:
        return Browser(self.corpus).tools()

    def episode(self, role: Role, messages: list[dict]) -> Episode:
        ep = AgentLoop(role.policy, self.tools, role.sampling, self.config).run(messages)
        self.on_episode(role.name, ep)
        return ep

    def construct(self, entity: Entity) -> QA:
        """The constructor's question, answer and evidence; ReplyError says what is missing."""
        ep = self.episode(self.constructor, construct_messages(entity, self.depth, self.breadth))
        if ep.end != "answer":
            raise ReplyError(f"the constructor's run ended with {ep.end}" + (f": {ep.error}" if ep.error else ""))
        obj = json_reply(ep.answer)
        evidence = tuple(Evidence(u, q) for u, q in evidence_list(obj))
        if not evidence:
            raise ReplyError("the constructor cited no evidence")
        return QA(text_field(obj, "question"), text_field(obj, "answer"), evidence)

    def verify(self, question: str, answer: str, truth: str | None = None) -> Verdict:
        """One verifier pass over an answer (the ground truth when truth is None). A verdict whose
        evidence is missing or not in the corpus is undecided."""
        ep = self.episode(self.verifier, verify_messages(question, answer, truth))
        if ep.end != "answer":
            return Verdict("undecided", f"the verifier's run ended with {ep.end}")
        try:
            obj = json_reply(ep.answer)
            label = text_field(obj, "verdict").lower()
            evidence = tuple(Evidence(u, q) for u, q in evidence_list(obj))
        except ReplyError as e:
            return Verdict("undecided", f"the verifier's reply: {e}")
        if label not in VERDICTS:
            return Verdict("undecided", f"the verifier's verdict {label!r} is not one of {', '.join(VERDICTS)}")
        reason = str(obj.get("reason", ""))
        if label != "undecided":
            if not evidence:
                return Verdict("undecided", f"the verifier said {label} without evidence", evidence)
            for e in evidence:
                if (why := quote_found(self.corpus, e)) is not None:
                    return Verdict("undecided", f"the verifier said {label}, but {why}", evidence)
        return Verdict(label, reason, evidence)

    def answer(self, role: Role, question: str) -> Candidate:
        ep = self.episode(role, answer_messages(question, role.style))
        text = final_answer(ep.answer) if ep.end == "answer" and ep.answer else ""
        return Candidate(role.name, text or None, ep.end)

    def decide(self, entity: Entity) -> Decision:
        """Construct, check, answer and verify; the decision carries everything it rests on."""
        d = Decision(entity, accepted=False)
        try:
            d.qa = qa = self.construct(entity)
        except ReplyError as e:
            return self._reject(d, "construction_failed", str(e))
        for e in qa.evidence:
            if (why := quote_found(self.corpus, e)) is not None:
                return self._reject(d, "evidence_not_found", why)
        if f" {normalise(qa.answer)} " in f" {normalise(qa.question)} ":
            return self._reject(d, "answer_in_question", f"the question contains its answer {qa.answer!r}")
        d.truth = [self.verify(qa.question, qa.answer) for _ in range(self.passes)]
        if (label := combine(d.truth)) != "correct":
            return self._reject(d, "truth_not_verified", f"the verifier found the ground truth {label}: "
                                + "; ".join(v.reason for v in d.truth if v.label != "correct"))
        d.candidates = [self.answer(role, qa.question) for role in self.answerers]
        for c in d.candidates:
            if c.answer is None and c.end in BROKEN:
                return self._reject(d, "answer_agent_failed", f"{c.agent}'s run ended with {c.end}")
            if c.answer is not None and same_answer(c.answer, qa.answer):
                return self._reject(d, "candidate_correct", f"{c.agent} answered {c.answer!r}, the ground truth")
        for c in d.candidates:
            if c.answer is None:
                continue
            c.verdicts = [self.verify(qa.question, c.answer, qa.answer) for _ in range(self.passes)]
            label = combine(c.verdicts)
            if label == "correct":
                return self._reject(d, "candidate_correct", f"the verifier found {c.agent}'s {c.answer!r} correct")
            if label != "wrong":
                return self._reject(d, "candidate_undecided", f"{c.agent}'s {c.answer!r}: "
                                    + "; ".join(v.reason for v in c.verdicts if v.label != "wrong"))
        d.accepted = True
        return d

    @staticmethod
    def _reject(d: Decision, reason: str, detail: str) -> Decision:
        d.reason, d.detail = reason, detail
        return d
