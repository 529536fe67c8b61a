"""`dsv32 synth general --family trip`: environments written after their check, resumable."""

from dsv32.synth.cli import main
from dsv32.synth.environment import load_environment, read_index
from dsv32.synth.runner import local_verify


def test_the_command_writes_checked_environments_and_resumes(tmp_path, sandbox_root, capsys):
    out = tmp_path / "envs"
    assert main(["general", "--family", "trip", "--n", "2", "--difficulty", "2", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "| 2 | 2 | 0 |" in first and "2 environments in" in first
    assert main(["general", "--family", "trip", "--n", "3", "--difficulty", "2", "--out", str(out)]) == 0
    assert "| 2 | 1 | 0 |" in capsys.readouterr().out  # only the third is new
    index = read_index(out)
    assert [e["name"] for e in index] == ["trip-d2-s0", "trip-d2-s1", "trip-d2-s2"]
    for e in index:
        env = load_environment(out / e["path"])
        assert local_verify(env.verifier_code, env.meta["reference"], env.params, env.db_path) == (1.0, [])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "environments.jsonl", "trip-d2-s0", "trip-d2-s1", "trip-d2-s2"]
