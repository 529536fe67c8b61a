"""Paths split into tests, docs and source by pytest's discovery rules and the usual layouts; a
commit's change splits the same way."""

import pytest

from dsv32.synth.git_history import is_doc_path, is_test_module, is_test_path, read_commit


@pytest.mark.parametrize("path, test", [
    ("tests/test_calc.py", True), ("tests/fixtures/data.json", True), ("pkg/testing/util.py", True),
    ("test_top.py", True), ("pkg/calc_test.py", True), ("conftest.py", True), ("pkg/sub/conftest.py", True),
    ("calc.py", False), ("pkg/attest.py", False), ("pkg/contest_rules.py", False), ("tests.md", False),
])
def test_a_path_is_a_test_path_by_its_directories_or_its_name(path, test):
    assert is_test_path(path) is test


def test_only_test_modules_are_collectable():
    assert [is_test_module(p) for p in ("tests/test_a.py", "tests/conftest.py", "tests/helpers.py")] == [
        True, False, False]


@pytest.mark.parametrize("path, doc", [("README.md", True), ("docs/conf.py", True), ("LICENSE", True),
                                       ("calc.py", False), ("pkg/docstrings.py", False)])
def test_docs_are_docs(path, doc):
    assert is_doc_path(path) is doc


def test_a_commit_splits_into_its_test_and_source_parts(calc_repo):
    repo, shas = calc_repo
    fix, docs = read_commit(repo, shas[1]), read_commit(repo, shas[2])
    assert (fix.parent, fix.test_paths, fix.source_paths, fix.doc_paths) == (
        shas[0], ("tests/test_calc.py",), ("calc.py",), ())
    assert (docs.test_paths, docs.source_paths, docs.doc_paths) == ((), (), ("README.md",))
    assert read_commit(repo, shas[0]).parent is None
