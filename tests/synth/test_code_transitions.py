"""The plain before-run and the repeated after-run: a test that the test patch hides before the
fix is judged by its status at the parent, and a fail-to-pass test that flips between the
after-runs rejects the commit as flaky."""

from dataclasses import replace

from tiny_repos import counted_history, flaky_history, hidden_test_history, make_history

from dsv32.synth.code_miner import MineOptions, before_status, mine, task_kind, unstable


def decide_fix(tmp_path, history, options):
    repo = tmp_path / "repo"
    shas = make_history(repo, history)
    rows = mine(repo, tmp_path / "out", options=options)
    return next(r for r in rows if r["commit"] == shas[-1])


def test_a_test_that_passed_at_the_parent_and_fails_after_the_fix_is_p2f_even_when_the_test_patch_hid_it(
        run_options, tmp_path):
    row = decide_fix(tmp_path, hidden_test_history(break_mul=True), MineOptions(run=run_options))
    assert row["reason"] == "p2f>0"
    assert row["p2f"] == ["tests.test_calc::test_mul"]      # mul(2, 3) is 7 after the "fix"
    assert row["f2p"] == ["tests.test_calc::test_div"]


def test_a_hidden_test_that_keeps_passing_is_p2p_not_f2p(run_options, tmp_path):
    row = decide_fix(tmp_path, hidden_test_history(break_mul=False), MineOptions(run=run_options))
    assert row["reason"] == "accepted"
    assert row["f2p"] == ["tests.test_calc::test_div"]      # test_mul passed at the parent: not fail-to-pass
    assert row["task"]["p2p"] == ["tests.test_calc::test_mul"]


def test_a_fail_to_pass_test_that_flips_between_the_after_runs_rejects_the_commit_as_flaky(run_options, tmp_path):
    # the test keeps state in a file outside the checkout, which only an unsandboxed run can write
    # (our own repository: trusted)
    options = MineOptions(run=replace(run_options, unsafe_no_sandbox=True))
    row = decide_fix(tmp_path, flaky_history(tmp_path / "mark"), options)
    assert row["reason"] == "flaky" and row["flaky"] == ["tests.test_add::test_add"]
    assert (tmp_path / "mark").exists()                      # the first after-run passed and left it


def test_with_one_after_run_the_same_flaky_test_is_accepted(run_options, tmp_path):
    # the control: what the repeat is there to catch
    options = MineOptions(run=replace(run_options, unsafe_no_sandbox=True), repeat=1)
    row = decide_fix(tmp_path, flaky_history(tmp_path / "mark"), options)
    assert row["reason"] == "accepted" and row["f2p"] == ["tests.test_add::test_add"]


def test_a_passing_test_that_fails_in_the_second_after_run_is_left_out_of_p2p(run_options, tmp_path):
    # runs in order: plain, before, after 1 pass (the counter reads 0, 1, 2); after 2 fails (3)
    options = MineOptions(run=replace(run_options, unsafe_no_sandbox=True))
    row = decide_fix(tmp_path, counted_history(tmp_path / "counter"), options)
    assert row["reason"] == "accepted" and row["f2p"] == ["tests.test_add::test_add"]
    assert row["flaky"] == ["tests.test_counted::test_counted"]
    assert row["task"]["p2p"] == ["tests.test_base::test_ok"]             # test_counted left out
    assert (tmp_path / "counter").read_text() == "4"                       # four runs, as counted above


def test_before_status_fills_in_only_tests_absent_before_and_present_after():
    plain = {"a": "passed", "b": "passed", "c": "passed"}
    before = {"a": "failed"}                  # a was changed by the test patch; b and c were hidden
    after = {"a": "passed", "b": "failed"}    # c is gone: the test patch deleted it
    assert before_status(plain, before, after) == {"a": "failed", "b": "passed"}


def test_unstable_counts_a_test_missing_from_one_run_as_a_change():
    assert unstable([{"a": "passed", "b": "failed"}, {"a": "passed"}]) == {"b"}
    assert unstable([{"a": "passed"}, {"a": "failed"}, {"a": "passed"}]) == {"a"}
    assert unstable([{"a": "skipped"}, {"a": "skipped"}]) == set()


def test_a_commit_that_adds_a_module_with_its_tests_is_a_new_module_task_and_a_fix_is_a_fix(run_options, tmp_path):
    base = {"calc.py": "def add(a, b):\n    return a - b\n", "tests/test_base.py": "def test_ok():\n    pass\n"}
    new_module = [("Start", base),
                  ("Add mul", {"mul.py": "def mul(a, b):\n    return a * b\n",
                               "tests/test_mul.py": "from mul import mul\n\n\ndef test_mul():\n    assert mul(2, 3) == 6\n"})]
    row = decide_fix(tmp_path / "a", new_module, MineOptions(run=run_options))
    assert row["reason"] == "accepted" and row["kind"] == "new-module" and row["task"]["kind"] == "new-module"
    fix = [("Start", base),
           ("Fix add", {"calc.py": "def add(a, b):\n    return a + b\n",
                        "tests/test_add.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"})]
    row = decide_fix(tmp_path / "b", fix, MineOptions(run=run_options))
    assert row["reason"] == "accepted" and row["kind"] == "fix"   # a new test, but for code that existed


def test_a_commit_message_shorter_than_the_minimum_is_rejected_before_anything_runs(run_options, tmp_path):
    history = [("Start", {"calc.py": "x = 1\n", "tests/test_base.py": "def test_ok():\n    pass\n"}),
               ("Fix add", {"calc.py": "x = 2\n", "tests/test_x.py": "def test_x():\n    pass\n"})]
    row = decide_fix(tmp_path, history, MineOptions(run=run_options, min_issue_words=3))
    assert row["reason"] == "issue-too-short" and "2 words" in row["detail"]


def test_the_task_kind_follows_where_the_fail_to_pass_tests_live():
    assert task_kind(["tests.test_mul::test_mul"], ["mul.py"], ["tests/test_mul.py"]) == "new-module"
    assert task_kind(["tests.test_calc::test_mul"], ["mul.py"], ["tests/test_mul.py"]) == "fix"   # an old module's test
    assert task_kind(["tests.test_mul::test_mul"], [], ["tests/test_mul.py"]) == "fix"             # no new source
