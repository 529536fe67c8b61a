"""The multi-hop search task and its scripted expert (dsv32.agent.multihop), checked against the
world's own mentor links; and the experiment's pieces that turn expert runs into SFT data and
the browser into an RL environment (experiments/agent_context.py)."""

import random
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from dsv32.agent.browser import Browser
from dsv32.agent.context import SUMMARY_REQUEST
from dsv32.agent.corpus import Corpus
from dsv32.agent.loop import AgentConfig, AgentLoop
from dsv32.agent.multihop import QUESTION_RE, ExpertPolicy, World, grade, read_mentor
from dsv32.chat import encode_messages
from dsv32.engine import SamplingParams
from dsv32.rl.tasks import Task
from dsv32.tokenizer import train_tokenizer
from dsv32.train.losses import IGNORE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import agent_context

WORLD = World(80, seed=3)
CORPUS = Corpus.build(WORLD.documents, progress=False)


def run(strategy: str, question, window: int, max_steps: int = 60):
    loop = AgentLoop(ExpertPolicy(window), lambda: Browser(CORPUS, view_tokens=120).tools(),
                     SamplingParams(max_tokens=100), AgentConfig(max_steps=max_steps, context_strategy=strategy))
    return loop.run(question.text)


def test_the_mentor_links_form_one_cycle_through_everyone():
    seen, p = [], WORLD.names[0]
    for _ in WORLD.names:
        seen.append(p)
        p = WORLD.mentor[p]
    assert p == WORLD.names[0] and sorted(seen) == sorted(WORLD.names)


def test_every_page_states_its_own_mentor_exactly_once():
    for doc in WORLD.documents:
        lines = [ln for ln in doc.text.splitlines() if " studied under " in ln]
        assert lines == [f"{doc.title} studied under {WORLD.mentor[doc.title]}."]
        assert read_mentor(doc.text, doc.title) == WORLD.mentor[doc.title]


def test_a_question_states_its_start_and_hops_and_its_answer_is_the_chain_end():
    q = WORLD.question(random.Random(0), 4)
    m = QUESTION_RE.match(q.text)
    assert (m["start"], int(m["hops"])) == (q.start, 4)
    a = q.start
    for _ in range(4):
        a = WORLD.mentor[a]
    assert q.answer == a and len(q.chain) == 5


def test_grading_ignores_case_spacing_and_punctuation_only():
    q = WORLD.question(random.Random(1), 2)
    assert grade(f"  {q.answer.upper()}. ", q)
    assert not grade(q.start, q) and not grade(None, q) and not grade(q.answer.split()[0], q)


def test_a_mentor_line_wrapped_across_page_lines_is_still_read():
    view = "L4: Aba Cod studied under Efe \nL5: Gih."
    assert read_mentor(view, "Aba Cod") == "Efe Gih"
    assert read_mentor("L4: Aba Cod studied under Efe ...", "Aba Cod") is None  # a cut snippet is not a fact


@pytest.mark.parametrize("hops", [1, 3, 6])
def test_the_expert_answers_with_room_taking_one_to_three_calls_a_hop(hops):
    for i in range(4):
        q = WORLD.question(random.Random(100 * hops + i), hops)
        ep = run("none", q, window=10**6)
        assert ep.end == "answer" and grade(ep.answer, q), ep.error
        assert hops + 1 <= len(ep.steps) <= 3 * hops + 1


@pytest.mark.parametrize("strategy", ["summary", "discard-75"])
def test_the_expert_goes_on_from_what_management_leaves(strategy):
    """A window that forces management several times: the chain is still followed to its end."""
    q = WORLD.question(random.Random(7), 6)
    ep = run(strategy, q, window=2600)
    assert sum(m["role"] == "context" for m in ep.log) >= 2
    assert ep.end == "answer" and grade(ep.answer, q)


def test_without_management_a_long_chain_runs_out_of_context_and_a_reset_starts_over():
    q = WORLD.question(random.Random(7), 6)
    assert run("none", q, window=2600).end == "context"
    ep = run("discard-all", q, window=2600, max_steps=30)
    assert ep.end == "max_steps"
    searches = [c["function"]["arguments"]["query"] for m in ep.log if m["role"] == "assistant"
                for c in m["tool_calls"] if c["function"]["name"] == "search"]
    assert searches.count(q.start) >= 2  # every reset begins again at the start


def test_a_summary_call_sees_no_earlier_reasoning_so_it_reads_the_tool_results():
    """The chat format drops reasoning before the last user message: a false state line there
    must not steer the summary; the mentor line in the tool result does."""
    q = WORLD.question(random.Random(9), 2)
    mentor = WORLD.mentor[q.start]
    messages = [{"role": "user", "content": q.text},
                {"role": "assistant", "reasoning_content": f"Hop 2 of 2: the mentor of {q.start} is Zed Zed.",
                 "content": "", "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {}}}]},
                {"role": "tool", "content": f"L3: {q.start} studied under {mentor}."},
                {"role": "user", "content": SUMMARY_REQUEST}]
    reply = ExpertPolicy(10**6).decide(messages)
    assert reply["content"] == f"Hop 1 of 2: the mentor of {q.start} is {mentor}. Hop 2 of 2: the mentor of {mentor}."


def test_sft_segments_render_as_the_conversation_the_expert_saw(tmp_path):
    """Each SFT example, decoded, is the chat-format rendering of its segment's view and turns,
    and its labels cover the expert's turns."""
    tok = train_tokenizer([textwrap.__file__], 600, tmp_path)
    setup = agent_context.Setup(window=2600, max_new=100, view_tokens=120, budget=40, attempts=2)
    qs = [WORLD.question(random.Random(5), 5)]
    _, segs = agent_context.expert_runs(WORLD, CORPUS, qs, ("summary",), setup, None)
    assert len(segs) >= 3  # the first stretch, a summary call, the stretch after it
    tools = agent_context.schemas(CORPUS)
    for (start, turns), (ids, labels) in zip(segs, agent_context.sft_examples(tok, tools, segs)):
        system = {"role": "system", "content": "", "tools": tools}
        assert tok.decode(ids) == encode_messages([system] + start + turns, "thinking")
        labelled = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
        assert all(m.get("reasoning_content", "") in labelled for m in turns if m["role"] == "assistant")


def test_the_browser_environment_keeps_one_page_stack_per_trajectory():
    setup = agent_context.Setup(window=2600, max_new=100, view_tokens=120, budget=40, attempts=2)
    env = agent_context.BrowserEnv(CORPUS, setup)
    task = Task("multihop", [{"role": "user", "content": "x"}], grader="exact", answer="y")
    a, b = replace(task), replace(task)
    call = {"role": "assistant", "content": "", "reasoning_content": "",
            "tool_calls": [{"type": "function", "function": {"name": "search",
                                                             "arguments": f'{{"query": "{WORLD.names[0]}"}}'}}]}
    assert env(a, call)[1][0].startswith("[0] ")
    assert env(a, call)[1][0].startswith("[1] ")   # a's second page
    assert env(b, call)[1][0].startswith("[0] ")   # b has its own stack
    assert env(a, {**call, "tool_calls": []}) is None


def test_grpo_starts_no_step_that_would_end_past_the_deadline(tmp_path, monkeypatch):
    """Steps of 2 s against a deadline 5 s away: two run (the third would end at 6 s); each step's
    metrics are written as it ends."""
    clock = [100.0]

    class Trainer:  # the part of RLTrainer that rl() uses, on a fake clock
        cfg = type("Cfg", (), {"steps": 10, "out": str(tmp_path / "rl")})()
        step = 0

        def train_step(self):
            clock[0] += 2.0
            self.step += 1
            return {"reward": 0.5, "step": self.step}

    monkeypatch.setattr(agent_context.time, "time", lambda: clock[0])
    history, error = agent_context.rl(Trainer(), deadline=105.0)
    assert [m["step"] for m in history] == [1, 2] and error is None
    assert (tmp_path / "rl" / "metrics.jsonl").read_text().count("\n") == 2
