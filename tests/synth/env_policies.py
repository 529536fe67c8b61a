"""Scripted policies over trip environments, each with a known pass rate per environment: the
trip expert (which solves every level-1 task of seeds 0-2, tests/synth/test_trip_expert.py), a
policy that submits an empty plan, and one that alternates between the two by attempt."""

import json

from dsv32.agent.policy import Reply
from dsv32.synth.environment import read_index
from dsv32.synth.trip_expert import TripExpert

# three level-1 trip environments (`dsv32 synth general --family trip --n 3 --difficulty 1`, the
# `trip_envs` fixture) and what ByTask does on each: pass@k per environment is known by hand
BEHAVIOUR = {"trip-d1-s0": "solve", "trip-d1-s1": "fail", "trip-d1-s2": "alternate"}

EMPTY = {"role": "assistant", "reasoning_content": "", "content": "",
         "tool_calls": [{"id": "s", "type": "function", "function": {
             "name": "submit_result", "arguments": json.dumps({"result": "[]"})}}]}
DONE = {"role": "assistant", "reasoning_content": "", "content": "done", "tool_calls": []}


class ByTask:
    """Per task text: "solve" (the expert), "fail" (submit an empty plan, then stop) or "alternate"
    (attempt i solves when i is even; the attempt is read from the sampling seed, which is
    seed + i * 1000003 plus the step number, the seed being 0)."""

    context_window = 1 << 20
    model = "scripted"

    def __init__(self, plan: dict[str, str]):
        self.plan, self.expert, self.calls = plan, TripExpert(), 0

    def count(self, messages, tools):
        return 0

    def fork(self):
        return self

    def __call__(self, messages, tools, sampling):
        self.calls += 1
        task = next(m["content"] for m in messages if m["role"] == "user")
        how = self.plan[task]
        if how == "alternate":
            step = sum(m["role"] == "assistant" for m in messages)
            how = "solve" if ((sampling.seed - step) // 1_000_003) % 2 == 0 else "fail"
        if how == "solve":
            return self.expert(messages, tools, sampling)
        submitted = any(c["function"]["name"] == "submit_result" for m in messages if m["role"] == "assistant"
                        for c in m.get("tool_calls") or [])
        return Reply(DONE if submitted else EMPTY, "", "stop", 0, 0)


def behaviour_plan(envs) -> dict[str, str]:
    """ByTask's plan for the environments in folder `envs`: each task text -> its BEHAVIOUR."""
    return {r["task"]: BEHAVIOUR[r["name"]] for r in read_index(envs)}
