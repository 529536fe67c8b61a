"""The trip family: the 14 tools on the hand-written database, the difficulty knob, and the
property that every generated instance's reference solution passes its verifier while plans
copied from the database without the rules do not."""

import itertools
import json
import sqlite3
from pathlib import Path

import pytest
from hand_world import PARAMS

from dsv32.synth import trip_tools
from dsv32.synth.check import check_environment
from dsv32.synth.runner import LocalTools, local_verify
from dsv32.synth.trip import TripDifficulty, make_trip
from dsv32.synth.trip_solution import solve
from dsv32.synth.trip_verifier import failures


def test_the_toolset_is_the_papers_14_query_tools():
    names = [t["function"]["name"] for t in trip_tools.TOOLS]
    assert len(names) == 14 == len(set(names)) and "submit_result" not in names
    assert all(callable(getattr(trip_tools, n)) for n in names)


def test_the_tools_answer_from_the_database(hand_db):
    t = LocalTools(Path(trip_tools.__file__).read_text(), hand_db)
    assert json.loads(t.call("get_all_cities", {})) == ["Alpha", "Beta", "Gamma"]
    assert json.loads(t.call("get_all_hotels_by_city", {"city": "Beta"})) == ["Beta Low", "Beta Lux", "Beta Mid"]
    assert t.call("get_city_by_hotel", {"hotel": "Beta Lux Annex"}) == "Gamma"
    assert t.call("get_city_by_restaurant", {"restaurant": "Nowhere"}).startswith("error:")
    lux = json.loads(t.call("get_infos_by_hotel", {"keyword": "beta lux"}))  # the near-duplicate comes along
    assert [(h["name"], h["city"], h["price"]) for h in lux] == [("Beta Lux", "Beta", 800), ("Beta Lux Annex", "Gamma", 800)]
    assert json.loads(t.call("get_weather_by_city_date", {"city": "Gamma", "date": "2025-10-03"}))["condition"] == "rain"
    assert json.loads(t.call("get_inter_city_transport", {"from_city": "Beta", "to_city": "Gamma"}))[0]["price"] == 600
    assert t.call("get_inter_city_transport", {"from_city": "Alpha", "to_city": "Gamma"}).startswith("no direct")
    assert t.call("get_all_hotels_by_city", {"city": "Atlantis"}).startswith("error:")
    t.close()


def test_the_reference_finds_the_cheapest_valid_plan_on_the_hand_database(hand_db):
    # by hand: day 1 in Alpha costs at least 250 + 40 + 30 + 20 = 340. Beta on day 2 (the tier day)
    # costs at least 499 + (40 + 150, one rated >= 3.2) + 119 = 808, then Gamma 400 + 80 + 30 + 0 = 510:
    # 1658. Gamma on day 2 (400, low tier, Fish 3.9 >= 3.2) is 510, then Beta untiered 499 + 50 + 40 +
    # 119 = 708: 1558, the cheapest.
    t = LocalTools(Path(trip_tools.__file__).read_text(), hand_db)
    plan = json.loads(solve(lambda tool, /, **a: t.call(tool, a), PARAMS))
    t.close()
    assert [d["city"] for d in plan] == ["Alpha", "Gamma", "Beta"]
    assert [d["hotel"] for d in plan] == ["Alpha Cheap Inn", "Gamma Hotel", "Beta Low"]
    assert [{d["afternoon_restaurant"], d["evening_restaurant"]} for d in plan] == [
        {"Alpha Dumplings", "Alpha Tea"}, {"Gamma Fish", "Gamma Rice"}, {"Beta Poor", "Beta Poorer"}]
    assert [d["afternoon_attraction"] for d in plan] == ["Alpha Museum", "Gamma Park", "Beta Museum"]
    assert broken_rules(plan, hand_db) == set()


def test_difficulty_adds_days_cities_distractors_and_rules():
    levels = [TripDifficulty.level(k) for k in range(1, 8)]
    assert levels[0] == TripDifficulty(days=3, n_cities=5, n_distractors=0, n_extra_rules=0)  # the paper's example
    for a, b in itertools.pairwise(levels):
        assert b.days >= a.days and b.n_cities > a.n_cities and b.n_distractors > a.n_distractors
        assert b.n_extra_rules >= a.n_extra_rules
    with pytest.raises(ValueError, match="difficulty must be in 1..10"):
        TripDifficulty.level(0)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6, 7])
def test_every_generated_instance_is_solved_by_its_reference_through_the_tools(tmp_path, difficulty):
    for seed in range(6):
        env = make_trip(seed, difficulty, tmp_path)
        assert env.params["days"] == TripDifficulty.level(difficulty).days
        assert local_verify(env.verifier_code, env.meta["reference"], env.params, env.db_path) == (1.0, [])
        assert env.meta["reference_calls"] > 0


def test_the_same_seed_makes_the_same_instance(tmp_path):
    a, b = make_trip(3, 4, tmp_path / "a"), make_trip(3, 4, tmp_path / "b")
    assert (a.task, a.params, a.meta["reference"]) == (b.task, b.params, b.meta["reference"])


@pytest.mark.parametrize("difficulty", [1, 4])
def test_the_enforced_check_accepts_generated_instances(tmp_path, sandbox_root, difficulty):
    for seed in range(2):
        env = make_trip(seed, difficulty, tmp_path)
        check = check_environment(env, sandbox_root, trusted=True)
        assert check.accepted, check.reason
        assert check.result == env.meta["reference"] and check.calls == env.meta["reference_calls"]


def test_a_plan_copied_from_the_database_without_the_rules_is_rejected(tmp_path):
    # every city has a hotel >= 800 and two restaurants rated < 3.2 (trip_world's guarantee), so the
    # most expensive hotel with the two worst restaurants breaks the luxury tier on day 2
    for seed in range(8):
        env = make_trip(seed, 1, tmp_path)
        db = sqlite3.connect(env.db_path)
        route = [d["city"] for d in json.loads(env.meta["reference"])]
        plan = []
        for day, city in zip(json.loads(env.meta["reference"]), route):
            hotel = db.execute("SELECT name FROM hotels WHERE city = ? ORDER BY price DESC", (city,)).fetchone()[0]
            worst = [r[0] for r in db.execute("SELECT name FROM restaurants WHERE city = ? ORDER BY rating", (city,))]
            plan.append({**day, "hotel": hotel, "afternoon_restaurant": worst[0], "evening_restaurant": worst[1]})
        score, reasons = local_verify(env.verifier_code, json.dumps(plan), env.params, env.db_path)
        assert score == 0.0 and {r.split(":")[0] for r in reasons} == {"price_tier"}, reasons


def broken_rules(plan, db_path) -> set[str]:
    db = sqlite3.connect(db_path)
    try:
        return {f.split(":")[0] for f in failures(plan, db, PARAMS)}
    finally:
        db.close()
