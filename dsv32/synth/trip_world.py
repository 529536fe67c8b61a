"""The trip-planning database, generated from a seed: cities, hotels, attractions, restaurants,
transport within and between cities, and weather (spec §5: the agent "stores [data] in a sandbox
database"; here a program writes it, no model and no Internet).

The city names are real, everything about them is invented. What the generator guarantees, so
that every rule of the task can be met and can be broken inside any city (our choice, for the
verifier tests and for the solver's retries to be rare):
- hotels cost 200 CNY a night or more, with at least one in each of the paper's price tiers
  (200-500, 500-800, >=800), so the day-2 tier rule always applies;
- at least two restaurants rated >= 4.0 that together cost under 350, and two rated below 3.2;
- at least one indoor attraction under 120 CNY, one outdoor one, and one of 180 CNY or more.
Distractors are entities whose names contain another entity's name, in another city, so that a
keyword search for one returns both.
"""

from __future__ import annotations

import datetime
import random
import sqlite3
from pathlib import Path

CITIES = ["Hangzhou", "Suzhou", "Nanjing", "Shanghai", "Huangshan", "Shaoxing", "Ningbo", "Wuxi", "Xiamen",
          "Guilin", "Chengdu", "Xi'an", "Qingdao", "Kunming", "Lijiang", "Changsha", "Wuhan", "Yangzhou"]
PROVINCES = ["Zhejiang", "Jiangsu", "Anhui", "Fujian", "Guangxi", "Sichuan", "Shaanxi", "Shandong", "Yunnan",
             "Hunan", "Hubei"]
HOTEL_WORDS = ["Lakeview", "Grand", "Garden", "Riverside", "Bamboo", "Jade", "Lotus", "Harbour", "Pavilion",
               "Silk Road", "Plum Blossom", "Golden Crane", "Moonlight", "Pine Hill", "Canal"]
HOTEL_KINDS = ["Hotel", "Inn", "Resort", "Suites", "Guesthouse"]
SIGHTS = ["Pagoda", "Museum", "Old Street", "Temple", "Botanical Garden", "Art Gallery", "Ancient Town",
          "Science Center", "Water Park", "Mountain Trail", "Silk Museum", "Tea Plantation", "Aquarium", "Wetland Park"]
INDOOR = {"Museum", "Art Gallery", "Science Center", "Silk Museum", "Aquarium"}
DISHES = ["Noodle House", "Dumpling Bar", "Hotpot", "Tea House", "Fish Kitchen", "Dim Sum Hall", "Barbecue",
          "Vegetarian Table", "Duck Restaurant", "Rice Bowl"]
CUISINES = ["Zhejiang", "Sichuan", "Cantonese", "Jiangsu", "Hunan", "Yunnan", "Fujian"]
WEATHER = [("sunny", 0.45), ("cloudy", 0.3), ("rain", 0.25)]

SCHEMA = """
CREATE TABLE cities (name TEXT PRIMARY KEY, province TEXT NOT NULL, description TEXT NOT NULL);
CREATE TABLE hotels (name TEXT PRIMARY KEY, city TEXT NOT NULL, price INTEGER NOT NULL, rating REAL NOT NULL);
CREATE TABLE attractions (name TEXT PRIMARY KEY, city TEXT NOT NULL, ticket_price INTEGER NOT NULL,
                          rating REAL NOT NULL, indoor INTEGER NOT NULL);
CREATE TABLE restaurants (name TEXT PRIMARY KEY, city TEXT NOT NULL, price INTEGER NOT NULL, rating REAL NOT NULL,
                          cuisine TEXT NOT NULL);
CREATE TABLE city_transport (city TEXT NOT NULL, mode TEXT NOT NULL, price INTEGER NOT NULL);
CREATE TABLE inter_city_transport (from_city TEXT NOT NULL, to_city TEXT NOT NULL, mode TEXT NOT NULL,
                                   price INTEGER NOT NULL, hours REAL NOT NULL);
CREATE TABLE weather (city TEXT NOT NULL, date TEXT NOT NULL, condition TEXT NOT NULL, high_c INTEGER NOT NULL,
                      low_c INTEGER NOT NULL);
"""


def dates(start: str, days: int) -> list[str]:
    """`days` consecutive ISO dates from `start`."""
    d0 = datetime.date.fromisoformat(start)
    return [(d0 + datetime.timedelta(days=i)).isoformat() for i in range(days)]


def _unique(rng: random.Random, taken: set[str], make) -> str:
    for _ in range(1000):
        name = make(rng)
        if name not in taken:
            taken.add(name)
            return name
    raise RuntimeError("ran out of distinct names; lower the number of cities or entities")


def _city_rows(rng: random.Random, city: str, taken: set[str]) -> dict[str, list[tuple]]:
    rating = lambda lo, hi: round(rng.uniform(lo, hi), 1)
    hotel = lambda r: f"{city} {r.choice(HOTEL_WORDS)} {r.choice(HOTEL_KINDS)}"
    prices = [rng.randint(200, 499), rng.randint(500, 799), rng.randint(800, 1600)]
    prices += [rng.randint(200, 1400) for _ in range(rng.randint(1, 3))]
    hotels = [(_unique(rng, taken, hotel), city, p, rating(3.0, 3.6) if p < 500 else rating(3.5, 4.9)) for p in prices]
    sight = lambda r: f"{city} {r.choice(SIGHTS)}"
    attractions = []
    for want in ("cheap-indoor", "outdoor", "pricey", "any", "any"):
        for _ in range(50):
            name = _unique(rng, taken, sight)
            indoor = name.removeprefix(f"{city} ") in INDOOR
            ticket = rng.choice([0, rng.randint(20, 119), rng.randint(120, 179), rng.randint(180, 320)])
            ok = {"cheap-indoor": indoor and ticket < 120, "outdoor": not indoor, "pricey": ticket >= 180}.get(want, True)
            if ok:
                attractions.append((name, city, ticket, rating(3.0, 4.9), int(indoor)))
                break
            taken.discard(name)
    dish = lambda r: f"{city} {r.choice(HOTEL_WORDS)} {r.choice(DISHES)}"
    spec = [(40, 160, 4.0, 4.9), (40, 160, 4.0, 4.9), (30, 120, 2.5, 3.1), (30, 120, 2.5, 3.1)]
    spec += [(40, 300, 2.8, 4.9) for _ in range(rng.randint(1, 3))]
    restaurants = [(_unique(rng, taken, dish), city, rng.randint(lo, hi), rating(r0, r1), rng.choice(CUISINES))
                   for lo, hi, r0, r1 in spec]
    transport = [(city, "metro", rng.choice([2, 3, 4, 5])), (city, "bus", rng.choice([1, 2])),
                 (city, "taxi", rng.randint(15, 60))]
    return {"hotels": hotels, "attractions": attractions, "restaurants": restaurants, "city_transport": transport}


def _distractor(rng: random.Random, row: tuple, cities: list[str], taken: set[str], suffix: list[str]) -> tuple | None:
    """A copy of an entity in another city whose name contains the original's."""
    other = rng.choice([c for c in cities if c != row[1]])
    name = f"{row[0]} {rng.choice(suffix)}"
    if name in taken:
        return None
    taken.add(name)
    return (name, other, *row[2:])


def build_world(path: str | Path, seed: int, n_cities: int, n_distractors: int, trip_dates: list[str],
                link_probability: float = 0.45) -> list[str]:
    """Write the database to `path` (a new file) and return its cities, the first being the start."""
    if not 2 <= n_cities <= len(CITIES):
        raise ValueError(f"n_cities must be in 2..{len(CITIES)}, got {n_cities}")
    rng = random.Random(seed)
    cities = rng.sample(CITIES, n_cities)
    taken: set[str] = set(cities)
    tables: dict[str, list[tuple]] = {t: [] for t in ("cities", "hotels", "attractions", "restaurants",
                                                      "city_transport", "inter_city_transport", "weather")}
    for city in cities:
        tables["cities"].append((city, rng.choice(PROVINCES), f"{city}, a city of {rng.randint(1, 15)} million people"))
        for table, rows in _city_rows(rng, city, taken).items():
            tables[table] += rows
        for day in trip_dates:
            condition = rng.choices([w for w, _ in WEATHER], [p for _, p in WEATHER])[0]
            high = rng.randint(14, 32)
            tables["weather"].append((city, day, condition, high, high - rng.randint(4, 10)))
    for i, a in enumerate(cities):
        for b in cities[i + 1:]:
            if rng.random() < link_probability:
                mode, price, hours = rng.choice([("train", rng.randint(40, 400), round(rng.uniform(0.5, 6), 1)),
                                                 ("flight", rng.randint(300, 1500), round(rng.uniform(1, 3), 1))])
                tables["inter_city_transport"] += [(a, b, mode, price, hours), (b, a, mode, price, hours)]
    for _ in range(n_distractors):
        table, suffix = rng.choice([("hotels", ["Annex", "Express", "II"]), ("restaurants", ["Express", "Branch"]),
                                    ("attractions", ["Annex", "West Wing"])])
        row = _distractor(rng, rng.choice(tables[table]), cities, taken, suffix)
        if row is not None:
            tables[table].append(row)
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"the database {path} exists already")
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        for table, rows in tables.items():
            if rows:
                db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
    db.close()
    return cities
