"""The agent loop with a scripted policy: tool calls answered in order, every failure a result or a
recorded end, budgets, and the V3.2 thinking rule in what the model sees (spec §3.1), checked
against `encode_messages`."""

from dsv32.agent.loop import AgentConfig, AgentLoop, run_tool
from dsv32.agent.policy import Reply
from dsv32.chat import encode_completion
from dsv32.engine import SamplingParams

from scripted_policy import Add, Echo, Fail, ScriptedPolicy, call, rendered, turn

TOOLS = [Add(), Echo(), Fail()]
SCHEMAS = [t.schema() for t in TOOLS]


def loop(replies, sampling=None, **config):
    policy = ScriptedPolicy(replies)
    return AgentLoop(policy, TOOLS, sampling or SamplingParams(max_tokens=2000), AgentConfig(**config)), policy


def test_parallel_tool_calls_are_each_answered_in_the_order_written():
    agent, policy = loop([turn("Three at once.", calls=[call("add", a=1, b=2), call("echo", text="x"),
                                                        call("add", a=3, b=4)]),
                          turn("Got 3, x, 7.", "10")])
    ep = agent.run("Add things.")
    assert ep.end == "answer" and ep.answer == "10" and ep.error is None
    assert [m["role"] for m in ep.log] == ["user", "assistant", "tool", "tool", "tool", "assistant"]
    ids = [c["id"] for c in ep.log[1]["tool_calls"]]
    assert [(m["tool_call_id"], m["content"]) for m in ep.log[2:5]] == list(zip(ids, ["3", "x", "7"]))
    assert len(set(ids)) == 3 and ep.tool_calls == 3 and len(ep.steps) == 2
    # the second call saw the three results in one block, in order, and the model keeps its turn
    assert policy.prompt(1) == rendered(ep.log[:5], SCHEMAS)
    assert policy.prompt(1).endswith("<function_results>\n<result>3</result>\n<result>x</result>\n"
                                      "<result>7</result>\n</function_results>\n\n<think>")


def test_an_unknown_tool_bad_arguments_and_a_failing_tool_come_back_as_results_and_the_loop_goes_on():
    agent, policy = loop([turn("Try.", calls=[call("search", query="q"), call("add", a="one", b=2),
                                              call("add", a=1), call("fail"), call("add", a=1, b=1)]),
                          turn("Only the last worked.", "2")])
    ep = agent.run("Add.")
    results = [m["content"] for m in ep.log if m["role"] == "tool"]
    assert results == ["error: there is no tool 'search'; the tools are: add, echo, fail",
                       "error: argument a of add must be of type integer, got str",
                       "error: add needs the argument(s) b", "error: the disk is on fire", "2"]
    assert ep.end == "answer" and ep.answer == "2" and "<result>error: the disk is on fire</result>" in policy.prompt(1)
    # an endpoint may send arguments that are not JSON (a V3.2 reply that did would not parse)
    bad_json = {"type": "function", "function": {"name": "add", "arguments": "{not json"}}
    assert run_tool({t.name: t for t in TOOLS}, bad_json).startswith("error: the arguments of add are not valid JSON")

    class Raw:  # a tool outside the Tool contract, raising
        name = "raw"

        def __call__(self, arguments):
            raise KeyError("boom")

    assert run_tool({"raw": Raw()}, call("raw")) == "error: raw failed: KeyError: 'boom'"


def test_policy_failures_end_the_run_with_a_recorded_reason_never_an_exception():
    agent, _ = loop([turn("Look.", calls=[call("echo", text="a")]), ConnectionError("endpoint down")])
    ep = agent.run("Go.")
    assert ep.end == "policy_error" and ep.error == "ConnectionError: endpoint down" and len(ep.steps) == 1
    assert ep.log[-1] == {"role": "tool", "tool_call_id": ep.log[1]["tool_calls"][0]["id"], "content": "a"}
    unparsed = Reply(None, "half a <think> reply", "stop", 10, 5, error="the reply does not parse: ...")
    ep = loop([unparsed])[0].run("Go.")
    assert ep.end == "bad_reply" and ep.error.startswith("the reply does not parse") and ep.steps[0].text == unparsed.text
    cut = Reply(None, "a long thought", "length", 10, 500)
    ep = loop([cut])[0].run("Go.")
    assert ep.end == "length" and ep.log == [{"role": "user", "content": "Go."}]


def test_budgets_stop_the_loop_with_their_own_end_reason():
    forever = [turn("Again.", calls=[call("echo", text="e"), call("echo", text="f")]) for _ in range(10)]
    ep = loop(forever, max_steps=3)[0].run("Go.")
    assert ep.end == "max_steps" and len(ep.steps) == 3 and ep.tool_calls == 6
    ep = loop(forever, max_tool_calls=3)[0].run("Go.")   # the 4th call gets an error result, then the run ends
    assert ep.end == "max_tool_calls" and ep.tool_calls == 3 and len(ep.steps) == 2
    assert ep.log[-1]["content"] == "error: the budget of 3 tool calls is spent" and ep.log[-2]["content"] == "e"
    n = len(encode_completion(forever[0]))                 # one reply's tokens (a character each)
    agent, policy = loop(forever, SamplingParams(max_tokens=1000), max_tokens=n + 100)
    ep = agent.run("Go.")                                  # the second reply is cut at the 100 tokens left
    assert ep.end == "max_tokens" and len(ep.steps) == 2 and ep.completion_tokens == n + 100
    assert [s[2].max_tokens for s in policy.seen] == [n + 100, 100]  # the budget caps every call


def test_a_prompt_that_no_longer_fits_the_window_ends_the_run_without_management():
    reply = turn("Look.", calls=[call("echo", text="x" * 300)])
    agent, policy = loop([reply] * 3)
    task = len(rendered([{"role": "user", "content": "Go."}], SCHEMAS))
    policy.context_window = task + len(encode_completion(reply)) + 100
    ep = agent.run("Go.")            # the first call fits; with its 300-character result the next does not
    assert ep.end == "context" and len(ep.steps) == 1 and "context window" in ep.error
    assert policy.seen[0][2].max_tokens == policy.context_window - task      # capped to the room left
    agent, policy = loop([reply])
    policy.context_window = task + 100
    ep = agent.run("Go.")            # a reply cut by the end of the window
    assert ep.end == "context" and ep.error == "the reply was cut at 100 tokens (the end of the context window)"


def test_reasoning_is_kept_across_tool_results_and_dropped_at_a_new_user_message():
    agent, policy = loop([turn("PLAN-A: echo first.", calls=[call("echo", text="found it")]),
                          turn("PLAN-B: done.", "It is found."),
                          turn("PLAN-C: answer again.", "Still found.")])
    first = agent.run("Find it.")
    seen = policy.prompt(1)          # after a tool round: the turn's reasoning is still in the prompt
    assert seen == rendered(first.log[:3], SCHEMAS)
    assert "PLAN-A: echo first.</think>" in seen and "<result>found it</result>" in seen
    second = agent.run(first.log + [{"role": "user", "content": "Sure?"}])
    seen = policy.prompt(2)          # a new user message: reasoning gone, calls, results and answers kept
    assert seen == rendered(first.log + [{"role": "user", "content": "Sure?"}], SCHEMAS)
    assert "PLAN-A" not in seen and "PLAN-B" not in seen
    assert 'name="echo"' in seen and "<result>found it</result>" in seen and "It is found." in seen
    assert second.end == "answer" and second.answer == "Still found."
    assert first.log == second.log[:len(first.log)]


def test_tools_that_cannot_be_made_end_the_episode_with_a_reason():
    def tools():
        raise OSError("bubblewrap could not start a sandbox")

    policy = ScriptedPolicy([turn("never", "called")])
    ep = AgentLoop(policy, tools).run("Go.")
    assert ep.end == "tool_setup" and ep.error == "OSError: bubblewrap could not start a sandbox" and not policy.seen


def test_each_call_gets_its_own_seed_so_a_reset_view_is_not_resampled_the_same():
    agent, policy = loop([turn("a", calls=[call("echo", text="x")]), turn("b", "done")], SamplingParams(seed=7))
    ep = agent.run("Go.")
    assert [s[2].seed for s in policy.seen] == [7, 8] and ep.sampling.seed == 7
    assert ep.to_json()["sampling"]["seed"] == 7 and ep.to_json()["log"] == ep.log
