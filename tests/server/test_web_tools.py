"""The server's agent tools (`dsv32 serve --agent-tools`): the endpoints, and the web page running a
tool call the model made. The sandboxed ones skip where bubblewrap cannot start a sandbox (the probe
of tests/agent/conftest.py); the oracle for a tool's output is the command's own (`echo`)."""

import shutil

import httpx
import pytest
from scripted import Server, scripted_engine, tiny_v32_dir
from test_web import Chat, browser, say, shots  # noqa: F401 (browser, shots: fixtures)

from dsv32.agent.sandbox import Sandbox, SandboxError
from dsv32.chat import encode_completion
from dsv32.server.tools import AgentTools


def bwrap_problem(tmp_path) -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        Sandbox(tmp_path / "probe", "probe").remove()
    except SandboxError as e:
        return f"bubblewrap cannot start a sandbox here: {e}"
    return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(a server with the python and bash tools, at most 2 conversations; its AgentTools)."""
    problem = bwrap_problem(tmp_path_factory.mktemp("probe"))
    if problem:
        pytest.skip(problem)
    path = tiny_v32_dir(tmp_path_factory.mktemp("tiny-v32"), max_position_embeddings=4096)
    engine, tok = scripted_engine(path, max_num_seqs=1)
    tools = AgentTools(["python", "bash"], max_conversations=2)
    with_tools = Server(engine, tok, agent_tools=tools)
    yield with_tools, tools
    with_tools.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tiny_v32_dir(tmp_path_factory.mktemp("tiny-plain"))
    engine, tok = scripted_engine(path, max_num_seqs=1)
    server = Server(engine, tok)
    yield server
    server.stop()


def call(server, name, conversation, **arguments):
    return httpx.post(f"{server.url}/v1/agent/tools/{name}", timeout=60,
                      json={"conversation": conversation, "arguments": arguments})


def test_off_by_default(plain):
    for r in (httpx.get(plain.url + "/v1/agent/tools"), call(plain, "bash", "c1", command="echo hi")):
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "tools_disabled" and "--agent-tools" in r.json()["error"]["message"]


def test_bash_runs_in_the_sandbox_and_conversations_are_apart(servers):
    server, tools = servers
    listed = httpx.get(server.url + "/v1/agent/tools").json()["data"]
    assert [t["function"]["name"] for t in listed] == ["python", "bash"]
    assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in listed)
    r = call(server, "bash", "conv-a", command="echo hi")
    assert r.status_code == 200 and r.json()["result"].splitlines()[0] == "hi"
    assert call(server, "bash", "conv-a", command="echo secret > note.txt").status_code == 200
    assert call(server, "bash", "conv-a", command="cat note.txt").json()["result"].startswith("secret")
    other = call(server, "bash", "conv-b", command="cat note.txt; ls -A | wc -l").json()["result"]
    assert "No such file" in other and "secret" not in other
    # the host's secrets stay out of reach
    assert "[exit code 0]" not in call(server, "bash", "conv-b", command="cat /etc/shadow").json()["result"]
    # the python kernel keeps its state within a conversation
    assert call(server, "python", "conv-a", code="x = 6 * 7").status_code == 200
    assert "42" in call(server, "python", "conv-a", code="print(x)").json()["result"]
    # the cap: a third conversation closes the least recently used idle one (conv-b)
    assert call(server, "bash", "conv-c", command="echo c").status_code == 200
    assert set(tools.conversations) == {"conv-a", "conv-c"}


def test_bad_requests_get_openai_errors(servers):
    server, _ = servers
    r = call(server, "rm_rf", "conv-a")
    assert r.status_code == 404 and r.json()["error"]["code"] == "tool_not_found"
    r = call(server, "bash", "../../etc", command="echo")
    assert r.status_code == 400 and r.json()["error"]["param"] == "conversation"
    r = httpx.post(server.url + "/v1/agent/tools/bash", json={"arguments": {}})
    assert r.status_code == 400 and "error" in r.json()
    # a bad argument is the tool's result, as the model would read it
    assert call(server, "bash", "conv-a", cmd="x").json()["result"].startswith("error: bash needs")


def test_the_page_runs_a_bash_call_and_sends_its_result(browser, servers, shots):
    server, _ = servers
    chat = Chat(browser, server)
    try:
        page = chat.page
        page.click("#tools-control summary")
        assert page.inner_text("#server-tools-names") == "python, bash"
        page.check("#server-tools")
        command = "echo sandboxed-$((6*7)); uname -s"
        bash = {"type": "function", "function": {"name": "bash", "arguments": {"command": command}}}
        say(server, encode_completion({"content": "", "tool_calls": [bash, bash]}, "chat"))
        chat.send("Run it twice.")
        assert chat.texts(".call .name") == ["bash", "bash"]
        chat.click("Run")  # the last call's
        box = page.get_by_label("Result of bash").nth(1)
        page.wait_for_function("document.querySelectorAll('.results textarea')[1].value !== ''")
        result = box.input_value()
        assert result.splitlines()[:2] == ["sandboxed-42", "Linux"]
        assert page.get_by_label("Result of bash").nth(0).input_value() == ""
        chat.click("Run all")
        page.wait_for_function("document.querySelectorAll('.results textarea')[0].value !== '' && "
                               "[...document.querySelectorAll('.run button')].every((b) => !b.disabled)")
        shots(page, "server-tools")
        box.fill(result + "\n(edited)")
        say(server, encode_completion({"content": "It printed sandboxed-42."}, "chat"))
        chat.ask(lambda: chat.click("Send results"))
        assert chat.texts(".msg.assistant .content")[-1] == "It printed sandboxed-42."
        first, second = chat.bodies
        assert [t["function"]["name"] for t in first["tools"]] == ["python", "bash"]
        tool_msgs = [m for m in second["messages"] if m["role"] == "tool"]
        assert [m["content"] for m in tool_msgs] == [result, result + "\n(edited)"]
        # an endpoint error shows in the page: the server turned its tools off meanwhile
        say(server, encode_completion({"content": "", "tool_calls": [bash]}, "chat"))
        chat.send("Again.")
        page.route("**/v1/agent/tools/bash", lambda route: route.fulfill(
            status=404, json={"error": {"message": "server tools are off", "type": "invalid_request_error"}}))
        chat.click("Run")
        alert = page.locator(".run-status[role=alert]")
        alert.wait_for()
        assert alert.inner_text() == "Error HTTP 404: server tools are off"
    finally:
        chat.context.close()


def test_idle_conversations_are_closed_and_their_directories_removed(tmp_path):
    if problem := bwrap_problem(tmp_path):
        pytest.skip(problem)
    tools = AgentTools(["bash"], idle_s=0.0)
    try:
        tools.call("old", "bash", {"command": "echo x > f"})
        old_dir = tools.conversations["old"].sandboxes[0].dir
        assert old_dir.is_dir()
        tools.call("new", "bash", {"command": "true"})  # any call sweeps the idle ones
        assert set(tools.conversations) == {"new"} and not old_dir.exists()
    finally:
        tools.close()
    assert not tools.root.exists()
