"""patch_paths lists every path git would write for a patch (both names of a rename), and
apply_patch applies a patch to a plain directory or refuses it naming the patch."""

import pytest

from dsv32.synth.patch import PatchError, apply_patch, patch_paths

RENAME = """diff --git a/src/old.py b/src/new.py
similarity index 100%
rename from src/old.py
rename to src/new.py
"""
DELETE_AND_EDIT = """diff --git a/tests/test_x.py b/tests/test_x.py
deleted file mode 100644
--- a/tests/test_x.py
+++ /dev/null
@@ -1 +0,0 @@
-def test_x(): pass
diff --git a/m.py b/m.py
--- a/m.py
+++ b/m.py
@@ -1 +1 @@
-x = 1
+x = 2
"""


def test_a_rename_names_both_paths():
    assert patch_paths(RENAME) == {"src/old.py", "src/new.py"}


def test_a_deletion_and_an_edit_name_their_paths():
    assert patch_paths(DELETE_AND_EDIT) == {"tests/test_x.py", "m.py"}


def test_the_empty_patch_touches_nothing():
    assert patch_paths("") == set()


def test_text_that_is_not_a_patch_is_refused():
    with pytest.raises(PatchError, match="not a patch"):
        patch_paths("please fix the bug\n")


def test_a_patch_applies_to_a_plain_directory(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_x(): pass\n")
    (tmp_path / "m.py").write_text("x = 1\n")
    apply_patch(tmp_path, DELETE_AND_EDIT)
    assert (tmp_path / "m.py").read_text() == "x = 2\n" and not (tmp_path / "tests" / "test_x.py").exists()


def test_a_patch_that_does_not_apply_changes_nothing_and_is_named(tmp_path):
    (tmp_path / "m.py").write_text("x = 3\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_x(): pass\n")
    with pytest.raises(PatchError, match="the candidate does not apply"):
        apply_patch(tmp_path, DELETE_AND_EDIT, "candidate")
    assert (tmp_path / "tests" / "test_x.py").exists() and (tmp_path / "m.py").read_text() == "x = 3\n"


def test_a_quoted_rename_source_is_unquoted():
    patch = RENAME.replace("rename from src/old.py", 'rename from "tests/t\\303\\251st.py"')
    assert "tests/tést.py" in patch_paths(patch)
