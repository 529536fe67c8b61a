"""A scripted expert for the trip-planning family: a `dsv32.agent.policy` Policy that plans a trip
by calling the environment's query tools and `submit_result`, the way a model would have to.

Why it exists: a small model of ours scores 0 on a fresh trip task, so GRPO has no signal. The
expert's trajectories are the SFT data that gets a model to non-zero pass@1 first
(`experiments/trip_rl.py`), as the multi-hop expert does for the browser (`dsv32.agent.multihop`).

It reads only what the rendered conversation shows: the task text (whose rules it parses back,
`read_task`), its own earlier tool calls and their results. It keeps no state between calls, so
any view of an episode gives the same next message. Its plan, with few calls (a 3-day trip takes
five turns), is:
1. `get_all_cities`;
2. for each day in turn, a candidate city (day 1: the start city; later, the unvisited cities in
   the list's order, and with the direct-link rule only those `get_inter_city_transport` links to
   the previous day's city): its hotels, restaurants and attractions, asked for with the city's
   name as the keyword of the info tools (every entity of a city is named after it), keeping the
   rows whose `city` is that city (the keyword also finds distractors elsewhere), and the day's
   weather when the task has the rain rule;
3. the cheapest day in that city that keeps the day's rules (`best_day`: hotel rating floor,
   indoor attraction on rain, the price-tier limits on tier days, two different restaurants);
   a city with none is passed over for the next candidate;
4. `submit_result` with the plan as JSON, then a closing message once it is accepted.

It is greedy: the route follows the city list and each day is the cheapest on its own, so a
budget rule can be broken by a route that the reference solution (`trip_solution`, which searches
all routes) would avoid, and with the direct-link rule it can walk into a city with no link
onwards. Both grow with difficulty, which is why its success falls at the hard levels. Entities
that a distractor placed in a city under another city's name are never looked at.

`slip` (0..1) makes a deliberately imperfect expert: on each day, with that probability (drawn
from the task text and the day, so an episode is reproducible), it forgets the day's rules and
takes the cheapest hotel, restaurants and attraction of the city.
"""

from __future__ import annotations

import datetime
import itertools
import json
import random
import re

from dsv32.agent.policy import Reply
from dsv32.chat import encode_completion, encode_messages
from dsv32.engine import SamplingParams

TRIP_RE = re.compile(r"a (\d+)-day trip starting from (.+?), from (\d{4}-\d\d-\d\d) to (\d{4}-\d\d-\d\d)\.")
TIER_RE = re.compile(r"On (day \d+(?: and day \d+)*) I want to be smart about the budget")
RATING_RE = re.compile(r"Every hotel must be rated at least ([\d.]+)\.")
BUDGET_RE = re.compile(r"tickets together must cost at most (\d+) CNY")
INFOS = (("hotels", "get_infos_by_hotel"), ("restaurants", "get_infos_by_restaurant"),
         ("attractions", "get_infos_by_attraction"))
DONE = "I submitted the plan."


class TripTaskError(ValueError):
    """The conversation does not hold a trip-planning task the expert can read."""


def read_task(text: str) -> dict:
    """The rules of a trip task from its text (`dsv32.synth.trip.task_text`), as its params."""
    m = TRIP_RE.search(text)
    if m is None:
        raise TripTaskError("the task is not a trip-planning task: no 'N-day trip starting from CITY, from "
                            "DATE to DATE.' in it")
    tiers = TIER_RE.search(text)
    rating, budget = RATING_RE.search(text), BUDGET_RE.search(text)
    return {"start_city": m[2], "start_date": m[3], "days": int(m[1]),
            "tier_days": [int(d) for d in re.findall(r"\d+", tiers[1])] if tiers else [],
            "min_hotel_rating": float(rating[1]) if rating else None,
            "rain_indoor": "If rain is forecast in that day's city" in text,
            "direct_link": "There must be direct transport" in text,
            "budget": int(budget[1]) if budget else None}


def trip_dates(params: dict) -> list[str]:
    d0 = datetime.date.fromisoformat(params["start_date"])
    return [(d0 + datetime.timedelta(days=i)).isoformat() for i in range(params["days"])]


def tier_ok(hotel: dict, lunch: dict, dinner: dict, sight: dict) -> bool:
    """The price-tier rule of one day, as the task states it."""
    price, best = hotel["price"], max(lunch["rating"], dinner["rating"])
    if price >= 800:
        return (lunch["price"] + dinner["price"] < 350 and min(lunch["rating"], dinner["rating"]) >= 4.0
                and sight["ticket_price"] < 120)
    if price >= 500:
        return best >= 4.0 and sight["ticket_price"] < 180
    return price >= 200 and best >= 3.2


def best_day(rows: dict[str, list[dict]], rain: bool, tier: bool, floor: float | None,
             rules: bool = True) -> tuple[int, dict, dict, dict, dict] | None:
    """(cost, hotel, lunch, attraction, dinner): the cheapest day in one city's rows that keeps
    the day's rules (without `rules`: the cheapest day at all); None when no day does."""
    hotels = [h for h in rows["hotels"] if not rules or floor is None or h["rating"] >= floor]
    sights = [s for s in rows["attractions"] if not rules or not rain or s["indoor"]]
    best = None
    for h, s in itertools.product(hotels, sights):
        for a, b in itertools.permutations(rows["restaurants"], 2):
            if rules and tier and not tier_ok(h, a, b, s):
                continue
            cost = h["price"] + a["price"] + b["price"] + s["ticket_price"]
            if best is None or cost < best[0]:
                best = (cost, h, a, s, b)
    return best


def _arguments(call: dict) -> dict:
    args = call["function"]["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except json.JSONDecodeError:
            return {}
    return args if isinstance(args, dict) else {}


def _key(name: str, arguments: dict) -> tuple:
    return name, tuple(sorted((k, str(v)) for k, v in arguments.items()))


def history(messages: list[dict], start: int) -> tuple[dict[tuple, str], set[tuple]]:
    """({(tool, arguments): result} of the tool calls after messages[start], each call paired with
    the tool message that follows its assistant turn in order; the calls of the latest turn)."""
    seen: dict[tuple, str] = {}
    pending: list[tuple] = []
    latest: set[tuple] = set()
    for m in messages[start + 1:]:
        if m["role"] == "assistant":
            pending = [_key(c["function"]["name"], _arguments(c)) for c in m.get("tool_calls") or []]
            latest = set(pending)
        elif m["role"] == "tool" and pending:
            seen[pending.pop(0)] = m["content"]
    return seen, latest


def compact(result: str) -> str:
    """A tool result that is a JSON list of objects with the same keys, as a table: a header line
    `key | key | ...` and one line of values per object (about half the characters); any other
    result as it is. The experiment's rendering (`experiments/trip_rl.py`), to fit its window."""
    try:
        rows = json.loads(result)
    except json.JSONDecodeError:
        return result
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return result
    keys = list(rows[0])
    if any(list(r) != keys for r in rows):
        return result
    return "\n".join([" | ".join(keys)] + [" | ".join(str(r[k]) for k in keys) for r in rows])


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_rows(result: str, city: str) -> list[dict]:
    """The rows of an info tool's result (JSON, or its `compact` table) that are in `city`; none
    for an error result."""
    if result.startswith("["):
        try:
            rows = json.loads(result)
        except json.JSONDecodeError:
            return []
    else:
        lines = result.splitlines()
        if not lines or " | " not in lines[0]:
            return []
        keys = lines[0].split(" | ")
        rows = [dict(zip(keys, map(_value, line.split(" | ")))) for line in lines[1:]]
    return [r for r in rows if isinstance(r, dict) and r.get("city") == city] if isinstance(rows, list) else []


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _day_line(i: int, city: str, day: tuple) -> str:
    _, h, a, s, b = day
    indoor = ", indoors" if s.get("indoor") else ""
    return (f"Day {i + 1} in {city}: hotel {h['name']} ({h['price']} CNY, rated {h['rating']}), lunch at "
            f"{a['name']} ({a['price']} CNY, rated {a['rating']}), {s['name']} ({s['ticket_price']} CNY{indoor}), "
            f"dinner at {b['name']} ({b['price']} CNY, rated {b['rating']}).")


class TripExpert:
    """The scripted trip planner as a Policy (see the module docstring). `count(text) -> tokens`
    measures prompts and replies (a tokenizer's; characters / 4 when not given)."""

    def __init__(self, context_window: int = 1 << 20, count=None, thinking_mode: str = "thinking",
                 slip: float = 0.0):
        if not 0.0 <= slip <= 1.0:
            raise ValueError(f"slip must be in [0, 1], got {slip}")
        self.context_window, self.thinking_mode, self.slip = context_window, thinking_mode, slip
        self._len = count or (lambda s: -(-len(s) // 4))

    def fork(self) -> TripExpert:
        return self  # no episode state

    def count(self, messages: list[dict], tools: list[dict]) -> int:
        return self._len(encode_messages(messages, self.thinking_mode, tools=tools or None))

    def __call__(self, messages: list[dict], tools: list[dict], sampling: SamplingParams) -> Reply:
        message = self.decide(messages)
        text = encode_completion(message, self.thinking_mode)
        return Reply(message, text, "stop", self.count(messages, tools), self._len(text))

    def decide(self, messages: list[dict]) -> dict:
        """The next assistant message for a view of an episode. Its reasoning states what the
        latest tool results decided (a day's plan, a city that keeps no day's rules) and the
        next step; what earlier turns decided is in their reasoning, which the view keeps."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise TripTaskError("the view has no task (no user message)")
        task = messages[users[-1]]["content"]
        params = read_task(task)
        seen, fresh = history(messages, users[-1])
        if any(k[0] == "submit_result" for k in seen):
            return {"role": "assistant", "reasoning_content": "The plan is submitted.", "content": DONE,
                    "tool_calls": []}
        if _key("get_all_cities", {}) not in seen:
            return self._message(f"The trip starts in {params['start_city']}. I list the cities.",
                                 [_call("get_all_cities")])
        try:
            cities = json.loads(seen[_key("get_all_cities", {})])
        except json.JSONDecodeError:
            cities = []
        dates, notes, plan, route, total = trip_dates(params), [], [], [], 0
        rng = random.Random(task)
        for i, date in enumerate(dates):
            keep = rng.random() >= self.slip
            chosen = None
            for city in [params["start_city"]] if i == 0 else [c for c in cities if c not in route]:
                keys = []
                if i > 0 and params["direct_link"]:
                    link = _call("get_inter_city_transport", from_city=route[-1], to_city=city)
                    keys.append(_key("get_inter_city_transport", link["function"]["arguments"]))
                    if keys[-1] not in seen:
                        return self._message(" ".join(notes + [(f"Is there direct transport from {route[-1]} to "
                                                               f"{city}?")]), [link])
                    if seen[keys[-1]].startswith(("no direct", "error")):
                        continue
                need = [_call(tool, keyword=city) for _, tool in INFOS]
                if params["rain_indoor"]:
                    need.append(_call("get_weather_by_city_date", city=city, date=date))
                keys += [_key(c["function"]["name"], c["function"]["arguments"]) for c in need]
                missing = [c for c, k in zip(need, keys[-len(need):]) if k not in seen]
                if missing:
                    what = "hotels, restaurants and attractions" + (" and the weather" if params["rain_indoor"] else "")
                    return self._message(" ".join(notes + [(f"Day {i + 1} ({date}) could be in {city}. I look up its "
                                                           f"{what}.")]), missing)
                rows = {kind: read_rows(seen[_key(tool, {"keyword": city})], city) for kind, tool in INFOS}
                rain = params["rain_indoor"] and '"rain"' in seen[keys[-1]]
                day = best_day(rows, rain, i + 1 in params["tier_days"], params["min_hotel_rating"], rules=keep)
                new = any(k in fresh for k in keys)
                if day is not None:
                    chosen = (city, day)
                    if new:
                        notes.append(_day_line(i, city, day))
                    break
                if new:
                    notes.append(f"No day in {city} keeps the rules.")
            if chosen is None:
                return self._message(" ".join(notes + [f"No city is left for day {i + 1}; I submit what I have."]),
                                     [self._submit(plan)])
            city, day = chosen
            route.append(city)
            total += day[0]
            plan.append({"time": date, "city": city, "hotel": day[1]["name"], "afternoon_restaurant": day[2]["name"],
                         "afternoon_attraction": day[3]["name"], "evening_restaurant": day[4]["name"]})
        budget = f" (the budget is {params['budget']})" if params["budget"] is not None else ""
        return self._message(" ".join(notes + [f"The plan costs {total} CNY{budget}. I submit it."]),
                             [self._submit(plan)])

    @staticmethod
    def _submit(plan: list[dict]) -> dict:
        return _call("submit_result", result=json.dumps(plan, ensure_ascii=False))

    @staticmethod
    def _message(reasoning: str, calls: list[dict]) -> dict:
        return {"role": "assistant", "reasoning_content": reasoning, "content": "", "tool_calls": calls}
