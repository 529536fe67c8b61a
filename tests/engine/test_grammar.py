"""Grammar-constrained sampling: the packed-bitmask path against a plain-torch twin, and the engine
with a grammar on a tiny random model (every completion in the grammar, ended by it, its RL kept
sets exactly what the grammar allowed)."""

import dataclasses
import json
import re
import textwrap

import pytest
import torch

from dsv32.config import preset
from dsv32.engine import Engine, EngineConfig, SamplingParams
from dsv32.engine.grammar import (
    Grammar, GrammarError, GrammarVocab, fill_masks, mask_executor, mask_width, unpack_mask,
)
from dsv32.engine.runner import ModelRunner
from dsv32.engine.sampler import apply_grammar, sample
from dsv32.model import Transformer
from dsv32.rl.objective import kept_sets, token_logprobs
from dsv32.tokenizer import train_tokenizer

llguidance = pytest.importorskip("llguidance")
pytestmark = pytest.mark.usefixtures("one_thread")


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """allowed [B, V] bool -> [B, ceil(V / 32)] int32, written bit by bit in plain Python (the oracle)."""
    b, v = allowed.shape
    words = [[0] * mask_width(v) for _ in range(b)]
    for r in range(b):
        for t in range(v):
            if allowed[r, t]:
                words[r][t // 32] |= 1 << (t % 32)
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


def test_unpacking_reads_bit_t_mod_32_of_word_t_div_32():
    g = torch.Generator().manual_seed(1)
    for v in (1, 31, 32, 33, 100, 515):
        allowed = torch.rand(4, v, generator=g) < 0.3
        allowed[:, -1] = True  # the top bit of a full last word (the int32 sign bit)
        assert torch.equal(unpack_mask(pack(allowed), v), allowed)


def test_the_bitmask_path_equals_masking_logits_to_minus_inf_in_plain_torch():
    g = torch.Generator().manual_seed(2)
    v = 77
    logits = torch.randn(5, v, generator=g)
    allowed = torch.rand(5, v, generator=g) < 0.2
    allowed[:, 0] = True
    allowed[3] = True                                       # a row without a grammar: all ones
    reference = torch.where(allowed, logits, torch.full_like(logits, float("-inf")))
    masked, got = apply_grammar(logits, pack(allowed))
    assert torch.equal(masked, reference) and torch.equal(got, allowed)
    assert torch.equal(masked[3], logits[3])                # untouched
    assert apply_grammar(logits, None) == (logits, None)
    # sampled tokens are always allowed, greedy picks the best allowed, log-probs are renormalised
    params = [SamplingParams(temperature=t, return_rl_data=True) for t in (1.0, 0.0, 0.7, 1.0, 1.0)]
    for _ in range(20):
        out = sample(logits, params, [None] * 5, pack(allowed))
        assert all(allowed[r, s.token] for r, s in enumerate(out))
    assert out[1].token == int(reference[1].argmax())
    assert out[1].logprob == pytest.approx(float(reference[1].log_softmax(-1).max()), abs=1e-5)
    assert out[0].kept.tolist() == allowed[0].nonzero().flatten().tolist()


def test_a_row_whose_grammar_allows_nothing_is_left_unmasked_for_the_scheduler_to_fail():
    logits = torch.randn(2, 40)
    allowed = torch.zeros(2, 40, dtype=torch.bool)
    allowed[1, 5] = True
    masked, _ = apply_grammar(logits, pack(allowed))
    assert torch.equal(masked[0], logits[0]) and masked[1].isfinite().sum() == 1


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    tok = train_tokenizer([json.decoder.__file__, textwrap.__file__], 512, tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                                 index_topk=8)
    vocab = GrammarVocab(tok.tok.to_str(), [tok.eos_id], cfg.vocab_size)
    return tok, Transformer(cfg).eval(), vocab


def test_a_bad_grammar_is_an_error_at_compile_time(tok_model):
    _, _, vocab = tok_model
    with pytest.raises(GrammarError, match="does not compile"):
        Grammar.compile("start: undefined_rule", vocab)


def test_every_sampled_completion_follows_the_grammar_and_ends_with_it(tok_model):
    tok, model, vocab = tok_model
    grammar = Grammar.compile('start: "yes" | "no" | "maybe " /[0-9]{1,3}/', vocab)
    engine = Engine(model, EngineConfig(max_num_seqs=8, block_size=16))
    params = SamplingParams(temperature=1.0, max_tokens=40, grammar=grammar, return_rl_data=True)
    free = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, return_rl_data=True)  # unconstrained
    seqs = [engine.add_request(tok.encode("Answer:"), params) for _ in range(12)]
    other = engine.add_request(tok.encode("Answer:"), free)
    while engine.has_work():
        engine.step()
    texts = set()
    for s in seqs:
        out = engine.output(s)
        assert out.finish_reason == "stop"      # by the end token, or by a grammar that can take no more
        ids = out.token_ids[:-1] if out.token_ids[-1] == tok.eos_id else out.token_ids
        text = tok.decode(ids)
        assert re.fullmatch(r"yes|no|maybe [0-9]{1,3}", text), text
        texts.add(text)
        # the kept set of each token is what a fresh matcher, fed the tokens before it, allows
        m = grammar.matcher()
        for t, kept in zip(out.token_ids, out.kept):
            row = torch.zeros(mask_width(vocab.vocab_size), dtype=torch.int32)
            m.fill(row)
            allowed = unpack_mask(row[None], vocab.vocab_size)[0].nonzero().flatten().tolist()
            assert kept.tolist() == allowed and t in allowed
            m.advance(t)
    assert len(texts) > 1                                           # sampled, not forced
    assert engine.output(other).finish_reason == "length" and engine.output(other).kept == [None] * 6


def test_a_grammar_for_another_vocabulary_is_refused(tok_model):
    tok, model, _ = tok_model
    vocab = GrammarVocab(tok.tok.to_str(), [tok.eos_id], model.cfg.vocab_size + 64)
    grammar = Grammar.compile('start: "a"', vocab)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, EngineConfig(block_size=16)).add_request([5, 6], SamplingParams(grammar=grammar))


class OneBadToken(ModelRunner):
    """The real runner, except that the first sequence's first token is forced to `bad` (a model
    bug, or a mask that did not hold): the grammar refuses it."""

    bad = 0

    def sample(self, logits, seqs, masks=None):
        out = super().sample(logits, seqs, masks)
        return [dataclasses.replace(s, token=self.bad) if seq.request_id == "first" and not seq.output_tokens else s
                for seq, s in zip(seqs, out)]


def test_a_token_the_grammar_refuses_fails_that_sequence_alone(tok_model):
    tok, model, vocab = tok_model
    grammar = Grammar.compile('start: "yes" | "no"', vocab)
    OneBadToken.bad = tok.encode("maybe")[0]
    engine = Engine(model, EngineConfig(max_num_seqs=4, block_size=16), runner_class=OneBadToken)
    params = SamplingParams(temperature=1.0, max_tokens=8, grammar=grammar)
    first = engine.add_request(tok.encode("Answer:"), params, request_id="first")
    others = [engine.add_request(tok.encode("Answer:"), params) for _ in range(3)]
    while engine.has_work():
        engine.step()
    assert first.finish_reason == "error" and "not allowed by the request's grammar" in first.error
    for s in others:
        assert s.finish_reason == "stop" and tok.decode(s.output_tokens).removesuffix("<｜end▁of▁sentence｜>") in ("yes", "no")


def test_parallel_and_one_by_one_mask_filling_agree(tok_model):
    tok, _, vocab = tok_model
    grammar = Grammar.compile('start: "yes" | "no" | "maybe " /[0-9]{1,3}/', vocab)
    matchers = [grammar.matcher(), None, grammar.matcher(), grammar.matcher()]
    matchers[2].advance(tok.encode("maybe")[0])
    serial = fill_masks(matchers, vocab.vocab_size)
    assert torch.equal(fill_masks(matchers, vocab.vocab_size, mask_executor()), serial)
    assert (serial[1] == -1).all() and not torch.equal(serial[0], serial[2])
    assert fill_masks([None, None], vocab.vocab_size) is None


@pytest.mark.gpu
def test_the_bitmask_path_on_cuda_equals_the_cpu_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 4099, generator=g)
    allowed = torch.rand(32, 4099, generator=g) < 0.01
    allowed[:, 7] = True
    masked, got = apply_grammar(logits.cuda(), pack(allowed))
    assert torch.equal(got.cpu(), allowed)
    assert torch.equal(masked.cpu(), torch.where(allowed, logits, torch.full_like(logits, float("-inf"))))


def test_replaying_a_constrained_rollout_with_its_kept_sets_gives_the_sampled_log_probs(tok_model):
    """What RL computes from the rollout (rl.objective.token_logprobs with Keep Sampling Mask over
    the recorded kept sets) is the sampler's log-prob; without the grammar's mask it is not."""
    tok, model, vocab = tok_model
    grammar = Grammar.compile('start: "maybe " /[0-9]{1,3}/ | "no"', vocab)
    engine = Engine(model, EngineConfig(max_num_seqs=4, block_size=16))
    prompt = tok.encode("Answer:")
    params = SamplingParams(temperature=0.8, max_tokens=20, grammar=grammar, return_rl_data=True)
    seqs = [engine.add_request(prompt, params) for _ in range(4)]
    while engine.has_work():
        engine.step()
    for s in seqs:
        out = engine.output(s)
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = model(ids, sparse=True).logits[0, len(prompt) - 1:-1]                    # [n, V]
        targets = torch.tensor(out.token_ids)
        replay = token_logprobs(logits, targets, 0.8, kept_sets(out.kept))
        assert torch.allclose(replay, torch.tensor(out.logprobs), atol=1e-4)
        unmasked = token_logprobs(logits, targets, 0.8)
        assert (unmasked < replay - 0.1).all()                 # the mask moved the probability mass
