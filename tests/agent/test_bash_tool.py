"""The bash tool: one command per call in the task's work dir; failures come back as results."""

import subprocess
import threading
import time

from dsv32.agent.bash_tool import BashTool
from dsv32.agent.sandbox import Sandbox


def test_a_command_runs_in_the_work_dir_and_reports_its_exit_code(make_sandbox):
    box = make_sandbox()
    bash = BashTool(box)
    assert bash({"command": "pwd; echo hi > made; exit 3"}) == f"{box.work}\n[exit code 3]"
    assert (box.work / "made").read_text() == "hi\n"
    assert bash({"command": "cat made; printf no-newline"}) == "hi\nno-newline\n[exit code 0]"


def test_files_persist_between_calls_but_background_processes_die_with_theirs(make_sandbox, mentioning):
    bash = BashTool(make_sandbox())
    start = time.monotonic()
    sleep = "python -c 'import time; time.sleep(300)' bg-7c1e"
    assert bash({"command": f"{sleep} & echo started"}) == "started\n[exit code 0]"
    assert time.monotonic() - start < 5 and mentioning("bg-7c1e") == []


def test_a_timeout_kills_the_whole_process_tree_and_the_next_call_works(make_sandbox, mentioning):
    bash = BashTool(make_sandbox(), timeout=2)
    sleep = "python -c 'import time; time.sleep(300)' tree-7c1e"
    result = bash({"command": f"echo before; {sleep} & {sleep}"})
    assert result == "error: the command timed out after 2 s and was killed with every process it started.\nbefore"
    assert mentioning("tree-7c1e") == []
    assert bash({"command": "echo next"}) == "next\n[exit code 0]"


def test_long_output_is_cut_in_the_middle_with_a_marker_that_counts_the_rest(make_sandbox):
    bash = BashTool(make_sandbox(), max_output=900)
    result = bash({"command": "printf 'a%.0s' $(seq 1000); printf 'b%.0s' $(seq 99000); printf 'c%.0s' $(seq 1000)"})
    # 101,000 characters: the first 600 and the last 300 are kept
    assert result == "a" * 600 + "\n... [truncated: 100,100 more characters] ...\n" + "c" * 300 + "\n[exit code 0]"


def test_a_fork_bomb_stops_at_the_process_limit_of_its_task_and_leaves_nothing_behind(make_sandbox, mentioning):
    bash, neighbour = BashTool(make_sandbox("a", processes=32), timeout=3), BashTool(make_sandbox("b", processes=32))
    marker = "bomb-7c1e"
    command = f"bash -c 'f(){{ f | f & }}; f; sleep 300' {marker}"
    result, peak, neighbour_forked = [], 0, None
    bomb = threading.Thread(target=lambda: result.append(bash({"command": command})))
    bomb.start()
    while bomb.is_alive():  # the host's view of the bomb while it runs
        # bwrap's own two processes carry the marker too: leave them out
        peak = max(peak, len([c for c in mentioning(marker) if not c.split(" ")[0].endswith("bwrap")]))
        if peak >= 20 and neighbour_forked is None:  # the bomb is near its limit: another task can still fork
            neighbour_forked = neighbour({"command": "for i in $(seq 20); do sleep 1 & done; wait; echo forked"})
        time.sleep(0.1)
    assert result[0].startswith("error: the command timed out after 3 s")
    assert "Resource temporarily unavailable" in result[0]
    assert 20 <= peak <= 32  # it forked many times, and no further than the limit (zombies count, unseen)
    assert neighbour_forked == "forked\n[exit code 0]"
    assert mentioning(marker) == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork
    assert bash({"command": "echo alive"}) == "alive\n[exit code 0]"


def test_without_a_sandbox_commands_still_run_and_the_tool_says_it_is_unsafe(tmp_path):
    bash = BashTool(Sandbox(tmp_path, bwrap="/nonexistent/bwrap", unsafe_no_sandbox=True))
    assert "WARNING: not sandboxed" in bash.description and "No network access" not in bash.description
    assert bash({"command": "echo $((6 * 7))"}) == "42\n[exit code 0]"
