"""The trip verifier against a hand-written database: a valid plan passes, and each rule, broken
on its own by mutating that plan, is named (the expectations are worked out by hand in conftest)."""

import copy
import json
import sqlite3

import pytest
from hand_world import PARAMS, PLAN, PLAN_COST

from dsv32.synth import trip_verifier
from dsv32.synth.trip_verifier import failures, verify


def broken(plan, db_path, **params) -> set[str]:
    """The rules `plan` breaks under PARAMS updated with `params`."""
    db = sqlite3.connect(db_path)
    try:
        return {f.split(":")[0] for f in failures(json.dumps(plan), db, {**PARAMS, **params})}
    finally:
        db.close()


def mutated(day: int, **fields) -> list[dict]:
    plan = copy.deepcopy(PLAN)
    plan[day - 1].update(fields)
    return plan


def test_the_hand_written_plan_keeps_every_rule_with_every_rule_on(hand_db):
    db = sqlite3.connect(hand_db)
    params = {**PARAMS, "min_hotel_rating": 4.0, "rain_indoor": True, "direct_link": True, "budget": PLAN_COST}
    assert verify(json.dumps(PLAN), db, params) == (1.0, [])
    assert verify(PLAN, db, params) == (1.0, [])  # a parsed list is read the same as its JSON


@pytest.mark.parametrize("submission", ["", "[]", "{}", "not json", "null", json.dumps([{}]),
                                        json.dumps([{**PLAN[0], "note": "extra"}]),
                                        json.dumps([{**PLAN[0], "hotel": 3}])])
def test_an_empty_or_malformed_submission_fails_on_format(hand_db, submission):
    assert broken(submission, hand_db) == {"format"}
    db = sqlite3.connect(hand_db)
    assert verify(submission, db, PARAMS)[0] == 0.0


def test_a_missing_day_fails_on_days(hand_db):
    assert broken(PLAN[:2], hand_db) == {"days"}


def test_a_shifted_date_fails_on_dates(hand_db):
    assert broken(mutated(3, time="2025-10-04"), hand_db) == {"dates"}


def test_a_trip_that_does_not_start_in_the_start_city_fails_on_start_city(hand_db):
    assert broken(PLAN, hand_db, start_city="Beta") == {"start_city"}


def test_an_entity_not_in_the_database_fails_on_unknown(hand_db):
    assert broken(mutated(3, hotel="Nowhere Inn"), hand_db) == {"unknown"}
    assert broken(mutated(3, city="Atlantis"), hand_db) >= {"unknown"}


def test_an_entity_of_another_city_fails_on_same_city(hand_db):
    assert broken(mutated(3, afternoon_attraction="Alpha Museum"), hand_db) == {"same_city"}


def test_a_near_duplicate_name_in_another_city_is_not_the_days_hotel(hand_db):
    assert broken(mutated(2, hotel="Beta Lux Annex"), hand_db) == {"same_city"}


def test_a_repeated_restaurant_or_city_fails_on_no_repeats(hand_db):
    assert broken(mutated(2, evening_restaurant="Beta Good"), hand_db) == {"no_repeats"}
    again = mutated(3, city="Alpha", hotel="Alpha Cheap Inn", afternoon_restaurant="Alpha Hotpot",
                    evening_restaurant="Alpha Tea", afternoon_attraction="Alpha Museum")
    assert broken(again, hand_db) == {"no_repeats"}


def test_the_luxury_tier_limits_each_fail_on_price_tier(hand_db):
    assert broken(mutated(2, evening_restaurant="Beta Pricey"), hand_db) == {"price_tier"}   # 150 + 201 >= 350
    assert broken(mutated(2, evening_restaurant="Beta Poor"), hand_db) == {"price_tier"}     # 3.1 < 4.0
    assert broken(mutated(2, afternoon_attraction="Beta Tower"), hand_db) == {"price_tier"}  # 120 is not < 120


def test_500_is_the_mid_tier_and_800_the_luxury_tier(hand_db):
    # Beta Mid (500) with Beta Peak (180): the mid tier's ticket limit (< 180) is broken
    assert broken(mutated(2, hotel="Beta Mid", afternoon_attraction="Beta Peak"), hand_db) == {"price_tier"}
    # Beta Low (499) with the same day: the 200-500 tier only asks for a restaurant >= 3.2
    assert broken(mutated(2, hotel="Beta Low", afternoon_attraction="Beta Peak"), hand_db) == set()
    # the mid tier needs one restaurant >= 4.0: Beta Poor and Beta Poorer have none
    assert broken(mutated(2, hotel="Beta Mid", afternoon_restaurant="Beta Poor", evening_restaurant="Beta Poorer"),
                  hand_db) == {"price_tier"}
    # the low tier needs one >= 3.2: 3.1 and 2.9 are not
    assert broken(mutated(2, hotel="Beta Low", afternoon_restaurant="Beta Poor", evening_restaurant="Beta Poorer"),
                  hand_db) == {"price_tier"}


def test_the_tier_rule_applies_on_the_tier_days_only(hand_db):
    plan = mutated(2, evening_restaurant="Beta Pricey")
    assert broken(plan, hand_db, tier_days=[3]) == set()


def test_a_hotel_under_the_rating_floor_fails_on_hotel_rating(hand_db):
    assert broken(mutated(1, hotel="Alpha Cheap Inn"), hand_db, min_hotel_rating=4.0) == {"hotel_rating"}
    assert broken(mutated(1, hotel="Alpha Cheap Inn"), hand_db) == set()  # the rule off


def test_an_outdoor_attraction_on_a_day_of_rain_fails_on_rain_indoor(hand_db):
    assert broken(mutated(3, afternoon_attraction="Gamma Park"), hand_db, rain_indoor=True) == {"rain_indoor"}
    assert broken(mutated(1, afternoon_attraction="Alpha Pagoda"), hand_db, rain_indoor=True) == set()  # sunny


def test_consecutive_cities_without_direct_transport_fail_on_direct_link(hand_db):
    db = sqlite3.connect(hand_db)
    with db:
        db.execute("DELETE FROM inter_city_transport WHERE from_city = 'Beta' AND to_city = 'Gamma'")
    db.close()
    assert broken(PLAN, hand_db, direct_link=True) == {"direct_link"}
    assert broken(PLAN, hand_db) == set()


def test_one_yuan_over_the_budget_fails_on_budget(hand_db):
    assert broken(PLAN, hand_db, budget=PLAN_COST) == set()
    assert broken(PLAN, hand_db, budget=PLAN_COST - 1) == {"budget"}


def test_every_rule_has_a_name_in_RULES():
    assert set(trip_verifier.RULES) == {"format", "days", "dates", "start_city", "unknown", "same_city", "no_repeats",
                                        "price_tier", "hotel_rating", "rain_indoor", "direct_link", "budget"}
