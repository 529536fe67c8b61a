"""The agent experiment's SFT data (experiments/agent_context.py `world_examples`): a training
world's examples are the scripted expert's episodes under every trained strategy, tokenized, and a
process pool makes the same examples, in the same order, as one process."""

import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from agent_context import (TRAINED_ON, Setup, expert_runs, schemas, sft_examples,  # noqa: E402
                           world_examples)

from dsv32.agent.corpus import Corpus  # noqa: E402
from dsv32.agent.multihop import World  # noqa: E402
from dsv32.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def setup_and_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    text = d / "corpus.txt"
    text.write_text("\n".join(World(30, seed=s).documents[i].text for s in (1, 2) for i in range(30)))
    train_tokenizer([text], 512, d)
    return Setup(8192, 160, 120, 8, 2), d / "tokenizer.json"


def jobs(setup, tok_path, tools):
    rng = random.Random(0)
    worlds = [World(30, seed=s) for s in (1, 2)]
    return [(s, 30, [w.question(rng, h) for h in (1, 2)], setup, tools, str(tok_path), "")
            for s, w in zip((1, 2), worlds)]


def test_a_worlds_examples_are_the_experts_episodes_under_every_trained_strategy(setup_and_tok):
    setup, tok_path = setup_and_tok
    tok = Tokenizer.from_file(tok_path)
    world = World(30, seed=1)
    corpus = Corpus.build(world.documents, sources=["multihop"], progress=False)
    tools = schemas(corpus)
    job = jobs(setup, tok_path, tools)[0]
    _, segs = expert_runs(world, corpus, job[2], TRAINED_ON, setup, lambda s: len(tok.encode(s)))
    want = [e for e in sft_examples(tok, tools, segs) if len(e[0]) <= setup.window]
    assert want and world_examples(job) == want


def test_a_process_pool_makes_the_same_examples_in_the_same_order(setup_and_tok):
    setup, tok_path = setup_and_tok
    tools = schemas(Corpus.build(World(30, seed=0).documents, sources=["multihop"], progress=False))
    js = jobs(setup, tok_path, tools)
    with ProcessPoolExecutor(2) as pool:
        assert list(pool.map(world_examples, js)) == [world_examples(j) for j in js]
