"""A small trip database written by hand: the oracle the verifier and the tools are checked
against, and a valid plan on it."""

# Hand-chosen numbers: each comment says which rule the row exists to test.
ROWS = {
    "cities": [("Alpha", "P", "start"), ("Beta", "P", "day 2"), ("Gamma", "P", "day 3")],
    "hotels": [("Alpha Inn", "Alpha", 300, 4.1), ("Alpha Cheap Inn", "Alpha", 250, 3.5),
               ("Beta Lux", "Beta", 800, 4.6),        # 800 exactly: the luxury tier
               ("Beta Mid", "Beta", 500, 4.2),        # 500 exactly: the mid tier
               ("Beta Low", "Beta", 499, 4.0),        # 499: the 200-500 tier
               ("Gamma Hotel", "Gamma", 400, 4.3),
               ("Beta Lux Annex", "Gamma", 800, 4.6)],  # a near-duplicate name in another city
    "restaurants": [("Alpha Noodles", "Alpha", 60, 4.0, "local"), ("Alpha Dumplings", "Alpha", 40, 3.5, "local"),
                    ("Alpha Hotpot", "Alpha", 90, 4.4, "local"), ("Alpha Tea", "Alpha", 30, 3.3, "local"),
                    ("Beta Good", "Beta", 150, 4.2, "local"), ("Beta Fine", "Beta", 199, 4.0, "local"),  # 349 together
                    ("Beta Pricey", "Beta", 201, 4.8, "local"),   # with Beta Fine: 400 >= 350
                    ("Beta Poor", "Beta", 50, 3.1, "local"), ("Beta Poorer", "Beta", 40, 2.9, "local"),
                    ("Gamma Fish", "Gamma", 80, 3.9, "local"), ("Gamma Rice", "Gamma", 30, 3.6, "local")],
    "attractions": [("Alpha Pagoda", "Alpha", 50, 4.5, 0), ("Alpha Museum", "Alpha", 20, 4.0, 1),
                    ("Beta Museum", "Beta", 119, 4.1, 1),    # under 120
                    ("Beta Tower", "Beta", 120, 4.0, 1),     # 120 exactly: not under 120
                    ("Beta Peak", "Beta", 180, 4.7, 0),      # 180 exactly: not under 180
                    ("Gamma Gallery", "Gamma", 60, 4.2, 1), ("Gamma Park", "Gamma", 0, 4.4, 0)],
    "city_transport": [("Alpha", "metro", 3)],
    "inter_city_transport": [("Alpha", "Beta", "train", 100, 1.5), ("Beta", "Alpha", "train", 100, 1.5),
                             ("Beta", "Gamma", "flight", 600, 2.0), ("Gamma", "Beta", "flight", 600, 2.0)],
    "weather": [("Alpha", "2025-10-01", "sunny", 25, 18), ("Beta", "2025-10-02", "cloudy", 22, 15),
                ("Gamma", "2025-10-03", "rain", 20, 14), ("Alpha", "2025-10-03", "sunny", 24, 17)],
}

PARAMS = {"start_city": "Alpha", "start_date": "2025-10-01", "days": 3, "tier_days": [2], "min_hotel_rating": None,
          "rain_indoor": False, "direct_link": False, "budget": None}

# Day 2 in the luxury tier: 150 + 199 = 349 < 350, both >= 4.0, ticket 119 < 120.
# Cost: (300+60+40+50) + (800+150+199+119) + (400+80+30+60) = 450 + 1268 + 570 = 2288.
PLAN = [
    {"time": "2025-10-01", "city": "Alpha", "hotel": "Alpha Inn", "afternoon_restaurant": "Alpha Noodles",
     "afternoon_attraction": "Alpha Pagoda", "evening_restaurant": "Alpha Dumplings"},
    {"time": "2025-10-02", "city": "Beta", "hotel": "Beta Lux", "afternoon_restaurant": "Beta Good",
     "afternoon_attraction": "Beta Museum", "evening_restaurant": "Beta Fine"},
    {"time": "2025-10-03", "city": "Gamma", "hotel": "Gamma Hotel", "afternoon_restaurant": "Gamma Fish",
     "afternoon_attraction": "Gamma Gallery", "evening_restaurant": "Gamma Rice"},
]
PLAN_COST = 2288

