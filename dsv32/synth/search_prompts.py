"""The search-QA agents' prompts (ours; the paper does not publish DeepSeek's), and the readers of
their final replies.

Every agent works with the browser's `search`, `open` and `find` over the local corpus. The
question constructor and the verifier end with one JSON object (a ```json fence is allowed); an
answer agent ends with its answer alone. Evidence is a list of {"url", "quote"}: a url of the
corpus and a line of that document, copied, which `search_qa` checks against the corpus.
"""

from __future__ import annotations

import json
import re

from dsv32.synth.entities import Entity

CONSTRUCT_SYSTEM = """You write hard, checkable questions for search agents. You have a search engine over a \
document collection: `search` finds pages, `open` reads a page or follows a link, `find` looks for text in a page.

Explore the entity you are given: open its page, follow what it links to or mentions, search for related pages. \
Then write ONE question that
- needs {depth} linked facts, found on different pages, to answer (a chain of {depth} hops);
- draws on at least {breadth} distinct facts in all;
- has exactly one short answer (a name, a number, a date, a place), and does not contain that answer;
- cannot be answered from the entity's page alone or from general knowledge.

End with only this JSON object as your reply:
{{"question": "...", "answer": "...", "evidence": [{{"url": "...", "quote": "..."}}]}}
where each evidence quote is one line copied exactly from the page at its url, and together the quotes \
establish the answer."""

CONSTRUCT_USER = "The entity: {title} (its page: {url}). Explore it and write the question."

ANSWER_STYLES = (  # the answer agents' configurations differ in their system prompt (and temperature, model)
    ("You answer questions by searching a document collection with `search`, `open` and `find`. "
     "Check each fact on the page that states it."),
    ("You are a careful researcher. Break the question into steps, search for each step, and open the pages "
     "you rely on before you answer."),
    "Answer quickly: search for the key terms, read the best result, and answer.",
)
ANSWER_RULE = "Reply with the answer alone: no explanation, no sentence around it."

SOLVE_PROMPT = ("{question}\n\nUse the search tools to find the answer. "
                "Reply with the answer alone: no explanation, no sentence around it.")

VERIFY_SYSTEM = """You check answers to questions against a document collection, with `search`, `open` and \
`find`. Believe only what a page of the collection states. Open the pages you cite.

End with only this JSON object as your reply:
{"verdict": "correct" | "wrong" | "undecided", "evidence": [{"url": "...", "quote": "..."}], "reason": "..."}
- "correct": the pages show that the answer is right;
- "wrong": the pages show that it is not (for instance they establish a different answer);
- "undecided": you could not establish either.
Each evidence quote is one line copied exactly from the page at its url; "correct" and "wrong" need at \
least one."""

VERIFY_TRUTH = "Question: {question}\nProposed answer: {answer}\n\nIs the proposed answer correct?"
VERIFY_CANDIDATE = ("Question: {question}\nReference answer (believed correct, check it too): {truth}\n"
                    "Candidate answer: {answer}\n\nIs the candidate answer correct?")

FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


class ReplyError(ValueError):
    """An agent's final reply that does not hold what its prompt asks for."""


def construct_messages(entity: Entity, depth: int, breadth: int) -> list[dict]:
    return [{"role": "system", "content": CONSTRUCT_SYSTEM.format(depth=depth, breadth=breadth)},
            {"role": "user", "content": CONSTRUCT_USER.format(title=entity.title, url=entity.url)}]


def answer_messages(question: str, style: int) -> list[dict]:
    return [{"role": "system", "content": ANSWER_STYLES[style % len(ANSWER_STYLES)] + " " + ANSWER_RULE},
            {"role": "user", "content": question}]


def verify_messages(question: str, answer: str, truth: str | None = None) -> list[dict]:
    """The verifier's task for the ground truth (truth None) or for a candidate beside it."""
    user = (VERIFY_TRUTH.format(question=question, answer=answer) if truth is None
            else VERIFY_CANDIDATE.format(question=question, truth=truth, answer=answer))
    return [{"role": "system", "content": VERIFY_SYSTEM}, {"role": "user", "content": user}]


def solve_prompt(question: str) -> str:
    """The prompt of a kept task (what the trained model and the solvability attempts are given)."""
    return SOLVE_PROMPT.format(question=question)


def json_reply(text: str | None) -> dict:
    """The JSON object a reply ends with: a ```json fence, else the text from its first `{` to its
    last `}`."""
    if not text or not text.strip():
        raise ReplyError("the reply is empty")
    fenced = FENCE.findall(text)
    body = fenced[-1] if fenced else text[text.find("{"):text.rfind("}") + 1]
    if not body:
        raise ReplyError("the reply holds no JSON object")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ReplyError(f"the reply's JSON does not parse: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ReplyError(f"the reply's JSON is a {type(obj).__name__}, not an object")
    return obj


def evidence_list(obj: dict) -> list[tuple[str, str]]:
    """The (url, quote) pairs of a reply's "evidence" field."""
    items = obj.get("evidence", [])
    if not isinstance(items, list):
        raise ReplyError("'evidence' is not a list")
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("url"), str) and isinstance(item.get("quote"), str)):
            raise ReplyError(f"evidence item {i} is not an object with string fields 'url' and 'quote'")
        out.append((item["url"], item["quote"]))
    return out


def text_field(obj: dict, name: str) -> str:
    value = obj.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ReplyError(f"field {name!r} is missing or not a non-empty string")
    return value.strip()
