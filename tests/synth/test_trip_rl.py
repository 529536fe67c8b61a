"""The trip-planning RL experiment's pieces (experiments/trip_rl.py): an expert episode becomes an
SFT example that decodes to the conversation it had, labels on its turns only; the environment
runner that GRPO and the evaluation use answers the expert's calls with exactly the tool results
the SFT data holds, and scores its submission 1.0; the evaluation runs a model through it; and
the pass@1 table is the mean score per level."""

import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dsv32.chat import encode_completion, encode_messages, parse_completion
from dsv32.config import preset
from dsv32.model import Transformer
from dsv32.synth.environment import load_environment
from dsv32.synth.rl_env import environment_tasks
from dsv32.synth.trip_expert import TripExpert
from dsv32.tokenizer import train_tokenizer
from dsv32.train.losses import IGNORE

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `experiments` as a package
from experiments import trip_rl


@pytest.fixture(scope="module")
def envs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trip_envs")
    trip_rl.make_split(root, [1], 2, trip_rl.SEED0["heldout"], "test")
    return root


def test_an_expert_episode_is_an_sft_example_of_the_conversation_it_had(envs, tmp_path):
    tok = train_tokenizer([textwrap.__file__], 600, tmp_path)
    row, segs = trip_rl.expert_episode(envs / "trip-d1-s200000", TripExpert())
    assert row["score"] == 1.0 and len(segs) == 1  # one contiguous context: no management
    tools = load_environment(envs / "trip-d1-s200000").tool_schemas()
    (ids, labels), = trip_rl.sft_examples(tok, tools, segs)
    start, turns = segs[0]
    assert turns[-1]["role"] == "assistant" and not turns[-1]["tool_calls"]  # the closing turn ...
    kept = turns[:-1]                                                      # ... is not trained on
    system = {"role": "system", "content": "", "tools": tools}
    assert tok.decode(ids) == encode_messages([system] + start + kept, "thinking")
    labelled = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assistant = [m for m in kept if m["role"] == "assistant"]
    assert all(m["reasoning_content"] in labelled for m in assistant)
    assert not any(m["content"][:40] in labelled for m in kept if m["role"] == "tool" and len(m["content"]) > 40)


def test_the_rl_runner_answers_the_experts_tokens_as_its_sft_data_shows_and_scores_them(envs):
    _, segs = trip_rl.expert_episode(envs / "trip-d1-s200001", TripExpert())
    turns = segs[0][1]
    task = environment_tasks(envs)[1]
    assert task.environment.endswith("trip-d1-s200001")
    runner, mine = trip_rl.CompactRunner(), replace(task)
    results = []
    for m in turns:
        if m["role"] == "assistant" and m["tool_calls"]:
            # the turn as a model that wrote the expert's tokens would have it parsed
            step = runner(mine, parse_completion(encode_completion(m, "thinking"), "thinking"))
            results += step[1] if step is not None else []
    runner.close()
    assert results == [m["content"] for m in turns if m["role"] == "tool"][:-1]  # "submitted" is the runner's end
    assert mine.verdict == 1.0 and task.verdict is None  # the score is on the trajectory's own copy


def test_the_evaluation_runs_a_model_through_the_runner_and_scores_every_trajectory(envs, tmp_path):
    tok = train_tokenizer([textwrap.__file__], 600, tmp_path)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                 max_position_embeddings=8192, index_topk=8192)
    torch.manual_seed(0)
    # a short prompt (the environment stays the task's): the trip prompt's 4k tokens take a
    # CPU engine half a minute to prefill, and the plumbing is what is tested here
    tasks = [replace(t, messages=[{"role": "user", "content": "Plan my trip."}]) for t in environment_tasks(envs)]
    rows = trip_rl.evaluate(Transformer(cfg).eval(), tok, tasks, 2, 4, 1, 8192, "random")
    assert [r["env"] for r in rows] == ["trip-d1-s200000"] * 2 + ["trip-d1-s200001"] * 2
    assert all(r["score"] == 0.0 and not r["submitted"] and r["level"] == 1 and r["stage"] == "random" for r in rows)


def test_pass_at_1_is_the_mean_score_per_level_with_its_standard_error():
    rows = [{"level": 1, "score": s} for s in (1.0, 0.0, 1.0, 1.0)] + [{"level": 3, "score": 0.0, "submitted": False}]
    t = trip_rl.table(rows)
    assert t[1] == {"n": 4, "pass@1": 0.75, "stderr": round((0.75 * 0.25 / 4) ** 0.5, 4), "submitted": 1.0}
    assert t[3] == {"n": 1, "pass@1": 0.0, "stderr": 0.0, "submitted": 0.0}


def test_the_evaluation_takes_the_first_environments_of_each_level(tmp_path):
    root = tmp_path / "split"
    trip_rl.make_split(root, [1, 2], 2, trip_rl.SEED0["harder"], "test")
    names = [Path(t.environment).name for t in trip_rl.split_tasks(root, 1)]
    assert names == ["trip-d1-s300000", "trip-d2-s300000"]
    assert len(trip_rl.split_tasks(root, 5)) == 4
