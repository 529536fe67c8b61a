"""bench/kernels.py --merge: a run of some ops replaces only their tables in an earlier result file,
and the report names the run of every table."""

from bench.kernels import markdown, merged

OLD = {"gpu": "G", "torch": "t", "triton": "tr", "date": "2026-11-23", "quick": False,
       "ops": {"indexer": [{"kernel": "indexer_decode", "impl": "ours", "us": 20.0}],
               "topk": [{"kernel": "topk", "impl": "ours", "us": 41.1}],
               "fp8_gemm": [{"kernel": "fp8_gemm", "impl": "ours", "us": 9.0}]},
       "runs": {"indexer": "2026-11-23", "topk": "2026-11-23 (bracket)", "fp8_gemm": "2026-11-23"}}


def test_a_merged_run_replaces_only_the_ops_it_measured_and_records_their_run():
    new = {**OLD, "date": "2026-12-07", "ops": {"topk": [{"kernel": "topk", "impl": "ours", "us": 24.9}]}}
    res = merged(new, OLD, ["topk"], "2026-12-07 (narrowing)")
    assert res["ops"]["topk"][0]["us"] == 24.9
    assert res["ops"]["indexer"] == OLD["ops"]["indexer"] and res["ops"]["fp8_gemm"] == OLD["ops"]["fp8_gemm"]
    assert res["runs"] == {"indexer": "2026-11-23", "fp8_gemm": "2026-11-23", "topk": "2026-12-07 (narrowing)"}
    text = markdown(res)
    assert "topk 2026-12-07 (narrowing)" in text and "indexer 2026-11-23" in text
    assert "| topk |  | ours | 24.9 |" in text and "41.1" not in text


def test_without_an_earlier_file_only_this_runs_tables_and_no_runs_line():
    new = {**OLD, "ops": {"topk": OLD["ops"]["topk"]}}
    res = merged(new, None, ["topk"], "2026-11-23")
    assert list(res["ops"]) == ["topk"] and res["runs"] == {"topk": "2026-11-23"}
    assert "separate runs" not in markdown(res)


def test_an_old_file_without_run_dates_takes_its_own_date_for_each_table():
    old = {k: v for k, v in OLD.items() if k != "runs"}
    res = merged({**OLD, "date": "2026-12-07", "ops": {}}, old, [], "2026-12-07")
    assert res["runs"] == {"indexer": "2026-11-23", "topk": "2026-11-23", "fp8_gemm": "2026-11-23"}
