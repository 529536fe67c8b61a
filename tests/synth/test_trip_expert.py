"""The scripted trip expert: on the hand-written database it makes the plan computed by hand and
the verifier accepts it; on generated level-1 environments (JSON or compact tool results) its
submissions pass the environment's verifier; it reads the rules back from any task text; it is a
function of the view alone; and a slipping expert breaks the rules it forgets."""

import json
import random
from pathlib import Path

import pytest
from hand_world import PARAMS

from dsv32.agent.loop import AgentConfig, AgentLoop
from dsv32.engine import SamplingParams
from dsv32.synth import trip_tools, trip_verifier
from dsv32.synth.runner import LocalTools, local_verify
from dsv32.synth.session import EnvironmentTool, SubmitTool, agent_tools
from dsv32.synth.trip import TripDifficulty, draw_params, make_trip, task_text
from dsv32.synth.trip_expert import (
    TripExpert,
    TripTaskError,
    compact,
    read_rows,
    read_task,
)

SAMPLING = SamplingParams(max_tokens=4096)
VERIFIER = Path(trip_verifier.__file__).read_text()


def play(expert: TripExpert, tools: LocalTools, task: str, render=lambda r: r):
    """(the episode, what it submitted) of the expert with the 14 tools and submit_result."""
    call = lambda name, arguments: render(tools.call(name, arguments))
    submit = SubmitTool()
    parts = [EnvironmentTool(s, call) for s in trip_tools.TOOLS] + [submit]
    return AgentLoop(expert, parts, SAMPLING, AgentConfig(max_steps=40)).run(task), submit.submitted


def test_on_the_hand_world_the_expert_makes_the_plan_computed_by_hand(hand_db):
    # Day 1, Alpha: the cheapest hotel (Cheap Inn 250), the two cheapest restaurants (Dumplings 40,
    # Tea 30; lunch first in name order), the cheapest sight (Museum 20): 340.
    # Day 2, Beta (next in the city list), a tier day: Beta Low (499) needs a restaurant >= 3.2,
    # so Good (150, 4.2) with Poorer (40) and Museum (119): 808; Beta Mid (500) would be 809.
    # Day 3, Gamma: Gamma Hotel 400, Fish 80 + Rice 30, Park 0: 510. The Annex (in Gamma, named
    # after Beta) is not found by the keyword Gamma, and the keyword Beta finds it outside Beta.
    tools = LocalTools(Path(trip_tools.__file__).read_text(), hand_db)
    ep, submitted = play(TripExpert(), tools, task_text(PARAMS))
    tools.close()
    plan = json.loads(submitted)
    assert [(d["city"], d["hotel"], d["afternoon_restaurant"], d["afternoon_attraction"], d["evening_restaurant"])
            for d in plan] == [("Alpha", "Alpha Cheap Inn", "Alpha Dumplings", "Alpha Museum", "Alpha Tea"),
                               ("Beta", "Beta Low", "Beta Good", "Beta Museum", "Beta Poorer"),
                               ("Gamma", "Gamma Hotel", "Gamma Fish", "Gamma Park", "Gamma Rice")]
    assert [d["time"] for d in plan] == ["2025-10-01", "2025-10-02", "2025-10-03"]
    assert "The plan costs 1658 CNY" in ep.log[-3]["reasoning_content"]
    assert local_verify(VERIFIER, submitted, PARAMS, hand_db) == (1.0, [])
    # cities, then a lookup turn per day, the submission, and a closing answer
    assert ep.end == "answer" and len(ep.steps) == 6


def test_a_slipping_expert_forgets_the_day_rules_and_the_verifier_says_which(hand_db):
    tools = LocalTools(Path(trip_tools.__file__).read_text(), hand_db)
    _, submitted = play(TripExpert(slip=1.0), tools, task_text(PARAMS))
    tools.close()
    score, reasons = local_verify(VERIFIER, submitted, PARAMS, hand_db)
    # day 2 then takes the two cheapest restaurants, Poorer (2.9) and Poor (3.1), with Beta Low
    assert score == 0.0 and [r.split(":")[0] for r in reasons] == ["price_tier"]


@pytest.mark.parametrize("render", [lambda r: r, compact], ids=["json", "compact"])
def test_the_experts_submissions_on_generated_level_1_tasks_pass_their_verifier(tmp_path, render):
    for seed in range(3):
        env = make_trip(seed, 1, tmp_path)
        tools = LocalTools(env.tools_code, env.db_path)
        parts, submit = agent_tools(env, lambda n, a, tools=tools: render(tools.call(n, a)))
        ep = AgentLoop(TripExpert(), parts, SAMPLING, AgentConfig(max_steps=40)).run(env.task)
        tools.close()
        assert local_verify(env.verifier_code, submit.submitted, env.params, env.db_path) == (1.0, [])
        assert len(ep.steps) <= 6  # far fewer calls than the reference's hundreds: results stay short
        assert ep.log[1]["tool_calls"][0]["function"]["name"] == "get_all_cities"


def test_the_rules_are_read_back_from_any_task_text():
    rng = random.Random(0)
    for level in range(1, 11):
        for _ in range(5):
            params = draw_params(rng, TripDifficulty.level(level))
            params["start_city"] = rng.choice(["Hangzhou", "Xi'an", "Lijiang"])
            if params["budget"] is not None:
                params["budget"] = rng.randrange(500, 9000, 50)
            assert read_task(task_text(params)) == params
    with pytest.raises(TripTaskError, match="not a trip-planning task"):
        read_task("What is 2 + 2?")


def test_compact_tables_read_back_as_the_rows_they_render(tmp_path):
    env = make_trip(0, 3, tmp_path)  # level 3 has distractors: rows from other cities come along
    tools = LocalTools(env.tools_code, env.db_path)
    city = env.params["start_city"]
    for tool in ("get_infos_by_hotel", "get_infos_by_restaurant", "get_infos_by_attraction"):
        raw = tools.call(tool, {"keyword": city})
        table = compact(raw)
        assert len(table) < 0.75 * len(raw) and table.count("\n") == len(json.loads(raw))
        assert read_rows(table, city) == read_rows(raw, city) == [r for r in json.loads(raw) if r["city"] == city]
    for other in (tools.call("get_all_cities", {}), tools.call("get_infos_by_hotel", {"keyword": "Atlantis"}),
                  tools.call("get_weather_by_city_date", {"city": city, "date": env.params["start_date"]})):
        assert compact(other) == other  # lists of names, errors and single objects stay as they are
    tools.close()


def test_the_expert_is_a_function_of_the_view_alone(tmp_path):
    env = make_trip(1, 2, tmp_path)
    tools = LocalTools(env.tools_code, env.db_path)
    parts, _ = agent_tools(env, tools.call)
    ep = AgentLoop(TripExpert(), parts, SAMPLING, AgentConfig(max_steps=40)).run(env.task)
    tools.close()
    messages = ep.log
    assert messages[0] == {"role": "user", "content": env.task}
    fresh = TripExpert()
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            again = fresh.decide(messages[:i])
            assert again["reasoning_content"] == m["reasoning_content"]
            assert [c["function"] for c in again["tool_calls"]] == [c["function"] for c in m["tool_calls"]]
