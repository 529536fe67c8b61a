"""The repository's virtualenv: built once, reused while the dependency files stay the same,
rebuilt when one changes, and a failed install rejects the commit as setup-failed with pip's log."""

import importlib.util
import json
import site
import subprocess
import sys
import sysconfig

from calc_history import git
from tiny_repos import bug_fix_history, make_history

from dsv32.synth.code_miner import MineOptions, mine
from dsv32.synth.code_task import CodeTask
from dsv32.synth.code_venv import (
    STAMP,
    VenvOptions,
    ensure_venv,
    install_commands,
    seed_distributions,
    stamp_of,
)
from dsv32.synth.git_history import archive


def snapshot(repo, rev, tmp_path):
    tar = tmp_path / f"{rev[:8]}.tar"
    archive(repo, rev, tar)
    return tar


def test_a_dependency_that_is_not_installable_offline_rejects_the_commit_with_pips_log(run_options, tmp_path):
    repo = tmp_path / "repo"
    shas = make_history(repo, bug_fix_history("nosuchdep-dsv32-test==1.0\n"))
    rows = mine(repo, tmp_path / "out", options=MineOptions(run=run_options, venv=VenvOptions()))
    fix = next(r for r in rows if r["commit"] == shas[1])
    assert fix["reason"] == "setup-failed"
    assert fix["detail"] == "pip install -r requirements.txt: exit status 1"
    assert "nosuchdep-dsv32-test" in fix["output"]  # pip's own words name the requirement it could not find
    stamp = json.loads((tmp_path / "out" / "venv" / STAMP).read_text())
    assert stamp["ok"] is False and "--no-index" in stamp["log"]  # offline by default


def test_a_repository_without_dependencies_gets_a_venv_built_once_and_its_tests_run_with_its_python(
        run_options, tmp_path):
    # the new test asserts it runs in the venv: sys.prefix is the venv, not this interpreter's prefix
    test = ("import os, sys\nfrom calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
            "    assert sys.prefix == os.environ['VIRTUAL_ENV'] and sys.prefix.endswith('venv')\n")
    repo = tmp_path / "repo"
    shas = make_history(repo, bug_fix_history("# no dependencies\n", test))
    out = tmp_path / "out"
    rows = mine(repo, out, options=MineOptions(run=run_options, venv=VenvOptions()))
    fix = next(r for r in rows if r["commit"] == shas[1])
    assert fix["reason"] == "accepted", fix
    assert fix["f2p"] == ["tests.test_add::test_add"]
    task = CodeTask.from_json(fix["task"])
    assert task.venv == "venv" and (out / task.venv / "bin" / "python").exists()
    assert fix["venv"]["built"] and fix["venv"]["stamp"] == json.loads((out / "venv" / STAMP).read_text())["stamp"][:12]


def test_the_venv_is_reused_while_the_stamp_matches_and_rebuilt_when_a_dependency_file_changes(
        run_options, tmp_path):
    repo = tmp_path / "repo"
    shas = make_history(repo, bug_fix_history("# no dependencies\n"))
    (repo / "requirements.txt").write_text("# still none, but the file changed\n")
    git(repo, "commit", "-q", "-am", "Touch the requirements")
    changed = git(repo, "rev-parse", "HEAD")
    venv, boxes = tmp_path / "venv", run_options.sandbox_root
    first = ensure_venv(venv, snapshot(repo, shas[0], tmp_path), boxes, unsafe_no_sandbox=run_options.unsafe_no_sandbox)
    assert first.ok and first.built
    assert first.stamp == stamp_of({"requirements.txt": b"# no dependencies\n"})  # the hash of the file itself
    mtime = (venv / STAMP).stat().st_mtime_ns
    again = ensure_venv(venv, snapshot(repo, shas[1], tmp_path), boxes,  # same requirements.txt
                        unsafe_no_sandbox=run_options.unsafe_no_sandbox)
    assert again.ok and not again.built and (venv / STAMP).stat().st_mtime_ns == mtime
    rebuilt = ensure_venv(venv, snapshot(repo, changed, tmp_path), boxes,
                          unsafe_no_sandbox=run_options.unsafe_no_sandbox)
    assert rebuilt.ok and rebuilt.built and rebuilt.stamp != first.stamp
    assert (venv / STAMP).stat().st_mtime_ns > mtime
    assert json.loads((venv / STAMP).read_text())["stamp"] == rebuilt.stamp


def test_the_install_steps_are_the_requirements_files_then_the_build_backend_then_the_project(tmp_path):
    files = {"pyproject.toml": b'[build-system]\nrequires = ["flit_core >=4,<5"]\nbuild-backend = "flit_core.buildapi"\n',
             "requirements-dev.txt": b"", "requirements.txt": b""}
    steps = install_commands(files, tmp_path / "v", VenvOptions(find_links=(str(tmp_path),)))
    assert [what for what, _ in steps] == ["-r requirements-dev.txt", "-r requirements.txt",
                                            "the build requirements flit_core >=4,<5", ". (the project)"]
    assert all(f"--no-index --find-links {tmp_path}" in cmd for _, cmd in steps)
    assert steps[2][1].endswith("'flit_core >=4,<5'") and steps[3][1].endswith("--no-build-isolation .")
    online = install_commands({"setup.py": b""}, tmp_path / "v", VenvOptions(allow_network=True))
    assert len(online) == 1 and "--no-index" not in online[0][1]  # no pyproject: no build requirements step


def test_a_dependency_from_a_find_links_folder_is_installed_offline_and_the_fix_accepted(run_options, tmp_path):
    # a wheel of a one-module package, built here offline with this interpreter's setuptools
    pkg = tmp_path / "tinydep"
    pkg.mkdir()
    (pkg / "tinydep.py").write_text("FIVE = 5\n")
    (pkg / "setup.py").write_text("from setuptools import setup\nsetup(name='tinydep', version='1.0', "
                                  "py_modules=['tinydep'])\n")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-index", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(wheels), str(pkg)], check=True, capture_output=True)
    test = "import tinydep\nfrom calc import add\n\n\ndef test_add():\n    assert add(2, 3) == tinydep.FIVE\n"
    repo = tmp_path / "repo"
    shas = make_history(repo, bug_fix_history("tinydep==1.0\n", test))
    offline = mine(repo, tmp_path / "offline", options=MineOptions(run=run_options, venv=VenvOptions()))
    assert next(r for r in offline if r["commit"] == shas[1])["reason"] == "setup-failed"  # no index, no wheel
    options = MineOptions(run=run_options, venv=VenvOptions(find_links=(str(wheels),)))
    rows = mine(repo, tmp_path / "out", options=options)
    fix = next(r for r in rows if r["commit"] == shas[1])
    assert fix["reason"] == "accepted" and fix["f2p"] == ["tests.test_add::test_add"]
    assert list((tmp_path / "out" / "venv").glob("lib/python*/site-packages/tinydep.py"))  # installed in the venv


def test_a_stamp_link_left_by_the_install_is_replaced_not_followed(run_options, tmp_path):
    # the install runs the repository's own code with the venv writable: setup.py plants a link
    # where the stamp goes, pointing at a file of ours
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    setup = (f"import os\nfrom setuptools import setup\nos.symlink({str(victim)!r}, "
             f"os.path.join(os.environ['VIRTUAL_ENV'], {STAMP!r}))\nsetup(name='calc', version='0', py_modules=['calc'])\n")
    repo = tmp_path / "repo"
    shas = make_history(repo, [("Start", {"calc.py": "X = 1\n", "setup.py": setup})])
    state = ensure_venv(tmp_path / "venv", snapshot(repo, shas[0], tmp_path), run_options.sandbox_root,
                        unsafe_no_sandbox=run_options.unsafe_no_sandbox)
    assert victim.read_text() == "untouched\n"
    assert not (tmp_path / "venv" / STAMP).is_symlink() and json.loads((tmp_path / "venv" / STAMP).read_text())
    assert state.built


MINER_ONLY = "tqdm"   # a dependency of dsv32: importable by the miner, and not a seed of the venv
ISOLATION_TEST = (f"import importlib.util, os, shutil\nfrom calc import add\n\n\ndef test_add():\n"
                  f"    assert add(2, 3) == 5\n\n\ndef test_the_miners_package_is_not_importable():\n"
                  f"    assert importlib.util.find_spec({MINER_ONLY!r}) is None\n\n\n"
                  f"def test_pytest_on_path_is_the_venvs():\n"
                  f"    assert shutil.which('pytest').startswith(os.environ['VIRTUAL_ENV'] + '/')\n")


def test_a_package_the_miner_imports_is_not_importable_in_the_isolated_venvs_test_run(run_options, tmp_path):
    assert importlib.util.find_spec(MINER_ONLY) is not None  # the oracle: this process, the miner, can import it
    assert MINER_ONLY not in {d.metadata["Name"].lower() for d in seed_distributions()}
    repo = tmp_path / "repo"
    shas = make_history(repo, bug_fix_history("# no dependencies\n", ISOLATION_TEST))
    out = tmp_path / "isolated"
    fix = next(r for r in mine(repo, out, options=MineOptions(run=run_options, venv=VenvOptions()))
               if r["commit"] == shas[1])
    task = CodeTask.from_json(fix["task"])
    assert fix["reason"] == "accepted" and fix["f2p"] == ["tests.test_add::test_add"], fix
    # the two tests that look at the environment pass before the fix and after it
    assert task.p2p == ["tests.test_add::test_pytest_on_path_is_the_venvs",
                        "tests.test_add::test_the_miners_package_is_not_importable", "tests.test_base::test_ok"]
    assert task.venv_inherit is False
    # outside the sandbox too: the venv's sys.path holds none of the miner's site-packages, and its
    # pytest is its own copy
    code = "import json, sys, pytest; print(json.dumps([sys.path, pytest.__file__]))"
    probe = subprocess.run([str(out / "venv" / "bin" / "python"), "-c", code], capture_output=True, text=True,
                           check=True, cwd=tmp_path)
    path, pytest_file = json.loads(probe.stdout)
    miner_sites = {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    assert not miner_sites & set(path)
    assert pytest_file.startswith(str((out / "venv").resolve()) + "/")
    assert json.loads((out / "venv" / STAMP).read_text())["inherit"] is False


def test_an_inheriting_venv_sees_the_miners_packages(run_options, tmp_path):
    """The control: with --venv-inherit the two tests that look at the environment fail before and
    after the fix, so they are neither fail-to-pass nor pass-to-pass."""
    repo = tmp_path / "repo"
    shas = make_history(repo, bug_fix_history("# no dependencies\n", ISOLATION_TEST))
    rows = mine(repo, tmp_path / "inherited", options=MineOptions(run=run_options, venv=VenvOptions(inherit=True)))
    fix = next(r for r in rows if r["commit"] == shas[1])
    task = CodeTask.from_json(fix["task"])
    assert fix["reason"] == "accepted" and fix["f2p"] == ["tests.test_add::test_add"]
    assert task.p2p == ["tests.test_base::test_ok"]
    assert task.venv_inherit is True


def test_a_venv_built_the_other_way_is_rebuilt_not_reused(run_options, tmp_path):
    repo = tmp_path / "repo"
    shas = make_history(repo, bug_fix_history("# no dependencies\n"))
    tar, venv = snapshot(repo, shas[0], tmp_path), tmp_path / "venv"
    kw = {"unsafe_no_sandbox": run_options.unsafe_no_sandbox}
    assert ensure_venv(venv, tar, run_options.sandbox_root, VenvOptions(inherit=True), **kw).built
    assert not ensure_venv(venv, tar, run_options.sandbox_root, VenvOptions(inherit=True), **kw).built
    assert ensure_venv(venv, tar, run_options.sandbox_root, VenvOptions(), **kw).built
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()


def test_a_task_row_from_before_isolation_reads_as_inheriting_its_venv():
    old = {"id": "r-1", "repo": "r", "commit": "c", "parent": "p", "issue": "Fix add", "test_cmd": "{junit}",
           "test_files": [], "test_paths": ["tests/test_add.py"], "f2p": ["t::a"], "p2p": []}
    assert CodeTask.from_json({**old, "venv": "venv"}).venv_inherit is True
    assert CodeTask.from_json({**old, "venv": None}).venv_inherit is False
    assert CodeTask.from_json({**old, "venv": "venv", "venv_inherit": False}).venv_inherit is False
