"""Clean RL splits: held-out prompts excluded by hash from every training stream, and an
out-of-distribution split disjoint from both, checked on a prompt space so small that an
unexcluded stream would certainly repeat held-out prompts."""

import random

import pytest

from dsv32.rl import tasks as T
from dsv32.rl.tasks import OOD_DOMAINS, Domain, TaskMix, arithmetic_task, held_out_split, prompt_hash, prompt_text


@pytest.fixture
def tiny_domain(monkeypatch):
    """'tiny': a+b, a*b or a-b with a, b in 0..2: 27 prompts in all."""
    monkeypatch.setitem(T.GENERATORS, "tiny", lambda rng: arithmetic_task(rng, 2, 2, range(3)))
    return [Domain("tiny")]


def test_the_prompt_hash_ignores_spacing_case_and_the_tool_list():
    plain = arithmetic_task(random.Random(7))
    tool = arithmetic_task(random.Random(7), tool=True)       # same question, calculator offered
    assert prompt_hash(plain) == prompt_hash(tool)
    spaced = T.Task("x", [{"role": "user", "content": "  " + plain.messages[0]["content"].upper().replace(" ", "   ")}])
    assert prompt_text(spaced) == prompt_text(plain) and prompt_hash(spaced) == prompt_hash(plain)
    other = T.Task("x", [{"role": "user", "content": plain.messages[0]["content"] + "!"}])
    assert prompt_hash(other) != prompt_hash(plain)


def test_held_out_prompts_never_appear_in_the_training_streams(tiny_domain):
    held = held_out_split(TaskMix(tiny_domain), 9)
    held_hashes = {prompt_hash(t) for t in held}
    assert len(held_hashes) == 9                               # distinct
    # without exclusion, 500 draws from 27 prompts certainly hit held-out ones
    plain = TaskMix(tiny_domain)
    plain.sample(random.Random(1), 500)
    assert plain.seen & held_hashes
    # with it: an SFT-like stream and an RL-like stream (its own seed, drawn step by step)
    train = TaskMix(tiny_domain).excluding(held_hashes)
    drawn = train.sample(random.Random(1), 500)
    rng = random.Random(0)
    for _ in range(50):
        drawn += train.sample(rng, 8)
    assert not {prompt_hash(t) for t in drawn} & held_hashes
    assert train.seen == {prompt_hash(t) for t in drawn}       # what it reports is what it drew
    assert len(train.seen) == 27 - 9                           # and it still draws every other prompt


def test_the_ood_split_is_disjoint_from_held_out_and_training(tiny_domain):
    held = held_out_split(TaskMix(tiny_domain), 9)
    held_hashes = {prompt_hash(t) for t in held}
    ood = held_out_split(TaskMix([Domain(d) for d in OOD_DOMAINS]), 50, seed=54321, exclude=held_hashes)
    ood_hashes = {prompt_hash(t) for t in ood}
    assert {t.domain for t in ood} == set(OOD_DOMAINS)
    train = TaskMix(tiny_domain + [Domain("arithmetic")]).excluding(held_hashes | ood_hashes)
    train.sample(random.Random(2), 3000)
    assert not ood_hashes & held_hashes and not ood_hashes & train.seen and not held_hashes & train.seen
    # by construction too: an OOD prompt has 5-6 terms or a two-digit operand, a training one neither
    def out_of_distribution(task):
        text = task.messages[-1]["content"]
        return sum(text.count(op) for op in "+-*") >= 4 or any(a.isdigit() and b.isdigit() for a, b in zip(text, text[1:]))

    assert all(map(out_of_distribution, ood))
    assert not any(map(out_of_distribution, TaskMix([Domain("arithmetic"), Domain("arithmetic-tool")]).sample(
        random.Random(3), 2000)))


def test_a_held_out_set_larger_than_the_prompt_space_and_an_exhausted_mix_are_refused(tiny_domain):
    with pytest.raises(ValueError, match="fewer than 30 distinct prompts"):
        held_out_split(TaskMix(tiny_domain), 30)
    everything = {prompt_hash(t) for t in held_out_split(TaskMix(tiny_domain), 27)}
    with pytest.raises(ValueError, match="excluded held-out prompts"):
        TaskMix(tiny_domain, exclude=everything).sample(random.Random(0), 1)


def test_a_pool_leaves_out_its_excluded_tasks():
    pool = [T.Task("qa", [{"role": "user", "content": f"question {i}"}], grader="exact", answer=str(i)) for i in range(4)]
    mix = TaskMix([Domain("qa")], {"qa": pool}, exclude={prompt_hash(pool[0]), prompt_hash(pool[2])})
    assert {t.answer for t in mix.sample(random.Random(0), 200)} == {"1", "3"}
