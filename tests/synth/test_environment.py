"""The environment contract: a directory that loads back to the same environment, an index, the
verifier's answer read as a score, and the agent's tools with submit_result."""

import json

import pytest

from dsv32.synth.environment import (
    EnvironmentFormatError,
    append_index,
    load_environment,
    read_index,
    verdict,
)
from dsv32.synth.runner import LocalTools
from dsv32.synth.session import agent_tools
from dsv32.synth.trip import make_trip


def test_an_environment_saved_and_loaded_is_the_same(tmp_path):
    env = make_trip(1, 2, tmp_path / "work")
    saved = env.save(tmp_path / "out" / env.name)
    back = load_environment(saved)
    assert back == env and back.db_path.read_bytes() == (tmp_path / "work" / f"{env.name}.sqlite").read_bytes()
    append_index(tmp_path / "out", back, reference_calls=7)
    assert read_index(tmp_path / "out") == [{"name": env.name, "path": env.name, "category": "trip planning",
                                              "difficulty": 2, "task": env.task, "reference_calls": 7}]
    with pytest.raises(FileExistsError, match="holds an environment already"):
        env.save(saved)


def test_a_directory_without_the_files_is_named_as_not_an_environment(tmp_path):
    (tmp_path / "environment.json").write_text("{}")
    with pytest.raises(EnvironmentFormatError, match="lacks db.sqlite, tools.py, solution.py, verifier.py"):
        load_environment(tmp_path)


def test_a_verifiers_answer_is_read_as_a_score_and_reasons():
    assert verdict(True) == (1.0, []) and verdict(0.25) == (0.25, []) and verdict((0, ["late"])) == (0.0, ["late"])
    for bad in (1.5, "yes", None):
        with pytest.raises(EnvironmentFormatError, match="a verifier must return"):
            verdict(bad)


def test_an_agent_calls_the_tools_by_schema_and_submits_once(tmp_path):
    env = make_trip(0, 1, tmp_path)
    local = LocalTools(env.tools_code, env.db_path)
    tools, submit = agent_tools(env, local.call)
    by = {t.name: t for t in tools}
    assert [t.schema() for t in tools] == env.tool_schemas() and len(tools) == 15
    assert json.loads(by["get_all_cities"]("{}")) == sorted(json.loads(by["get_all_cities"]({})))
    assert by["get_all_hotels_by_city"]({}) == "error: get_all_hotels_by_city needs the argument(s) city"
    assert by["submit_result"]({"result": env.meta["reference"]}) == "submitted"
    assert by["submit_result"]({"result": "[]"}).startswith("error: a result was submitted already")
    assert submit.submitted == env.meta["reference"]
    local.close()
