"""The python tool: a stateful kernel in the sandbox; every failure a result, the next call working."""

import socket

import pytest

from dsv32.agent.python_tool import PythonTool
from dsv32.agent.sandbox import Sandbox


@pytest.fixture
def make_python(make_sandbox):
    made = []

    def make(limits: dict | None = None, **options) -> PythonTool:
        made.append(PythonTool(make_sandbox(**(limits or {})), **options))
        return made[-1]

    yield make
    for tool in made:
        tool.close()


def test_state_persists_between_calls_and_outputs_come_back_in_order(make_python):
    python = make_python()
    assert python({"code": "x = 1\nprint('out')\nimport sys; sys.stdout.flush(); print('err', file=sys.stderr)"}) \
        == "out\nerr\n"
    assert python({"code": "x + 1"}) == "2\n"
    assert python({"code": "import os; open('made.txt', 'w').write('hi'); os.getcwd()"}) == f"'{python.sandbox.work}'\n"
    assert (python.sandbox.work / "made.txt").read_text() == "hi"


def test_a_traceback_comes_back_as_plain_text(make_python):
    result = make_python()({"code": "def f():\n    return 1 / 0\nf()"})
    assert "\x1b" not in result and "----> 3 f()" in result and result.endswith("ZeroDivisionError: division by zero\n")


def test_the_21st_execution_is_refused(make_python):
    python = make_python()
    assert [python({"code": f"{i} * 2"}) for i in range(20)] == [f"{2 * i}\n" for i in range(20)]
    assert python({"code": "1"}) == "error: the limit of 20 code executions for this task is reached; " \
                                    "answer with what you have"


def test_long_output_is_truncated_with_a_marker(make_python):
    result = make_python(max_output=900)({"code": "print('a' * 600 + 'b' * 50_000 + 'c' * 299)"})
    assert result == "a" * 600 + "\n... [truncated: 50,000 more characters] ...\n" + "c" * 299 + "\n"


def test_a_kernel_hung_in_c_is_killed_at_the_timeout_and_the_next_call_gets_a_fresh_one(make_python, mentioning):
    python = make_python(timeout=2)
    python({"code": "x = 5"})
    connection = python.client.connection_file  # on the kernel's command line
    assert mentioning(connection)
    result = python({"code": "import ctypes, signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, range(1, 32))\n"
                             "print('sleeping', flush=True)\nctypes.CDLL(None).sleep(1000)"})
    assert result.startswith("error: the execution timed out after 2 s and the kernel was killed; a fresh kernel "
                             "starts on the next call: variables and imports are lost") and result.endswith("sleeping")
    assert mentioning(connection) == []  # the kernel and its sandbox are gone
    assert "NameError: name 'x' is not defined" in python({"code": "x"})
    assert python({"code": "1 + 1"}) == "2\n"


def test_a_10_gb_allocation_raises_memoryerror_and_the_kernel_lives_on(make_python):
    python = make_python({"memory_bytes": 2 << 30})
    python({"code": "x = 7"})
    assert python({"code": "b = bytearray(10 * 2**30)"}).endswith("MemoryError: \n")
    assert python({"code": "x"}) == "7\n"


def test_the_kernel_has_no_network(make_python):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    code = ("import socket\n"
            "for addr in [('1.1.1.1', 53), ('127.0.0.1', %d)]:\n"
            "    try: socket.create_connection(addr, timeout=3); print('connected', addr)\n"
            "    except OSError as e: print(type(e).__name__, e.errno)\n") % listener.getsockname()[1]
    assert make_python()({"code": code}) == "OSError 101\nConnectionRefusedError 111\n"
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()


def test_a_fork_bomb_in_the_kernel_is_stopped_and_the_next_call_works(make_python, mentioning):
    python = make_python({"processes": 64}, timeout=10)
    python({"code": "pass"})
    connection = python.client.connection_file
    result = python({"code": "import os\nwhile True:\n    os.fork()"})
    assert result.startswith("error: the sandbox reached its limit of 64 processes, so the kernel was killed with "
                             "everything it started") and "BlockingIOError" in result
    assert mentioning(connection) == []
    assert python({"code": "import subprocess; _ = subprocess.run(['echo', 'forks again'])"}).startswith("forks again\n")


def test_without_a_sandbox_the_kernel_still_runs_and_the_tool_says_it_is_unsafe(tmp_path):
    python = PythonTool(Sandbox(tmp_path, bwrap="/nonexistent/bwrap", unsafe_no_sandbox=True))
    try:
        assert "WARNING: not sandboxed" in python.description
        assert python({"code": "2 ** 10"}) == "1024\n"
    finally:
        python.close()


def test_code_in_the_kernel_cannot_swap_its_sockets_for_links_to_other_ones(make_python):
    python = make_python()
    python({"code": "pass"})
    ipc = python.files[-1]  # the directory of the kernel's Unix sockets, which the host connects to
    result = python({"code": f"import os\nos.symlink('/run/other.sock', '{ipc}/link')\n"})
    assert "PermissionError" in result
    assert "PermissionError" in python({"code": f"os.unlink('{ipc}/kernel-1')"})
    assert python({"code": "'still connected'"}) == "'still connected'\n"
