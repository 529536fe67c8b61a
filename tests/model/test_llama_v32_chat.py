"""A Llama-family model given V3.2's chat format (dsv32/llama/v32_chat.py): the vocabulary grows by
V3.2's special tokens and nothing the model computed before changes."""

import pytest
import torch

from dsv32.chat import BOS, EOS, SPECIAL_TOKENS, THINK_END, encode_messages
from dsv32.llama.model import LlamaConfig, LlamaDSA
from dsv32.llama.v32_chat import with_v32_chat
from dsv32.loader import load, save
from dsv32.preflight import has_thinking_mode
from dsv32.tokenizer import Tokenizer
from tests.tiny_tokenizers import chatml_bpe

VOCAB = 400
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256,
            index_n_heads=4, index_head_dim=32, index_topk=256, bos_token_id=0, eos_token_id=2)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaDSA(LlamaConfig(**TINY)).eval(), chatml_bpe(VOCAB)


def test_the_seven_v32_tokens_are_appended_as_single_ids_after_the_old_vocabulary(base):
    model, hf = base
    grown, tok = with_v32_chat(model, hf)
    assert isinstance(tok, Tokenizer) and tok.chat_format == "v32"
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(VOCAB, VOCAB + len(SPECIAL_TOKENS)))
    assert grown.cfg.vocab_size == tok.vocab_size == VOCAB + len(SPECIAL_TOKENS)
    assert (grown.cfg.bos_token_id, grown.cfg.eos_token_id) == (tok.special_ids[BOS], tok.special_ids[EOS])
    # a V3.2 prompt's markup is one id per special token, and the text around it is the old BPE's
    ids = tok.apply_chat_template([{"role": "user", "content": "def f(x): return x"}], "thinking")
    assert ids[0] == tok.bos_id and tok.special_ids[THINK_END] not in ids
    assert tok.decode(ids) == encode_messages([{"role": "user", "content": "def f(x): return x"}], "thinking")
    assert hf.get_vocab_size() == VOCAB  # the caller's tokenizer is untouched


def test_an_untied_head_grows_its_own_rows_at_the_mean_of_its_old_rows(base):
    _, hf = base
    torch.manual_seed(1)
    model = LlamaDSA(LlamaConfig(**TINY, tie_word_embeddings=False)).eval()
    grown, _ = with_v32_chat(model, hf)
    assert grown.lm_head.weight is not grown.embed_tokens.weight
    for name in ("embed_tokens", "lm_head"):
        old, new = getattr(model, name).weight, getattr(grown, name).weight
        assert torch.equal(new[:VOCAB], old)
        assert torch.allclose(new[VOCAB:], old.mean(0).expand(len(SPECIAL_TOKENS), -1))
    x = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(grown(x).logits[..., :VOCAB], model(x).logits)


def test_old_token_logits_are_unchanged_and_new_rows_start_at_the_mean_embedding(base):
    model, hf = base
    grown, _ = with_v32_chat(model, hf)
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        old, new = model(x).logits, grown(x).logits
    assert new.shape[-1] == VOCAB + len(SPECIAL_TOKENS)
    assert torch.equal(new[..., :VOCAB], old)
    mean = model.embed_tokens.weight.mean(0)
    assert torch.allclose(grown.embed_tokens.weight[VOCAB:], mean.expand(len(SPECIAL_TOKENS), -1))
    assert grown.lm_head.weight is grown.embed_tokens.weight  # still tied
    # a tied head gives each new token the logit of the mean embedding
    with torch.no_grad():
        h = grown.norm(grown.embed_tokens(x))  # any hidden state: logit = h . row
    assert torch.allclose(h @ grown.lm_head.weight[VOCAB:].T, (h @ mean).unsqueeze(-1).expand(2, 40, 7), atol=1e-5)


def test_saved_model_loads_back_with_the_v32_tokenizer_and_a_thinking_mode(base, tmp_path):
    model, hf = base
    grown, tok = with_v32_chat(model, hf)
    save(grown, tmp_path / "m", tokenizer=tok)
    again, tok2 = load(tmp_path / "m", dtype=torch.float32, device="cpu")
    assert isinstance(tok2, Tokenizer) and tok2.special_ids == tok.special_ids
    x = torch.randint(0, grown.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(x).logits, grown(x).logits)
    assert has_thinking_mode(str(tmp_path / "m"))
    save(model, tmp_path / "plain", tokenizer=hf)  # the same family without V3.2's tokens: ChatML, no thinking
    assert not has_thinking_mode(str(tmp_path / "plain"))
    assert load(tmp_path / "plain", dtype=torch.float32, device="cpu")[1].chat_format == "chatml"


def test_a_vocabulary_that_has_the_tokens_or_does_not_match_the_model_is_refused(base):
    model, hf = base
    grown, tok = with_v32_chat(model, hf)
    with pytest.raises(ValueError, match="already has"):
        with_v32_chat(grown, tok.tok)
    with pytest.raises(ValueError, match="400 tokens but the model's vocabulary is 407"):
        with_v32_chat(grown, hf)
