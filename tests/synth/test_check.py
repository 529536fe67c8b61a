"""The acceptance check enforces what the spec asks of a solution: it gets its facts through the
tools only (it runs without the database), and its result must pass the verifier."""

import dataclasses
import json
from pathlib import Path

from hand_world import PARAMS, PLAN

from dsv32.agent.sandbox import Sandbox
from dsv32.synth import trip_solution, trip_tools, trip_verifier
from dsv32.synth.check import check_environment
from dsv32.synth.environment import Environment
from dsv32.synth.runner import LocalTools, SandboxedTools


def hand_env(db_path, solution_code: str) -> Environment:
    return Environment(name="hand", category="trip planning", task="plan", params=PARAMS, tools=trip_tools.TOOLS,
                       tools_code=Path(trip_tools.__file__).read_text(), solution_code=solution_code,
                       verifier_code=Path(trip_verifier.__file__).read_text(), db_path=db_path)


def test_the_reference_solution_is_accepted_with_the_tools_in_this_process_or_in_a_sandbox(hand_db, sandbox_root):
    env = hand_env(hand_db, Path(trip_solution.__file__).read_text())
    local = check_environment(env, sandbox_root, trusted=True)
    boxed = check_environment(env, sandbox_root, trusted=False)
    assert local.accepted and boxed.accepted, (local.reason, boxed.reason)
    assert local.result == boxed.result and local.calls == boxed.calls > 0


def test_a_solution_that_reads_the_database_finds_no_file(hand_db, sandbox_root):
    reads = f"""
import json, sqlite3
def solve(call, params):
    db = sqlite3.connect("file:{hand_db}?mode=ro", uri=True)
    return json.dumps(db.execute("SELECT name FROM hotels").fetchall())
"""
    check = check_environment(hand_env(hand_db, reads), sandbox_root, trusted=True)
    assert not check.accepted and "unable to open database file" in check.reason


def test_a_solution_that_writes_the_answer_in_without_a_tool_call_is_rejected(hand_db, sandbox_root):
    # the verifier would pass this answer; the check does not, because no tool was called
    hardcoded = f"def solve(call, params):\n    return {json.dumps(json.dumps(PLAN))}\n"
    check = check_environment(hand_env(hand_db, hardcoded), sandbox_root, trusted=True)
    assert not check.accepted and check.calls == 0 and "made no tool call" in check.reason


def test_a_solution_whose_result_the_verifier_rejects_is_rejected_with_the_verifiers_reasons(hand_db, sandbox_root):
    wrong = f"""
import json
def solve(call, params):
    call("get_all_cities")
    plan = json.loads({json.dumps(json.dumps(PLAN))})
    plan[1]["evening_restaurant"] = plan[1]["afternoon_restaurant"]
    return json.dumps(plan)
"""
    check = check_environment(hand_env(hand_db, wrong), sandbox_root, trusted=True)
    assert not check.accepted and check.calls == 1 and "no_repeats" in check.reason


def test_a_crashing_solution_is_rejected_with_its_traceback(hand_db, sandbox_root):
    check = check_environment(hand_env(hand_db, "def solve(call, params):\n    raise KeyError('boom')\n"),
                              sandbox_root, trusted=True)
    assert not check.accepted and "KeyError: 'boom'" in check.reason


def test_sandboxed_tools_answer_as_the_same_code_does_here(hand_db, sandbox_root):
    code = Path(trip_tools.__file__).read_text()
    here, box = LocalTools(code, hand_db), Sandbox(sandbox_root, "tools")
    there = SandboxedTools(box, code, hand_db)
    try:
        for name, args in [("get_all_cities", {}), ("get_infos_by_hotel", {"keyword": "Lux"}),
                           ("get_city_by_hotel", {"hotel": "nope"}), ("no_such_tool", {}),
                           ("get_weather_by_city_date", {"city": "Gamma", "date": "2025-10-03"})]:
            assert there.call(name, args) == here.call(name, args)
    finally:
        there.close()
        here.close()
        box.remove()


def test_model_written_tools_that_crash_on_load_are_rejected(hand_db, sandbox_root):
    env = dataclasses.replace(hand_env(hand_db, Path(trip_solution.__file__).read_text()), tools_code="raise SystemExit(3)\n")
    check = check_environment(env, sandbox_root)
    assert not check.accepted and "the tools do not load" in check.reason
