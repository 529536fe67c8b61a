"""verify() pays 1 exactly for a source patch under which the F2P tests pass and the P2P tests
still pass, run from the environment directory alone."""

import difflib
import shutil

import pytest

from dsv32.synth.code_reward import transitions, verify

from calc_history import CALC_V0


@pytest.fixture(scope="module")
def env(mined, calc_repo, tmp_path_factory):
    """The bug fix's task directory, copied away from the miner's output (a clean checkout)."""
    out, rows = mined
    task = next(r["task"] for r in rows if r["commit"] == calc_repo[1][1])
    dest = tmp_path_factory.mktemp("clean") / "env"
    shutil.copytree(out / task["env"], dest)
    return dest


def source_patch(*edits: tuple[str, str]) -> str:
    """A unified diff of calc.py at the task's snapshot with each (old, new) of `edits` made."""
    after = CALC_V0
    for old, new in edits:
        after = after.replace(old, new)
    return "".join(difflib.unified_diff(CALC_V0.splitlines(True), after.splitlines(True), "a/calc.py", "b/calc.py"))


def test_the_gold_patch_earns_the_reward(env, run_options):
    v = verify(env, (env / "gold.patch").read_text(), run_options)
    assert (v.reward, v.reason) == (1.0, "solved")


def test_the_empty_patch_earns_nothing_and_names_the_failing_test(env, run_options):
    v = verify(env, "", run_options)
    assert (v.reward, v.reason, v.f2p_failed) == (0.0, "f2p-failed", ["tests.test_calc::test_add"])


def test_a_different_correct_fix_earns_the_reward(env, run_options):
    assert verify(env, source_patch(("a - b", "b + a")), run_options).reward == 1.0


def test_a_wrong_fix_earns_nothing(env, run_options):
    v = verify(env, source_patch(("a - b", "a + b + 1")), run_options)
    assert (v.reward, v.reason) == (0.0, "f2p-failed")


def test_a_fix_that_breaks_a_passing_test_earns_nothing(env, run_options):
    v = verify(env, source_patch(("a - b", "a + b"), ("a * b", "a + b")), run_options)
    assert (v.reward, v.reason, v.p2p_broken) == (0.0, "p2p-broken", ["tests.test_calc::test_mul"])


def test_deleting_the_test_file_is_rejected_before_anything_runs(env, run_options):
    patch = ("diff --git a/tests/test_calc.py b/tests/test_calc.py\ndeleted file mode 100644\n"
             "--- a/tests/test_calc.py\n+++ /dev/null\n@@ -1,5 +0,0 @@\n-from calc import add, mul\n-\n-\n"
             "-def test_mul():\n-    assert mul(2, 3) == 6\n")
    v = verify(env, patch, run_options)
    assert (v.reward, v.reason) == (0.0, "touches-tests") and "tests/test_calc.py" in v.detail


def test_rewriting_a_test_to_assert_true_is_rejected(env, run_options):
    patch = ("diff --git a/tests/test_calc.py b/tests/test_calc.py\n--- a/tests/test_calc.py\n+++ b/tests/test_calc.py\n"
             "@@ -4,2 +4,2 @@\n def test_mul():\n-    assert mul(2, 3) == 6\n+    assert True\n")
    assert verify(env, patch, run_options).reason == "touches-tests"


def test_a_new_conftest_that_could_skip_tests_is_rejected(env, run_options):
    patch = ("diff --git a/conftest.py b/conftest.py\nnew file mode 100644\n--- /dev/null\n+++ b/conftest.py\n"
             "@@ -0,0 +1 @@\n+collect_ignore = ['tests']\n")
    assert verify(env, patch, run_options).reason == "touches-tests"


def test_a_patch_that_does_not_apply_earns_nothing(env, run_options):
    patch = source_patch(("a - b", "a + b")).replace(" def mul", " def product")
    v = verify(env, patch, run_options)
    assert (v.reward, v.reason) == (0.0, "patch-failed")


def test_text_that_is_not_a_patch_earns_nothing(env, run_options):
    v = verify(env, "just make add add\n", run_options)
    assert (v.reward, v.reason) == (0.0, "bad-patch")


def test_transitions_count_an_absent_or_skipped_test_as_not_passing():
    before = {"a": "passed", "b": "failed", "c": "passed", "e": "skipped"}
    after = {"a": "passed", "b": "passed", "d": "passed", "e": "passed"}  # c vanished
    t = transitions(before, after)
    assert (t.f2p, t.p2f, t.p2p) == (["b", "d", "e"], ["c"], ["a"])
