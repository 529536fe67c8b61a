"""The trip-planning environment's 14 query tools (spec §5, the paper's trip example).

The spec lists what the tools do: get_all_cities; attractions / hotels / restaurants by city; city
by attraction / hotel / restaurant; intra- and inter-city transport; info by keyword for each
entity type (city, hotel, attraction, restaurant); weather by city and date. `submit_result`, the
15th, belongs to the episode (`dsv32.synth.session`), not to the database. The exact names and the
shape of each result are our choice.

This file is the `tools.py` of every trip environment, copied as it is: each tool is a function
`name(db, **arguments) -> str` over a read-only `sqlite3` connection, and `TOOLS` holds their
OpenAI-format schemas. It therefore imports nothing but the standard library, so that it runs
unchanged in a sandbox. Lists give names only; the details (prices, ratings) come from the info
tools, which match a keyword against names, so near-duplicate names come back together.
"""

import json


def _rows(db, sql: str, args: tuple = ()) -> list[dict]:
    cur = db.execute(sql, args)
    names = [c[0] for c in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def _names(db, table: str, city: str) -> str:
    if not _rows(db, "SELECT name FROM cities WHERE name = ?", (city,)):
        return f"error: there is no city named {city!r}; get_all_cities lists them"
    return json.dumps([r["name"] for r in _rows(db, f"SELECT name FROM {table} WHERE city = ? ORDER BY name", (city,))],
                      ensure_ascii=False)


def _city_of(db, table: str, kind: str, name: str) -> str:
    rows = _rows(db, f"SELECT city FROM {table} WHERE name = ?", (name,))
    if not rows:
        return f"error: there is no {kind} named {name!r}"
    return rows[0]["city"]


def _infos(db, table: str, keyword: str) -> str:
    if not keyword.strip():
        return "error: the keyword is empty"
    rows = _rows(db, f"SELECT * FROM {table} WHERE instr(lower(name), lower(?)) > 0 ORDER BY name", (keyword.strip(),))
    if not rows:
        return f"error: nothing matches {keyword!r}"
    return json.dumps(rows, ensure_ascii=False)


def get_all_cities(db) -> str:
    return json.dumps([r["name"] for r in _rows(db, "SELECT name FROM cities ORDER BY name")], ensure_ascii=False)


def get_all_attractions_by_city(db, city: str) -> str:
    return _names(db, "attractions", city)


def get_all_hotels_by_city(db, city: str) -> str:
    return _names(db, "hotels", city)


def get_all_restaurants_by_city(db, city: str) -> str:
    return _names(db, "restaurants", city)


def get_city_by_attraction(db, attraction: str) -> str:
    return _city_of(db, "attractions", "attraction", attraction)


def get_city_by_hotel(db, hotel: str) -> str:
    return _city_of(db, "hotels", "hotel", hotel)


def get_city_by_restaurant(db, restaurant: str) -> str:
    return _city_of(db, "restaurants", "restaurant", restaurant)


def get_city_transport(db, city: str) -> str:
    rows = _rows(db, "SELECT mode, price FROM city_transport WHERE city = ? ORDER BY mode", (city,))
    return json.dumps(rows, ensure_ascii=False) if rows else f"error: no transport is known within {city!r}"


def get_inter_city_transport(db, from_city: str, to_city: str) -> str:
    rows = _rows(db, "SELECT mode, price, hours FROM inter_city_transport WHERE from_city = ? AND to_city = ? "
                     "ORDER BY mode", (from_city, to_city))
    return json.dumps(rows, ensure_ascii=False) if rows else f"no direct transport from {from_city} to {to_city}"


def get_infos_by_city(db, keyword: str) -> str:
    return _infos(db, "cities", keyword)


def get_infos_by_hotel(db, keyword: str) -> str:
    return _infos(db, "hotels", keyword)


def get_infos_by_attraction(db, keyword: str) -> str:
    return _infos(db, "attractions", keyword)


def get_infos_by_restaurant(db, keyword: str) -> str:
    return _infos(db, "restaurants", keyword)


def get_weather_by_city_date(db, city: str, date: str) -> str:
    rows = _rows(db, "SELECT condition, high_c, low_c FROM weather WHERE city = ? AND date = ?", (city, date))
    return json.dumps(rows[0], ensure_ascii=False) if rows else f"error: no forecast for {city!r} on {date!r}"


def _schema(name: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": "string", "description": v} for k, v in params.items()},
        "required": list(params)}}}


CITY = "the exact city name"
KEYWORD = "a word or an exact name; every entry whose name contains it (case-insensitive) is returned"
TOOLS = [
    _schema("get_all_cities", "List the names of all cities."),
    _schema("get_all_attractions_by_city", "List the names of the attractions in a city.", city=CITY),
    _schema("get_all_hotels_by_city", "List the names of the hotels in a city.", city=CITY),
    _schema("get_all_restaurants_by_city", "List the names of the restaurants in a city.", city=CITY),
    _schema("get_city_by_attraction", "The city an attraction is in.", attraction="the exact attraction name"),
    _schema("get_city_by_hotel", "The city a hotel is in.", hotel="the exact hotel name"),
    _schema("get_city_by_restaurant", "The city a restaurant is in.", restaurant="the exact restaurant name"),
    _schema("get_city_transport", "Ways to get around within a city, with their prices in CNY.", city=CITY),
    _schema("get_inter_city_transport", "Direct transport from one city to another: mode, price in CNY, hours.",
            from_city=CITY, to_city=CITY),
    _schema("get_infos_by_city", "Details of the cities whose names contain the keyword.", keyword=KEYWORD),
    _schema("get_infos_by_hotel", "Details of the hotels whose names contain the keyword: city, price per night "
            "(CNY), rating.", keyword=KEYWORD),
    _schema("get_infos_by_attraction", "Details of the attractions whose names contain the keyword: city, ticket "
            "price (CNY), rating, whether it is indoors.", keyword=KEYWORD),
    _schema("get_infos_by_restaurant", "Details of the restaurants whose names contain the keyword: city, average "
            "price per person (CNY), rating, cuisine.", keyword=KEYWORD),
    _schema("get_weather_by_city_date", "The weather forecast of a city on a date.", city=CITY,
            date="the date as YYYY-MM-DD"),
]
