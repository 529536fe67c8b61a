"""The trip-planning reference solution: the cheapest itinerary that keeps every rule, found
through the tools alone (spec §5: "the solution may only call the tools or do logical
computation. It may not call other functions or read the DB directly").

This file is the `solution.py` of every trip environment, copied as it is. `solve(call, params)`
gets `call(name, **arguments) -> str`, the same door the agent has, and nothing else; the
environment runs it in a sandbox without the database (`dsv32.synth.runner`). It knows the rules
from the task (they are in its text), not from the verifier, whose code it does not use.
"""

import datetime
import itertools
import json


def _details(call, tool: str, name: str) -> dict:
    """The entry named exactly `name` among the keyword matches (near-duplicates come back too)."""
    rows = json.loads(call(tool, keyword=name))
    return next(r for r in rows if r["name"] == name)


def _city(call, city: str, params: dict, dates: list[str]) -> dict:
    names = {kind: json.loads(call(f"get_all_{kind}_by_city", city=city))
             for kind in ("hotels", "restaurants", "attractions")}
    info = {"hotels": "get_infos_by_hotel", "restaurants": "get_infos_by_restaurant",
            "attractions": "get_infos_by_attraction"}
    out = {kind: [_details(call, info[kind], n) for n in ns] for kind, ns in names.items()}
    out["rain"] = set()
    if params.get("rain_indoor"):
        out["rain"] = {d for d in dates if json.loads(call("get_weather_by_city_date", city=city, date=d))
                       ["condition"] == "rain"}
    return out


def _tier_ok(hotel: dict, a: dict, b: dict, sight: dict) -> bool:
    p, best = hotel["price"], max(a["rating"], b["rating"])
    if p >= 800:
        return (a["price"] + b["price"] < 350 and min(a["rating"], b["rating"]) >= 4.0
                and sight["ticket_price"] < 120)
    if p >= 500:
        return best >= 4.0 and sight["ticket_price"] < 180
    return p >= 200 and best >= 3.2


def _best_day(city: dict, day: int, date: str, params: dict):
    """(cost, hotel, lunch, attraction, dinner) of the cheapest day that keeps the day's rules."""
    floor = params.get("min_hotel_rating")
    hotels = [h for h in city["hotels"] if floor is None or h["rating"] >= floor]
    sights = [s for s in city["attractions"] if s["indoor"] or date not in city["rain"]]
    best = None
    for h, s in itertools.product(hotels, sights):
        for a, b in itertools.permutations(city["restaurants"], 2):
            if day in params.get("tier_days", []) and not _tier_ok(h, a, b, s):
                continue
            cost = h["price"] + a["price"] + b["price"] + s["ticket_price"]
            if best is None or cost < best[0]:
                best = (cost, h["name"], a["name"], s["name"], b["name"])
    return best


def solve(call, params: dict) -> str:
    start = datetime.date.fromisoformat(params["start_date"])
    dates = [(start + datetime.timedelta(days=i)).isoformat() for i in range(params["days"])]
    cities = json.loads(call("get_all_cities"))
    info = {c: _city(call, c, params, dates) for c in cities}
    links: dict = {}

    def linked(a: str, b: str) -> bool:
        if not params.get("direct_link"):
            return True
        if (a, b) not in links:
            links[a, b] = call("get_inter_city_transport", from_city=a, to_city=b).startswith("[")
        return links[a, b]

    days: dict = {}

    def day_plan(i: int, c: str):
        if (i, c) not in days:
            days[i, c] = _best_day(info[c], i + 1, dates[i], params)
        return days[i, c]

    best: list = [None, None]  # cost, route

    def search(route: list[str], cost: int) -> None:
        if best[0] is not None and cost >= best[0]:
            return
        if len(route) == len(dates):
            best[0], best[1] = cost, list(route)
            return
        for c in cities:
            if c not in route and linked(route[-1], c) and day_plan(len(route), c) is not None:
                search(route + [c], cost + day_plan(len(route), c)[0])

    first = params["start_city"]
    if first in info and day_plan(0, first) is not None:
        search([first], day_plan(0, first)[0])
    if best[1] is None:
        return "[]"
    plan = []
    for i, c in enumerate(best[1]):
        _, hotel, lunch, sight, dinner = day_plan(i, c)
        plan.append({"time": dates[i], "city": c, "hotel": hotel, "afternoon_restaurant": lunch,
                     "afternoon_attraction": sight, "evening_restaurant": dinner})
    return json.dumps(plan, ensure_ascii=False)
