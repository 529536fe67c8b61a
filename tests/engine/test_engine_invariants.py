"""Invariants of the paged engine's serving core (prefix cache, block accounting, preemption),
checked through its public behaviour against the plain model: greedy tokens from full forwards
without any cache. Written to survive a rewrite of the engine's insides (a ModelRunner, CUDA
graphs): they read only Engine / EngineConfig / SamplingParams / Engine.output, the BlockManager
and block_hash of dsv32/engine/cache.py, and the scheduler's `blocks`, `running`, `waiting`,
`num_preemptions`, `preempt` and `schedule`."""

import copy
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.engine.cache import BlockManager, block_hash

BS = 16  # block size of every engine here: prompts of one to three blocks stay cheap on a CPU


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


class Oracle:
    """Greedy tokens of the plain model, one full forward per token, no cache; memoised per prompt
    (a longer request extends what a shorter one computed)."""

    def __init__(self, model):
        self.model, self.memo = model, {}

    @torch.no_grad()
    def __call__(self, prompt: list[int], n: int) -> list[int]:
        out = self.memo.setdefault(tuple(prompt), [])
        while len(out) < n:
            out.append(int(self.model(torch.tensor([list(prompt) + out])).logits[0, -1].argmax()))
        return out[:n]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def oracle(tiny):
    return Oracle(tiny)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 512, (n,), generator=g).tolist()


def engine(model, num_blocks: int, **kw) -> Engine:
    return Engine(model, EngineConfig(num_blocks=num_blocks, block_size=BS, **kw))


def run(eng: Engine, prompts, params: SamplingParams):
    seqs = [eng.add_request(p, params) for p in prompts]
    for _ in range(10_000):
        if not eng.has_work():
            break
        eng.step()
    assert not eng.has_work()
    return [eng.output(s) for s in seqs]


def assert_all_blocks_free(eng: Engine) -> None:
    bm = eng.scheduler.blocks
    assert bm.num_free == len(bm.ref) and not any(bm.ref), f"{bm.num_free} blocks free, refcounts {bm.ref}"


def record_plans(eng: Engine) -> list:
    """Wrap the scheduler's schedule: every plan it makes, in order."""
    plans, schedule = [], eng.scheduler.schedule

    def recording():
        plans.append(schedule())
        return plans[-1]

    eng.scheduler.schedule = recording
    return plans


def record_preemptions(eng: Engine) -> list[str]:
    """Wrap the scheduler's preempt: the request ids of its victims, in order."""
    victims, preempt = [], eng.scheduler.preempt

    def recording(seq):
        victims.append(seq.request_id)
        preempt(seq)

    eng.scheduler.preempt = recording
    return victims


# ---- the prefix cache: only a whole, computed, same-position prefix is ever reused ----

def test_block_hash_chains_the_whole_prefix():
    a, b, x = tokens(BS, 1), tokens(BS, 2), tokens(BS, 3)
    assert block_hash(None, x) == block_hash(None, list(x))                      # a pure function
    assert block_hash(block_hash(None, a), x) != block_hash(None, x)            # position matters
    assert block_hash(block_hash(None, a), x) != block_hash(block_hash(None, b), x)  # history matters
    bm = BlockManager(num_blocks=4, block_size=BS)
    table = bm.allocate(2 * BS, [])
    h0 = block_hash(None, a)
    bm.register(table[0], h0)
    bm.register(table[1], block_hash(h0, x))
    assert bm.lookup_prefix(a + x + [7])[0] == table
    assert bm.lookup_prefix(x + a + [7])[0] == [] and bm.lookup_prefix(b + x + [7])[0] == []


def test_prompts_sharing_only_a_later_block_never_share_its_cache(tiny, oracle):
    """A+X was served; X+B (X moved to the front) and B+X (X behind another first block) find
    nothing cached: X's entries were computed at positions 16..31 after A, and hold for no other
    prefix."""
    a, b, x, tail = tokens(BS, 11), tokens(BS, 12), tokens(BS, 13), tokens(3, 14)
    eng = engine(tiny, 16)
    first = run(eng, [a + x + tail], greedy(4))[0]
    assert first.token_ids == oracle(a + x + tail, 4)
    for p in (x + b + tail, b + x + tail):
        out = run(eng, [p], greedy(4))[0]
        assert out.num_cached_tokens == 0
        assert out.token_ids == oracle(p, 4)
    assert_all_blocks_free(eng)


def test_a_prompt_of_whole_blocks_is_served_again_with_its_last_block_recomputed(tiny, oracle):
    """A prompt of exactly two blocks, sent again (alone, then twice at once), reuses only its first
    block: the last is recomputed so at least one prompt token is fed to produce the next token."""
    p = tokens(2 * BS, 21)
    want = oracle(p, 5)
    eng = engine(tiny, 16)
    together = run(eng, [p, p], greedy(5))  # cold: the second is admitted before anything is cached
    assert [o.token_ids for o in together] == [want, want]
    eng = engine(tiny, 16)
    first = run(eng, [p], greedy(5))[0]
    assert first.token_ids == want and first.num_cached_tokens == 0
    again = run(eng, [p], greedy(5))[0]
    assert again.token_ids == want and again.num_cached_tokens == BS
    together = run(eng, [p, p], greedy(5))
    assert [o.token_ids for o in together] == [want, want]
    assert [o.num_cached_tokens for o in together] == [BS, BS]
    assert_all_blocks_free(eng)


def test_a_prompts_partial_last_block_is_never_found_in_the_prefix_cache(tiny, oracle):
    """After a prompt of 1.5 blocks is served (its output too short to fill the second block),
    prompts that start with those 1.5 blocks reuse exactly the one full block."""
    p = tokens(BS + BS // 2, 31)
    eng = engine(tiny, 16)
    first = run(eng, [p], greedy(4))[0]  # 24 + 4 tokens: block 1 never fills
    assert first.token_ids == oracle(p, 4)
    for q in (p + tokens(BS // 2 + 4, 32), p + tokens(1, 33), p + first.token_ids[:2] + tokens(10, 34)):
        out = run(eng, [q], greedy(4))[0]
        assert out.num_cached_tokens == BS
        assert out.token_ids == oracle(q, 4)
    assert_all_blocks_free(eng)


def test_a_block_is_findable_only_once_every_token_in_it_is_computed(tiny, oracle):
    """Chunked prefill of a 2.5-block prompt in chunks of 1.5 blocks, aborted after the first
    chunk: its second block holds known prompt tokens but only half of their cache entries, so a
    prompt sharing both blocks reuses the first only."""
    p = tokens(2 * BS + BS // 2, 41)
    eng = engine(tiny, 16, prefill_chunk=BS + BS // 2)
    seq = eng.add_request(p, greedy(4))
    eng.step()
    eng.abort(seq.request_id)
    assert_all_blocks_free(eng)
    q = p[:2 * BS] + tokens(5, 42)
    out = run(eng, [q], greedy(4))[0]
    assert out.num_cached_tokens == BS
    assert out.token_ids == oracle(q, 4)


def test_a_block_completed_by_generated_tokens_is_reused_by_the_next_turn(tiny, oracle):
    """A prompt of 1.5 blocks whose output fills the second block: the next turn (prompt, output,
    new tokens) reuses both blocks, and gets the model's tokens."""
    p = tokens(BS + BS // 2, 51)
    eng = engine(tiny, 16)
    first = run(eng, [p], greedy(12))[0]  # 24 + 12 tokens: positions 0..34 computed
    assert first.token_ids == oracle(p, 12)
    q = p + first.token_ids + tokens(3, 52)
    out = run(eng, [q], greedy(4))[0]
    assert out.num_cached_tokens == 2 * BS
    assert out.token_ids == oracle(q, 4)
    assert_all_blocks_free(eng)


def test_a_freed_block_handed_out_again_is_no_longer_found_under_its_old_prefix(tiny, oracle):
    """A (2.5 blocks) is served, then B takes every block of a four-block cache: A's freed blocks
    now hold B's entries, so A sent again finds nothing cached and gets the model's tokens."""
    a, b = tokens(2 * BS + BS // 2, 91), tokens(4 * BS - 4, 92)
    eng = engine(tiny, 4)
    assert run(eng, [a], greedy(4))[0].token_ids == oracle(a, 4)
    assert run(eng, [b], greedy(4))[0].token_ids == oracle(b, 4)  # 60 + 4 tokens: all four blocks
    again = run(eng, [a], greedy(4))[0]
    assert again.num_cached_tokens == 0
    assert again.token_ids == oracle(a, 4)
    assert_all_blocks_free(eng)


def test_a_finished_prefix_is_evicted_from_its_last_block_back(tiny, oracle):
    """P (3 full blocks + 2 tokens) finishes in a five-block cache; Q then takes three of the free
    blocks, exactly one of them a full block of P's. A table is freed from its end and the block
    freed first is handed out first, so Q gets the never-used block, P's partial fourth and P's
    third: P sent again still finds its first two."""
    p, q = tokens(3 * BS + 2, 93), tokens(2 * BS + BS // 2, 94)
    eng = engine(tiny, 5)
    assert run(eng, [p], greedy(1))[0].token_ids == oracle(p, 1)  # 4 blocks, 3 of them full
    assert run(eng, [q], greedy(1))[0].token_ids == oracle(q, 1)  # 3 blocks: the 5th, P's 4th and 3rd
    again = run(eng, [p], greedy(3))[0]
    assert again.num_cached_tokens == 2 * BS
    assert again.token_ids == oracle(p, 3)
    assert_all_blocks_free(eng)


# ---- preemption: the youngest running sequence goes, and is recomputed to the model's tokens ----

def test_preemption_takes_the_most_recently_admitted_sequence(tiny, oracle):
    """Three sequences fill a six-block cache; the first (the longest prompt) needs a third block
    first. The victim is the one admitted last, never the first or the middle one."""
    ps = [tokens(30, 61), tokens(20, 62), tokens(20, 63)]
    eng = engine(tiny, 6, prefix_caching=False)
    victims = record_preemptions(eng)
    seqs = [eng.add_request(p, greedy(10)) for p in ps]
    eng.step()
    assert [s.request_id for s in eng.scheduler.running] == [s.request_id for s in seqs]  # all admitted
    while eng.has_work():
        eng.step()
    assert victims == [seqs[2].request_id]
    assert [eng.output(s).token_ids for s in seqs] == [oracle(p, 10) for p in ps]
    assert_all_blocks_free(eng)


def test_a_sequence_preempted_in_a_step_gets_no_token_from_it(tiny, oracle):
    """Four 28-token prompts in a six-block cache: the first sequence needing a third block preempts
    the youngest, then later one that needs a fourth is itself the youngest and preempts itself.
    A victim, either kind, gains no token in the step it is preempted in, and its tokens are the
    model's."""
    ps = [tokens(28, 70 + i) for i in range(4)]
    eng = engine(tiny, 6, prefix_caching=False)
    victims = record_preemptions(eng)
    seqs = {s.request_id: s for s in (eng.add_request(p, greedy(24)) for p in ps)}
    while eng.has_work():
        before, seen = {r: len(eng.output(s).token_ids) for r, s in seqs.items()}, len(victims)
        eng.step()
        for r in victims[seen:]:
            assert len(eng.output(seqs[r]).token_ids) == before[r], f"{r} was preempted, yet fed"
    assert len(victims) >= 2
    assert [eng.output(s).token_ids for s in seqs.values()] == [oracle(p, 24) for p in ps]
    assert_all_blocks_free(eng)


def test_a_sequence_that_needs_a_block_and_is_the_youngest_preempts_itself(tiny, oracle):
    """Two 24-token prompts in a five-block cache need their third block in the same step: the
    older takes the last free one; the younger, needing one and the youngest running sequence, is
    the victim (not the older, just given its block). It yields its blocks, gains no token in that
    step, and resumes once the older finishes: one preemption, and both get the model's tokens."""
    ps = [tokens(24, 100), tokens(24, 101)]
    eng = engine(tiny, 5, prefix_caching=False)
    victims = record_preemptions(eng)
    older, younger = [eng.add_request(p, greedy(12)) for p in ps]
    while not victims:
        before = [len(eng.output(s).token_ids) for s in (older, younger)]
        eng.step()
    assert victims == [younger.request_id]
    assert [len(eng.output(s).token_ids) for s in (older, younger)] == [before[0] + 1, before[1]]
    while eng.has_work():
        eng.step()
    assert victims == [younger.request_id]
    assert [eng.output(s).token_ids for s in (older, younger)] == [oracle(p, 12) for p in ps]
    assert_all_blocks_free(eng)


def test_a_preempted_sequence_goes_back_to_the_front_of_the_queue(tiny, oracle):
    """Four 24-token prompts in a five-block cache: two run, two wait. The first victim re-enters
    the waiting queue ahead of the requests that never ran, and is admitted again before them."""
    ps = [tokens(24, 70 + i) for i in range(4)]
    eng = engine(tiny, 5, prefix_caching=False)
    victims = record_preemptions(eng)
    seqs = [eng.add_request(p, greedy(12)) for p in ps]
    ran = set()
    while not victims:
        eng.step()
        ran |= {s.request_id for s in eng.scheduler.running}
    queue = [s.request_id for s in eng.scheduler.waiting]
    assert queue[0] == victims[0], queue
    assert len(queue) > 1 and ran.isdisjoint(queue[1:])  # behind it: requests that never ran
    admitted = []
    while eng.has_work():
        before = {s.request_id for s in eng.scheduler.running}
        eng.step()
        admitted += [s.request_id for s in eng.scheduler.running if s.request_id not in before]
    assert admitted[0] == victims[0], admitted
    assert [eng.output(s).token_ids for s in seqs] == [oracle(p, 12) for p in ps]
    assert_all_blocks_free(eng)


def test_a_sequence_outgrowing_the_whole_cache_stops_with_length(tiny, oracle):
    """A 20-token prompt in a two-block cache, max_tokens far beyond: it stops when its next token
    would need a third block (33 tokens in all), with the model's tokens and finish reason length."""
    p = tokens(20, 105)
    eng = engine(tiny, 2)
    out = run(eng, [p], greedy(100))[0]
    assert out.token_ids == oracle(p, 2 * BS + 1 - len(p)) and out.finish_reason == "length"
    assert eng.scheduler.num_preemptions == 0
    assert_all_blocks_free(eng)


def test_cached_tokens_count_only_what_the_first_admission_found_of_the_prompt(tiny, oracle):
    """Four distinct 24-token prompts in a five-block cache with prefix caching: preempted
    sequences come back reviving their own freed blocks (prompt and generated tokens), yet what a
    request reports as cached is what its first admission found of its prompt: here nothing."""
    ps = [tokens(24, 70 + i) for i in range(4)]
    eng = engine(tiny, 5)
    outs = run(eng, ps, greedy(12))
    assert eng.scheduler.num_preemptions > 0
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0, 0]
    assert [o.token_ids for o in outs] == [oracle(p, 12) for p in ps]
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("lengths, blocks, n", [([20, 28, 24, 30], 5, 16), ([28, 28, 28, 28], 6, 24)],
                         ids=["uneven", "even"])
def test_repeated_preemption_recomputes_to_the_models_tokens(tiny, oracle, lengths, blocks, n, prefix_caching):
    """Four requests needing 3 or 4 blocks each share 5 or 6: sequences are preempted again and
    again (with the prefix cache, their recompute mostly revives their own freed blocks)."""
    ps = [tokens(k, 70 + i) for i, k in enumerate(lengths)]
    eng = engine(tiny, blocks, prefix_caching=prefix_caching)
    outs = run(eng, ps, greedy(n))
    assert eng.scheduler.num_preemptions >= 2
    assert [o.token_ids for o in outs] == [oracle(p, n) for p in ps]
    assert all(o.finish_reason == "length" for o in outs)
    assert_all_blocks_free(eng)


# ---- limits: the batch budget, the context length, the end-of-sentence token ----

def test_no_step_feeds_more_tokens_than_the_batch_budget(tiny, oracle):
    """Two short requests are decoding when a 40-token prompt arrives, under a budget of 16 tokens
    a step: every plan's decodes plus prefill chunk tokens stay within it (the prompt is prefilled
    in chunks beside the decodes), and every request gets the model's tokens."""
    short, long = [tokens(5, 120), tokens(5, 121)], tokens(40, 122)
    eng = engine(tiny, 16, max_num_batched_tokens=16)
    plans = record_plans(eng)
    seqs = [eng.add_request(p, greedy(12)) for p in short]
    eng.step()
    seqs.append(eng.add_request(long, greedy(4)))
    while eng.has_work():
        eng.step()
    fed = [(len(plan.decodes), sum(b - a for _, a, b in plan.prefills)) for plan in plans]
    assert all(d + c <= 16 for d, c in fed), fed
    assert any(d and c for d, c in fed), fed  # decodes beside a prefill chunk
    assert [eng.output(s).token_ids for s in seqs] == [oracle(short[0], 12), oracle(short[1], 12), oracle(long, 4)]


def test_a_sequence_stops_at_max_model_len_tokens(tiny, oracle):
    """max_model_len 40 and a 37-token prompt, max_tokens far beyond: exactly 3 tokens (the
    model's) come out, finish reason length, 40 tokens in all."""
    p = tokens(37, 130)
    out = run(engine(tiny, 16, max_model_len=40), [p], greedy(100))[0]
    assert out.token_ids == oracle(p, 3) and out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 40


def test_ignore_eos_generates_past_the_end_of_sentence_token(tiny, oracle):
    """The model (the same weights) with its end-of-sentence id set to its first greedy token for
    p: with ignore_eos it generates all max_tokens of the model's tokens; without, it stops there,
    after one token, with finish reason stop."""
    p = tokens(20, 140)
    want = oracle(p, 5)
    model = copy.copy(tiny)
    model.cfg = tiny.cfg.replace(eos_token_id=want[0])
    eng = engine(model, 16)
    kept = run(eng, [p], greedy(5))[0]
    assert kept.token_ids == want and kept.finish_reason == "length"
    stopped = run(eng, [p], SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert stopped.token_ids == want[:1] and stopped.finish_reason == "stop"


# ---- random schedules against a tiny cache ----

_STEM, _T1, _T2 = tokens(40, 81), tokens(16, 82), tokens(24, 83)
POOL = [  # prefixes shared at and off block boundaries, whole-block prompts, a moved block
    _STEM[:16] + _T1[:5], _STEM[:16] + _T2[:5], _STEM[:32], _STEM[:32] + _T1[:1], _STEM[:20] + _T2[:10],
    _STEM, _STEM[:16], _T1 + _STEM[16:32], _STEM[16:32] + _T2[:4], _T1 + _STEM[:16] + _T2[:3], _T2, _STEM[:1],
]
MAX_TOKENS = 20  # the longest request, 40 + 20 tokens, fits the smallest cache (4 blocks) alone

# a request: (prompt in POOL, max_tokens, step it arrives at, steps after arriving it is aborted at)
request = st.tuples(st.integers(0, len(POOL) - 1), st.integers(1, MAX_TOKENS), st.integers(0, 30),
                    st.one_of(st.none(), st.none(), st.none(), st.integers(0, 12)))


def check_block_accounting(eng: Engine) -> None:
    """Each block's refcount is the number of running sequences holding it; free = refcount 0."""
    bm, running = eng.scheduler.blocks, eng.scheduler.running
    held = Counter(b for s in running for b in s.block_table)
    assert bm.ref == [held[b] for b in range(len(bm.ref))]
    assert bm.num_free == bm.ref.count(0)


@settings(max_examples=20, deadline=None)
@given(requests=st.lists(request, min_size=1, max_size=8), num_blocks=st.sampled_from([4, 5, 6]),
       prefix_caching=st.booleans(), prefill_chunk=st.sampled_from([8, 24, 512]))
def test_random_schedules_free_every_block_and_finish_with_the_models_tokens(
        tiny, oracle, requests, num_blocks, prefix_caching, prefill_chunk):
    """Requests arrive at random steps, some are aborted (waiting, mid-prefill, decoding or
    preempted), the cache forces preemption: block refcounts always match the running sequences'
    tables; at the end every block is free, every request's tokens are the model's (aborted ones
    up to where they stopped), and what it reports cached is whole blocks of its prompt."""
    eng = engine(tiny, num_blocks, prefix_caching=prefix_caching, prefill_chunk=prefill_chunk, max_num_seqs=4)
    seqs = {}
    last_event = max(arrive + (abort or 0) for _, _, arrive, abort in requests)
    for t in range(10_000):
        for i, (k, n, arrive, abort) in enumerate(requests):
            if t == arrive:
                seqs[i] = eng.add_request(POOL[k], greedy(n))
            if abort is not None and t == arrive + abort:
                eng.abort(seqs[i].request_id)
                check_block_accounting(eng)
        if t > last_event and not eng.has_work():
            break
        if eng.has_work():
            eng.step()
            check_block_accounting(eng)
    assert not eng.has_work()
    assert_all_blocks_free(eng)
    for i, (k, n, _, abort) in enumerate(requests):
        out = eng.output(seqs[i])
        assert out.error is None
        assert out.token_ids == oracle(POOL[k], len(out.token_ids))
        assert out.num_cached_tokens % BS == 0 and out.num_cached_tokens < len(POOL[k])
        assert out.finish_reason == "length" and len(out.token_ids) == n or \
            out.finish_reason == "abort" and abort is not None
