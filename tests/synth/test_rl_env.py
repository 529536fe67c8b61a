"""Synthesized environments as RL tasks: the reference solution's tool calls, replayed as the
policy's turns, earn the verifier's score of the reference (1.0); a trajectory that never submits
earns 0; a plan that breaks a rule earns what the verifier gives it, with its reasons; two
trajectories of one task keep their own submissions; and rollouts on a random tiny model run."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dsv32.chat import encode_messages
from dsv32.cli import build_parser
from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.model import Transformer
from dsv32.rl.rewards import outcome
from dsv32.rl.rollout import rollout
from dsv32.rl.tasks import Task, arithmetic_task
from dsv32.synth.environment import SUBMIT, append_index, load_environment
from dsv32.synth.rl_env import EnvironmentRunner, environment_tasks, trusted
from dsv32.synth.runner import LocalTools, local_verify, namespace
from dsv32.synth.trip import make_trip
from dsv32.tokenizer import train_tokenizer

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder of two trip environments (difficulty 1), as `dsv32 synth general` writes it."""
    root = tmp_path_factory.mktemp("envs")
    for seed in SEEDS:
        env = make_trip(seed, 1, root / ".work")
        env.save(root / env.name)
        append_index(root, env)
    return root


def reference(directory: str) -> tuple[list[tuple[str, dict]], str]:
    """The reference solution's tool calls and result, run here through the tools (not the runner)."""
    env = load_environment(directory)
    tools = LocalTools(env.tools_code, env.db_path)
    calls = []

    def call(tool, /, **arguments):
        calls.append((tool, arguments))
        return tools.call(tool, arguments)

    result = namespace(env.solution_code, "solution.py")["solve"](call, env.params)
    tools.close()
    return calls, result


def turn(*calls: tuple[str, dict]) -> dict:
    """An assistant turn calling tools, as `parse_completion` gives it."""
    return {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}} for name, args in calls]}


def play(runner, task, turns) -> list:
    """Feed the turns to the runner until it ends the episode; the steps it returned."""
    steps = []
    for message in turns:
        steps.append(runner(task, message))
        if steps[-1] is None:
            break
    return steps


def test_one_task_per_environment_with_its_tools_and_the_verifier_as_grader(root):
    tasks = environment_tasks(root / "environments.jsonl")
    assert [Path(t.environment).name for t in tasks] == [f"trip-d1-s{s}" for s in SEEDS]
    for t in tasks:
        env = load_environment(t.environment)
        assert trusted(env) and t.grader == "verifier" and t.thinking_mode == "thinking"
        assert t.messages == [{"role": "system", "content": "", "tools": env.tools + [SUBMIT]},
                              {"role": "user", "content": env.task}]
        assert t.domain == "trip-planning"


def test_an_environment_task_needs_its_environment():
    with pytest.raises(ValueError, match="no environment"):
        Task("trip", [{"role": "user", "content": "plan"}], grader="verifier")


def test_the_reference_calls_replayed_earn_the_verifiers_score_of_the_reference(root):
    runner = EnvironmentRunner()
    for task in environment_tasks(root):
        env = load_environment(task.environment)
        calls, result = reference(task.environment)
        assert local_verify(env.verifier_code, result, env.params, env.db_path)[0] == 1.0  # the oracle
        turns = [turn(c) for c in calls] + [turn(("submit_result", {"result": result}))]
        steps = play(runner, task, turns)
        assert len(steps) == len(turns) and steps[-1] is None and all(s is not None for s in steps[:-1])
        # the tools answered as they answer the solution
        assert steps[0][1] == [LocalTools(env.tools_code, env.db_path).call(*calls[0])]
        assert outcome(task, "") == 1.0 and runner.verdict(task) == (1.0, [])
    runner.close()


def test_a_trajectory_that_never_submits_earns_nothing(root):
    runner = EnvironmentRunner()
    task = environment_tasks(root)[0]
    steps = play(runner, task, [turn(("get_all_cities", {})), {"role": "assistant", "content": "Alpha, Beta",
                                                                "reasoning_content": "", "tool_calls": []}])
    assert steps[0] is not None and steps[1] is None
    assert outcome(task, "Alpha, Beta") == 0.0 and runner.verdict(task) is None
    cut = replace(environment_tasks(root)[0])
    assert runner(cut, None) is None and outcome(cut, "") == 0.0  # a turn that does not parse ends it too


def test_a_plan_that_breaks_a_rule_earns_less_with_the_verifiers_reasons(root):
    runner = EnvironmentRunner()
    task = environment_tasks(root)[0]
    env = load_environment(task.environment)
    plan = json.loads(reference(task.environment)[1])
    plan[1]["hotel"] = plan[0]["hotel"]  # a hotel of another city, and a repeat
    bad = json.dumps(plan)
    want = local_verify(env.verifier_code, bad, env.params, env.db_path)
    assert want[0] < 1.0 and want[1]
    assert play(runner, task, [turn(("submit_result", {"result": bad}), ("get_all_cities", {}))]) == [None]
    assert runner.verdict(task) == want and outcome(task, "") == want[0]
    assert any("no_repeats" in r or "same_city" in r for r in want[1])


def test_a_malformed_submission_is_an_error_result_and_the_episode_goes_on(root):
    runner = EnvironmentRunner()
    task = environment_tasks(root)[0]
    [(_, results)] = play(runner, task, [turn(("submit_result", {"answer": "[]"}), ("no_such_tool", {}))])
    assert results[0].startswith("error: submit_result needs the argument(s) result")
    assert results[1].startswith("error: there is no tool 'no_such_tool'")
    assert runner.verdict(task) is None and outcome(task, "") == 0.0


def test_two_trajectories_of_one_task_keep_their_own_submissions(root):
    runner = EnvironmentRunner()
    task = environment_tasks(root)[1]
    good = reference(task.environment)[1]
    a, b = replace(task), replace(task)  # what RLTrainer does per trajectory
    assert runner(a, turn(("get_all_cities", {}))) is not None
    assert runner(b, turn(("get_all_cities", {}))) is not None
    assert runner(a, turn(("submit_result", {"result": good}))) is None
    assert runner(b, turn(("submit_result", {"result": "[]"}))) is None  # not "submitted already"
    assert (outcome(a, ""), outcome(b, "")) == (1.0, 0.0) and task.verdict is None


def test_rollouts_of_a_random_tiny_model_run_on_environment_and_arithmetic_tasks(root, tmp_path):
    tasks = environment_tasks(root)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(encode_messages(t.messages, t.thinking_mode) for t in tasks))
    tok = train_tokenizer([corpus], 1024, tmp_path)
    longest = max(len(tok.encode(encode_messages(t.messages, t.thinking_mode))) for t in tasks)
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                 max_position_embeddings=longest + 64)
    engine = Engine(Transformer(cfg).eval(), EngineConfig(num_blocks=64, max_num_seqs=6))
    runner = EnvironmentRunner()
    group = [replace(t) for t in tasks for _ in range(2)] + [arithmetic_task(random.Random(0), tool=True)] * 2
    trajs = rollout(engine, tok, group, SamplingParams(temperature=1.0, max_tokens=12), max_turns=2, env=runner)
    assert len(trajs) == len(group) and all(t.n_sampled > 0 for t in trajs)
    for t in trajs:
        assert 0.0 <= outcome(t.task, t.answer) <= 1.0
    runner.close()


def test_dsv32_rl_trains_on_an_environments_folder_with_its_categories_as_domains(root, tmp_path):
    # the tiny preset's 1024 positions hold no trip prompt (~1.6k tokens): the run samples nothing,
    # but the folder, the domains, the runner and the export are wired
    args = build_parser().parse_args(["rl", "--environments", str(root), "--steps", "1", "--prompts-per-step", "2",
                                      "--group-size", "2", "--minibatches", "1", "--out", str(tmp_path / "run")])
    assert args.func(args) == 0
    [m] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert m["reward/trip-planning"] == 0.0 and (tmp_path / "run" / "model" / "config.json").is_file()
