"""A multi-hop search task over a local corpus, and a scripted expert that solves it with the
browser's three verbs (spec §4: search agents managing their context).

The world: a few hundred people, each with a page of one-fact lines, among them
`{name} studied under {mentor}.` The mentor links form one cycle through everyone, so a chain of
any length up to the population is well defined and never repeats. Pages also name people in
other relations (`taught`, `met`), so a name's search results hold decoys, and a page's own name
is its title. A question asks where `hops` mentor links lead from a start:

    Start at Aldo Brenn and follow "studied under" 3 times: whose name do you reach?

Its answer is one full name, checked exactly (`grade`). Each hop needs the mentor line of the
current person's page: in the search result's snippet when it sits near the top of the page, else
in the opened page's first view, else found with `find` — one to three calls a hop, so the path
length varies with the page layout, and a question's context grows with its hops until context
management (dsv32.agent.context) has to act.

`ExpertPolicy` is a `Policy` (dsv32.agent.policy) that reads only what it is shown: the task, the
visible assistant turns and tool results, a summary. Every reasoning it writes starts with its
state, `Hop j of K: the mentor of X[ is Y].`, and a Summary is that line, so it can go on from any
view that context management leaves: a kept round, a summary, or the bare task (from the start).
Its trajectories are the SFT data of experiments/agent_context.py, and its success rate under each
strategy is the ceiling a trained model is compared with.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dsv32.agent.context import SUMMARY_HEADER, SUMMARY_REQUEST
from dsv32.agent.documents import Document
from dsv32.agent.policy import Reply
from dsv32.chat import encode_completion, encode_messages
from dsv32.engine import SamplingParams

DOMAIN = "people.local"
ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
          "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rk"]
CITIES = ["Tarsk", "Velmora", "Oduin", "Pellax", "Qorvath", "Isbel", "Marrow", "Kettle Bay", "Aster", "Lunwick"]
FIELDS = ["botany", "optics", "linguistics", "geology", "music", "chemistry", "astronomy", "law", "medicine",
          "architecture"]
HOBBIES = ["chess", "sailing", "pottery", "falconry", "rowing", "painting", "cycling", "beekeeping"]
QUESTION = ('Start at {start} and follow "studied under" {hops} times: {start} studied under someone, who studied '
            'under someone, and so on. Whose name do you reach? Answer with the full name only.')
QUESTION_RE = re.compile(r'^Start at (?P<start>.+?) and follow "studied under" (?P<hops>\d+) times')
NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
STATE_RE = re.compile(rf"Hop (?P<j>\d+) of (?P<k>\d+): the mentor of (?P<who>{NAME})(?: is (?P<mentor>{NAME}))?\.")
HIT_RE = re.compile(r"^(?:L\d+: )?  \* 【(?P<id>\d+)†(?P<title>[^;†】]*); publish_date: [^†]*†[^】]*】", re.MULTILINE)
WRAP_RE = re.compile(r"\nL\d+: ")  # a page view's line break: pages wrap at 80 columns, keeping spaces


def mentor_line(name: str, mentor: str) -> str:
    return f"{name} studied under {mentor}."


@dataclass(frozen=True)
class Question:
    start: str
    hops: int
    answer: str
    chain: tuple[str, ...]   # start, its mentor, ..., answer

    @property
    def text(self) -> str:
        return QUESTION.format(start=self.start, hops=self.hops)

    def to_json(self) -> dict:
        return {"prompt": self.text, "answer": self.answer, "hops": self.hops, "chain": list(self.chain)}


class World:
    """`n_people` people with pages and one mentor cycle through them all, from a seed."""

    def __init__(self, n_people: int = 300, seed: int = 0, lines: tuple[int, int] = (10, 18)):
        if n_people < 3:
            raise ValueError(f"a world needs at least 3 people, got {n_people}")
        rng = random.Random(seed)
        names: list[str] = []
        seen: set[str] = set()
        while len(names) < n_people:
            name = f"{self._word(rng)} {self._word(rng)}"
            if name not in seen and len(name) <= 24:
                seen.add(name)
                names.append(name)
        self.names = names
        cycle = names[:]
        rng.shuffle(cycle)
        self.mentor = {cycle[i]: cycle[(i + 1) % n_people] for i in range(n_people)}
        mentees: dict[str, list[str]] = {}
        for p, m in self.mentor.items():
            mentees.setdefault(m, []).append(p)
        self.documents = [self._page(rng, p, mentees.get(p, []), lines) for p in names]

    @staticmethod
    def _word(rng: random.Random) -> str:
        return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 2))).capitalize() + \
            rng.choice(CODAS)

    def _page(self, rng: random.Random, p: str, mentees: list[str], lines: tuple[int, int]) -> Document:
        others = [o for o in rng.sample(self.names, 4) if o != p and o != self.mentor[p]][:2]
        facts = [f"{p} was born in {rng.randint(1850, 1990)} in {rng.choice(CITIES)}.",
                 f"{p} worked in {rng.choice(FIELDS)}.",
                 f"{p} wrote {rng.randint(1, 30)} books.",
                 f"{p} was fond of {rng.choice(HOBBIES)}.",
                 f"{p} lived for {rng.randint(3, 40)} years in {rng.choice(CITIES)}.",
                 f"{p} won the {rng.choice(CITIES)} prize in {rng.randint(1870, 2010)}.",
                 f"{p} kept {rng.randint(2, 9)} notebooks of field work.",
                 f"{p} spoke {rng.randint(1, 6)} languages.",
                 f"{p} travelled to {rng.choice(CITIES)} in {rng.randint(1870, 2010)}.",
                 f"{p} gave {rng.randint(2, 90)} public lectures.",
                 f"{p} built a small house near {rng.choice(CITIES)}.",
                 f"{p} owned {rng.randint(1, 12)} maps of {rng.choice(CITIES)}.",
                 f"{p} corresponded with {rng.randint(2, 50)} scholars.",
                 f"{p} planted {rng.randint(3, 99)} trees in {rng.choice(CITIES)}."]
        facts += [f"{p} taught {m}." for m in mentees] + [f"{p} met {o} in {rng.randint(1870, 2010)}." for o in others]
        rng.shuffle(facts)
        body = facts[:rng.randint(*lines) - 1]
        body.insert(rng.randint(0, len(body)), mentor_line(p, self.mentor[p]))
        return Document(f"https://{DOMAIN}/{p.replace(' ', '_')}", p, "\n".join(body))

    def chain(self, start: str, hops: int) -> list[str]:
        out = [start]
        for _ in range(hops):
            out.append(self.mentor[out[-1]])
        return out

    def question(self, rng: random.Random, hops: int) -> Question:
        chain = self.chain(rng.choice(self.names), hops)
        return Question(chain[0], hops, chain[-1], tuple(chain))


def normalise(name: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", name).split()).lower()


def grade(answer: str | None, question: Question) -> bool:
    """The final answer is the question's name, up to case, spacing and punctuation."""
    return answer is not None and normalise(answer) == normalise(question.answer)


# ---- the scripted expert -------------------------------------------------------------------------

@dataclass(frozen=True)
class State:
    hop: int                 # the hop being worked on (1-based); hops + 1 once the answer is known
    hops: int
    person: str              # whose mentor is sought (the answer once hop > hops)
    line: str                # the state line to write


def state_at(hops: int, j: int, who: str, mentor: str | None) -> State:
    """The state after the line `Hop j of hops: the mentor of who[ is mentor].`"""
    if mentor is None:
        return State(j, hops, who, f"Hop {j} of {hops}: the mentor of {who}.")
    line = f"Hop {j} of {hops}: the mentor of {who} is {mentor}."
    if j == hops:
        return State(j + 1, hops, mentor, line)
    return State(j + 1, hops, mentor, f"{line} Hop {j + 1} of {hops}: the mentor of {mentor}.")


def latest(state: State, text: str) -> State:
    """The state of the last state line in text, or state if it has none."""
    found = list(STATE_RE.finditer(text))
    if not found:
        return state
    m = found[-1]
    return state_at(state.hops, int(m["j"]), m["who"], m["mentor"])


def read_mentor(result: str, person: str) -> str | None:
    """The mentor a tool result shows for person, if its mentor line is in it."""
    m = re.search(rf"{re.escape(person)} studied under ({NAME})\.", WRAP_RE.sub("", result))
    return m.group(1) if m else None


class ExpertPolicy:
    """The scripted expert as a Policy. `count(text) -> tokens` measures prompts and replies (a
    tokenizer's; characters / 4 when not given). It reads what the chat format renders: the
    reasoning of turns before the last user message is dropped (spec §3.1), so in a Summary call
    it works from the tool calls and results alone."""

    def __init__(self, context_window: int, count=None, thinking_mode: str = "thinking"):
        self.context_window, self.thinking_mode = context_window, thinking_mode
        self._len = count or (lambda s: -(-len(s) // 4))

    def count(self, messages: list[dict], tools: list[dict]) -> int:
        return self._len(encode_messages(messages, self.thinking_mode, tools=tools or None))

    def decide(self, messages: list[dict]) -> dict:
        """The next assistant message for a view."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError("the view has no task")
        summary_call = messages[users[-1]]["content"] == SUMMARY_REQUEST
        task_at = users[-2] if summary_call and len(users) > 1 else users[-1]
        q = QUESTION_RE.match(messages[task_at]["content"])
        if q is None:
            raise ValueError("the expert only knows the multi-hop task")
        task = messages[task_at]["content"]
        state = state_at(int(q["hops"]), 1, q["start"], None)
        if SUMMARY_HEADER in task:
            state = latest(state, task.split(SUMMARY_HEADER, 1)[1])
        advanced = False  # whether the latest tool results moved the state on
        for i in range(task_at + 1, len(messages)):
            m = messages[i]
            if m["role"] == "assistant":
                advanced = False
                if i > users[-1]:  # its reasoning is rendered
                    state = latest(state, m.get("reasoning_content") or "")
            elif m["role"] == "tool" and state.hop <= state.hops:
                mentor = read_mentor(m["content"], state.person)
                if mentor is not None:
                    state, advanced = state_at(state.hops, state.hop, state.person, mentor), True
        if summary_call:
            return {"role": "assistant", "reasoning_content": "I write down where the work stands.",
                    "content": state.line, "tool_calls": []}
        if state.hop > state.hops:
            return {"role": "assistant", "reasoning_content": f"{state.line} That is the answer.",
                    "content": state.person, "tool_calls": []}
        if messages[-1]["role"] == "tool" and not advanced:
            n = self._trailing_tools(messages)
            result = "\n".join(m["content"] for m in messages[len(messages) - n:])
            note, call = self._next_call(messages[-1 - n], result, state.person)
            return self._message(f"{state.line} {note}", call)
        return self._message(f"{state.line} I search for {state.person}.",
                             ("search", {"query": state.person, "topn": 3}))

    @staticmethod
    def _trailing_tools(messages: list[dict]) -> int:
        n = 0
        while n < len(messages) and messages[-1 - n]["role"] == "tool":
            n += 1
        return n

    @staticmethod
    def _next_call(assistant: dict, result: str, person: str) -> tuple[str, tuple[str, dict]]:
        """The mentor is not in this result: open the person's page from a search, else find the
        line in the page."""
        calls = assistant.get("tool_calls") or []
        verb = calls[-1]["function"]["name"] if calls else ""
        if verb == "search":
            for hit in HIT_RE.finditer(result):
                if hit["title"] == person:
                    return f"Result {hit['id']} is the page of {person}.", ("open", {"id": int(hit["id"])})
            return f"No result is the page of {person}; I search again.", ("search", {"query": person, "topn": 10})
        if verb == "open":
            return "The mentor is not in view; I look for it.", ("find", {"pattern": "studied under"})
        return f"I search for {person}.", ("search", {"query": person, "topn": 3})

    @staticmethod
    def _message(reasoning: str, call: tuple[str, dict]) -> dict:
        name, args = call
        return {"role": "assistant", "reasoning_content": reasoning, "content": "",
                "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]}

    def __call__(self, messages: list[dict], tools: list[dict], sampling: SamplingParams) -> Reply:
        message = self.decide(messages)
        text = encode_completion(message, self.thinking_mode)
        return Reply(message, text, "stop", self.count(messages, tools), self._len(text))
