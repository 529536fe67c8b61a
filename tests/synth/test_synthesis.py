"""The model-driven loop's control flow with a scripted model: accepted when the solution's
result passes the verifier, sent back with the reason otherwise, and difficulty raised by rounds."""

import copy

from dsv32.agent.policy import Reply
from dsv32.synth.environment import load_environment
from dsv32.synth.synthesis import FILES, parse_files, synthesize

DB = """
import sqlite3
db = sqlite3.connect("db.sqlite")
db.execute("CREATE TABLE items (name TEXT, price INTEGER)")
db.executemany("INSERT INTO items VALUES (?, ?)", [("tea", 30), ("cake", 12), ("soup", 18)])
db.commit()
"""
TOOLS = """
import json
def list_items(db):
    return json.dumps([r[0] for r in db.execute("SELECT name FROM items ORDER BY name")])
def price(db, name):
    row = db.execute("SELECT price FROM items WHERE name = ?", (name,)).fetchone()
    return str(row[0]) if row else "error: no item " + repr(name)
TOOLS = [{"type": "function", "function": {"name": "list_items", "description": "names",
          "parameters": {"type": "object", "properties": {}}}},
         {"type": "function", "function": {"name": "price", "description": "price of an item",
          "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}]
"""
SOLUTION = """
import json
def solve(call, params):
    names = json.loads(call("list_items"))
    return min(names, key=lambda n: int(call("price", name=n)))
"""
VERIFIER = """
def verify(result, db, params):
    return result == db.execute("SELECT name FROM items ORDER BY price LIMIT 1").fetchone()[0]
"""
HARDER_SOLUTION = SOLUTION.replace("min(", "max(")
HARDER_VERIFIER_WRONG = VERIFIER  # still asks for the cheapest: the harder solution fails it
HARDER_VERIFIER = VERIFIER.replace("ORDER BY price", "ORDER BY price DESC")


def files(**named: str) -> str:
    return "\n".join(f"```python\n# file: {name}\n{body.strip()}\n```" for name, body in named.items())


FIRST = files(**{"db.py": DB, "tools.py": TOOLS, "task.md": "Which item is cheapest?", "params.json": "{}",
                 "solution.py": SOLUTION, "verifier.py": VERIFIER})


class Model:
    """Returns the given texts in order as assistant messages; keeps what it was shown."""

    def __init__(self, texts):
        self.texts, self.seen, self.context_window = list(texts), [], 100_000

    def __call__(self, messages, tools, sampling):
        self.seen.append(copy.deepcopy(messages))
        text = self.texts.pop(0)
        return Reply({"role": "assistant", "content": text, "reasoning_content": "", "tool_calls": []}, text,
                     "stop", 0, 0)


def test_files_are_read_from_blocks_that_name_them():
    assert set(parse_files(FIRST)) == set(FILES)
    assert parse_files("```python\n# file: tools.py\nX = 1\n```\nno block here") == {"tools.py": "X = 1\n"}


def test_rounds_are_accepted_fixed_and_raised(tmp_path, sandbox_root):
    model = Model([FIRST,
                   files(**{"task.md": "Which item is dearest?", "solution.py": HARDER_SOLUTION,
                            "verifier.py": HARDER_VERIFIER_WRONG}),
                   files(**{"verifier.py": HARDER_VERIFIER})])
    rounds = synthesize(model, "shopping", tmp_path, rounds=2, fixes=2)
    assert [(r.index, r.accepted, r.attempts) for r in rounds] == [(1, True, 1), (2, True, 2)]
    assert "Now raise the difficulty" in model.seen[1][-1]["content"]
    assert "the verifier scored the solution's result 0" in model.seen[2][-1]["content"]
    first, second = rounds[0].env, rounds[1].env
    assert (first.task, first.meta["reference"]) == ("Which item is cheapest?", "cake")
    assert second.meta["reference"] == "tea" and second.difficulty == 2
    assert [t["function"]["name"] for t in second.tool_schemas()] == ["list_items", "price", "submit_result"]
    saved = load_environment(second.save(tmp_path / "out"))
    assert saved.verifier_code == HARDER_VERIFIER.strip() + "\n" and saved.params == {}


def test_a_round_that_is_never_fixed_ends_the_loop_with_the_reason(tmp_path, sandbox_root):
    reads_db = SOLUTION.replace('names = json.loads(call("list_items"))',
                                'import sqlite3; names = [r[0] for r in sqlite3.connect("db.sqlite").execute("SELECT name FROM items")]')
    broken = FIRST.replace(SOLUTION.strip(), reads_db.strip())
    model = Model([files(**{"db.py": DB}), broken, broken])
    rounds = synthesize(model, "shopping", tmp_path, rounds=3, fixes=2)
    assert len(rounds) == 1 and not rounds[0].accepted and rounds[0].attempts == 3 and rounds[0].env is None
    assert "these files are missing: tools.py" in model.seen[1][-1]["content"]
    assert "no such table: items" in rounds[0].reason  # sqlite made an empty file: the database is not there
