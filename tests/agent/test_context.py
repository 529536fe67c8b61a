"""Context management (spec §4): each strategy's view of a hand-built log at the trigger point is what
the spec says, the log itself is never edited, the trigger fires past 80% of the window and not
before, a Summary call is a step, and Parallel-fewest-step keeps the answered attempt with the
fewest steps."""

import copy
import math

from dsv32.agent.context import (
    SUMMARY_HEADER, SUMMARY_REQUEST, discard_75, discard_all, fewest_steps, split, summarized, triggered, view,
)
from dsv32.agent.loop import AgentConfig, AgentLoop
from dsv32.agent.policy import Reply
from dsv32.engine import SamplingParams

from scripted_policy import Add, Echo, Fail, ScriptedPolicy, call, turn

TASK = [{"role": "system", "content": "You are a search agent."}, {"role": "user", "content": "Who wrote X?"}]


def tool_round(i: int) -> list[dict]:
    """Round i: one call, or two parallel ones every third round, with their results."""
    n = 2 if i % 3 == 0 else 1
    calls = [{**call("echo", text=f"q{i}.{j}"), "id": f"c{i}.{j}"} for j in range(n)]
    return [turn(f"think {i}", calls=calls)] + [{"role": "tool", "tool_call_id": f"c{i}.{j}", "content": f"r{i}.{j}"}
                                                for j in range(n)]


ROUNDS = [tool_round(i) for i in range(8)]
LOG = TASK + [m for r in ROUNDS for m in r]


def flat(rounds):
    return [m for r in rounds for m in r]


def test_a_tool_round_is_an_assistant_message_with_all_its_results():
    head, rounds = split(LOG)
    assert head == TASK and rounds == ROUNDS and [len(r) for r in rounds] == [3, 2, 2, 3, 2, 2, 3, 2]


def test_discard_75_drops_the_oldest_three_quarters_of_the_tool_rounds():
    assert discard_75(LOG) == TASK + flat(ROUNDS[6:])              # 8 rounds: the newest 2 stay
    assert discard_75(TASK + flat(ROUNDS[:5])) == TASK + flat(ROUNDS[4:5])   # 5: at least 75% go, 1 stays
    assert discard_75(TASK + flat(ROUNDS[:3])) == TASK
    assert discard_75(TASK) == TASK


def test_discard_all_keeps_only_the_task():
    assert discard_all(LOG) == TASK


def test_summary_restarts_from_the_task_followed_by_the_summary():
    assert summarized(LOG, "X was written by Y (r3.0).") == [
        TASK[0], {"role": "user", "content": "Who wrote X?" + SUMMARY_HEADER + "X was written by Y (r3.0)."}]


def test_the_view_replays_context_events_over_a_log_that_is_never_edited():
    more = [tool_round(i) for i in range(8, 11)]
    log = LOG + [{"role": "context", "strategy": "discard-75"}] + flat(more[:2]) + [
        {"role": "context", "strategy": "summary", "summary": "S"}] + flat(more[2:])
    before = copy.deepcopy(log)
    assert view(log[:len(LOG) + 1]) == TASK + flat(ROUNDS[6:])
    assert view(log[:len(LOG) + 1 + len(flat(more[:2]))]) == TASK + flat(ROUNDS[6:] + more[:2])
    assert view(log) == summarized(TASK, "S") + flat(more[2:])
    assert log == before


def test_the_trigger_is_past_80_percent_of_the_window_counting_the_new_tokens():
    assert not triggered(700, 100, 1000) and triggered(701, 100, 1000) and not triggered(0, 800, 1000)
    assert triggered(800, 1, 1000, share=0.8) and not triggered(899, 1, 1000, share=0.9)


# ---- through the loop ----

M = 400                                         # max new tokens per call
REPLIES = [turn(f"step {i}", calls=[call("echo", text=f"r{i}")]) for i in range(8)] + [turn("done", "the answer")]


def usage_before_each_step():
    """Run without management: the prompt + max new tokens of each call (the policy counts characters)."""
    policy = ScriptedPolicy(REPLIES)
    ep = AgentLoop(policy, [Echo()], SamplingParams(max_tokens=M)).run(copy.deepcopy(TASK))
    assert ep.end == "answer" and len(ep.steps) == 9
    return [policy.count(m, t) + M for m, t, _ in policy.seen]


def window_firing_at(usage: list[int], step: int) -> int:
    """A window whose 80% lies between the usage of step - 1 and that of step (1-based)."""
    w = math.floor((usage[step - 1] - 1) / 0.8)
    assert usage[step - 2] <= 0.8 * w < usage[step - 1]
    return w


def managed(strategy: str, replies: list, window: int):
    policy = ScriptedPolicy(replies, context_window=window)
    agent = AgentLoop(policy, [Echo()], SamplingParams(max_tokens=M), AgentConfig(context_strategy=strategy))
    return agent.run(copy.deepcopy(TASK)), policy


def test_the_trigger_fires_when_the_next_call_passes_80_percent_and_not_before():
    usage = usage_before_each_step()
    w = window_firing_at(usage, 9)                  # step 9 passes 80% of w by at most two tokens
    ep, _ = managed("discard-all", REPLIES, w)
    events = [e for e in ep.log if e["role"] == "context"]
    assert len(events) == 1 and events[0]["step"] == 8 and events[0]["tokens"] == usage[8]
    ep, _ = managed("discard-all", REPLIES, math.ceil(usage[8] / 0.8))   # every step at or under 80%
    assert not any(e["role"] == "context" for e in ep.log) and len(ep.steps) == 9


def test_discard_75_and_discard_all_through_the_loop_show_the_model_exactly_their_view():
    usage = usage_before_each_step()
    w = window_firing_at(usage, 9)
    for strategy, kept in (("discard-75", slice(6, 8)), ("discard-all", slice(0, 0))):
        ep, policy = managed(strategy, REPLIES, w)
        head, rounds = split(ep.log[:-2])            # the log keeps all 8 rounds, then the event, then the answer
        assert len(rounds) == 8 and ep.log[-2]["role"] == "context" and ep.log[-2]["strategy"] == strategy
        assert policy.seen[8][0] == TASK + flat(rounds[kept])
        assert ep.end == "answer" and len(ep.steps) == 9


def test_summary_is_a_step_and_the_model_restarts_from_the_task_and_its_summary():
    usage = usage_before_each_step()
    w = window_firing_at(usage, 9)
    replies = REPLIES[:8] + [turn("Summing up.", "Echoed r0..r7.")] + REPLIES[8:]
    ep, policy = managed("summary", replies, w)
    assert policy.seen[8][0][-1] == {"role": "user", "content": SUMMARY_REQUEST}
    assert policy.seen[8][0][:-1] == ep.log[:len(TASK) + 16]          # the summary call sees the whole history
    assert policy.seen[9][0] == summarized(TASK, "Echoed r0..r7.")
    assert [s.kind for s in ep.steps] == ["model"] * 8 + ["summary", "model"] and ep.total_steps == 10
    assert ep.log[-2]["summary"] == "Echoed r0..r7." and ep.end == "answer"


def test_parallel_fewest_step_keeps_the_answered_attempt_with_the_fewest_steps():
    bad = Reply(None, "garbage", "stop", 10, 7, error="the reply does not parse")
    replies = ([turn("a", calls=[call("echo", text="1")]), turn("a", calls=[call("echo", text="2")]), turn("a", "A")]
               + [bad]                                                      # attempt 1: one step, no answer
               + [turn("c", calls=[call("echo", text="3")]), turn("c", "C")])  # attempt 2: two steps
    made, closed = [], Echo.closed

    def tools():
        made.append([Add(), Echo(), Fail()])
        return made[-1]

    policy = ScriptedPolicy(replies)
    ep = AgentLoop(policy, tools, SamplingParams(max_tokens=M, seed=0), AgentConfig(context_strategy="parallel-fewest-step",
                                                                             attempts=3)).run("Go.")
    assert ep.answer == "C" and len(ep.steps) == 2 and ep.attempts.index(ep) == 2
    assert [a.end for a in ep.attempts] == ["answer", "bad_reply", "answer"] and ep.total_steps == 6
    assert len(made) == 3 and Echo.closed == closed + 3               # fresh tools per attempt, closed after
    assert len({a.sampling.seed for a in ep.attempts}) == 3                 # and their own seeds (None: unseeded)
    assert fewest_steps([3, 1, 2], [True, False, True]) == 2 and fewest_steps([1], [False]) is None
