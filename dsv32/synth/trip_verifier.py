"""The trip-planning verifier: the submitted itinerary checked against the task's rules by
querying the database itself (spec §5: "a Python verification function").

This file is the `verifier.py` of every trip environment, copied as it is, so it imports nothing
but the standard library. `verify(result, db, params)` is the contract; `failures` says which
rules are broken, each as "rule: what", the rule being one of RULES.

The submission is the paper's JSON format as we read it: a list with one object per day,
{"time", "city", "hotel", "afternoon_restaurant", "afternoon_attraction", "evening_restaurant"}.

The rules (spec §5, the 3-day example from Hangzhou):
- no repeated cities, hotels, attractions or restaurants over the whole trip;
- every hotel, restaurant and attraction is in that day's city;
- on each day of `tier_days` (the paper: day 2) the hotel's price tier sets more limits:
  >= 800 CNY: lunch + dinner < 350 CNY, both restaurants rated >= 4.0, attraction ticket < 120 CNY;
  500-800: at least one restaurant rated >= 4.0, ticket < 180 CNY; 200-500: at least one
  restaurant rated >= 3.2. (The spec names the tiers; the limits inside them are the paper's
  example as we read it. A tier's lower bound belongs to it: 500 is mid-range, 800 luxury.)
Ours, switched on by difficulty: day 1 is in the start city and the dates follow from the start
date; every hotel rated >= `min_hotel_rating`; on a day of rain the attraction is indoors;
consecutive cities have direct transport; the total of hotels, restaurants (per person) and
tickets is at most `budget` CNY.
"""

import datetime
import json

RULES = ("format", "days", "dates", "start_city", "unknown", "same_city", "no_repeats", "price_tier",
         "hotel_rating", "rain_indoor", "direct_link", "budget")
FIELDS = ("time", "city", "hotel", "afternoon_restaurant", "afternoon_attraction", "evening_restaurant")
TABLES = {"hotel": "hotels", "afternoon_restaurant": "restaurants", "evening_restaurant": "restaurants",
          "afternoon_attraction": "attractions"}


def _row(db, table: str, name: str):
    cur = db.execute(f"SELECT * FROM {table} WHERE name = ?", (name,))
    row = cur.fetchone()
    return None if row is None else dict(zip([c[0] for c in cur.description], row))


def tier_failures(hotel_price: int, lunch: dict, dinner: dict, attraction: dict) -> list[str]:
    """What the price-tier rule finds wrong with one day (an empty list: nothing)."""
    best = max(lunch["rating"], dinner["rating"])
    ticket = attraction["ticket_price"]
    if hotel_price >= 800:
        out = []
        if lunch["price"] + dinner["price"] >= 350:
            out.append(f"the restaurants cost {lunch['price'] + dinner['price']} >= 350 with a hotel of {hotel_price}")
        if min(lunch["rating"], dinner["rating"]) < 4.0:
            out.append(f"a restaurant is rated {min(lunch['rating'], dinner['rating'])} < 4.0 with a hotel of "
                       f"{hotel_price}")
        if ticket >= 120:
            out.append(f"the ticket costs {ticket} >= 120 with a hotel of {hotel_price}")
        return out
    if hotel_price >= 500:
        out = [] if best >= 4.0 else [f"no restaurant is rated >= 4.0 (best {best}) with a hotel of {hotel_price}"]
        return out + ([f"the ticket costs {ticket} >= 180 with a hotel of {hotel_price}"] if ticket >= 180 else [])
    if hotel_price >= 200:
        return [] if best >= 3.2 else [f"no restaurant is rated >= 3.2 (best {best}) with a hotel of {hotel_price}"]
    return [f"the hotel costs {hotel_price} < 200, in none of the tiers"]


def parse(result) -> tuple[list | None, str | None]:
    """(the itinerary, None) or (None, why it is malformed)."""
    if isinstance(result, str):
        try:
            result = json.loads(result)
        except json.JSONDecodeError as e:
            return None, f"the result is not JSON: {e}"
    if not isinstance(result, list) or not result:
        return None, "the result must be a non-empty JSON list with one object per day"
    for i, day in enumerate(result, 1):
        if not isinstance(day, dict) or set(day) != set(FIELDS):
            return None, f"day {i} must be an object with exactly the fields {', '.join(FIELDS)}"
        bad = [k for k in FIELDS if not isinstance(day[k], str)]
        if bad:
            return None, f"day {i}: {', '.join(bad)} must be strings"
    return result, None


def failures(result, db, params: dict) -> list[str]:
    """Every rule the itinerary breaks, as "rule: what" (RULES), in rule order within each day."""
    plan, why = parse(result)
    if plan is None:
        return [f"format: {why}"]
    out = []
    if len(plan) != params["days"]:
        out.append(f"days: the plan has {len(plan)} days, the trip {params['days']}")
    start = datetime.date.fromisoformat(params["start_date"])
    for i, day in enumerate(plan):
        want = (start + datetime.timedelta(days=i)).isoformat()
        if day["time"] != want:
            out.append(f"dates: day {i + 1} is {day['time']!r}, not {want}")
    if plan[0]["city"] != params["start_city"]:
        out.append(f"start_city: day 1 is in {plan[0]['city']!r}, not {params['start_city']}")
    seen: dict[str, set] = {"city": set(), "hotel": set(), "restaurant": set(), "attraction": set()}
    total = 0
    for i, day in enumerate(plan, 1):
        if _row(db, "cities", day["city"]) is None:
            out.append(f"unknown: day {i}'s city {day['city']!r} is not in the database")
        rows = {k: _row(db, t, day[k]) for k, t in TABLES.items()}
        for k, row in rows.items():
            if row is None:
                out.append(f"unknown: day {i}'s {k} {day[k]!r} is not in the database")
            elif row["city"] != day["city"]:
                out.append(f"same_city: day {i}'s {k} {day[k]!r} is in {row['city']}, not {day['city']}")
        names = [("city", day["city"]), ("hotel", day["hotel"]), ("restaurant", day["afternoon_restaurant"]),
                 ("restaurant", day["evening_restaurant"]), ("attraction", day["afternoon_attraction"])]
        for kind, name in names:
            if name in seen[kind]:
                out.append(f"no_repeats: the {kind} {name!r} comes again on day {i}")
            seen[kind].add(name)
        if None in rows.values():
            continue
        hotel, lunch, dinner, sight = (rows[k] for k in ("hotel", "afternoon_restaurant", "evening_restaurant",
                                                           "afternoon_attraction"))
        total += hotel["price"] + lunch["price"] + dinner["price"] + sight["ticket_price"]
        if i in params.get("tier_days", []):
            out += [f"price_tier: day {i}: {f}" for f in tier_failures(hotel["price"], lunch, dinner, sight)]
        floor = params.get("min_hotel_rating")
        if floor is not None and hotel["rating"] < floor:
            out.append(f"hotel_rating: day {i}'s hotel is rated {hotel['rating']} < {floor}")
        if params.get("rain_indoor") and not sight["indoor"]:
            cur = db.execute("SELECT condition FROM weather WHERE city = ? AND date = ?", (day["city"], day["time"]))
            row = cur.fetchone()
            if row is not None and row[0] == "rain":
                out.append(f"rain_indoor: day {i} has rain and {sight['name']!r} is outdoors")
        if params.get("direct_link") and i > 1:
            prev = plan[i - 2]["city"]
            cur = db.execute("SELECT 1 FROM inter_city_transport WHERE from_city = ? AND to_city = ?",
                             (prev, day["city"]))
            if cur.fetchone() is None:
                out.append(f"direct_link: no direct transport from {prev} to {day['city']} (day {i})")
    budget = params.get("budget")
    if budget is not None and total > budget:
        out.append(f"budget: the trip costs {total} > {budget} CNY")
    return out


def verify(result, db, params: dict) -> tuple[float, list[str]]:
    """(1.0 when the itinerary keeps every rule, else 0.0; the broken rules)."""
    broken = failures(result, db, params)
    return (0.0 if broken else 1.0), broken
