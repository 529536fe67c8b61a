"""The environment-setup agent (spec §5, "Code agent": an agent that installs packages and
resolves dependencies): when a repository's plain install fails (dsv32.synth.code_venv), a model
gets the install's log and a bash tool in the same sandbox, with the checkout and the venv, and
works until the test suite collects or its turns run out.

One turn is one model call, then its bash calls, run in order, then the check: pytest collects
the checkout's tests with the venv's python without an error (`code_venv.collects`). The agent
stops as soon as the check passes (accepted), after a reply that does not parse or a policy that
fails, or after `max_turns` turns (the venv is then recorded as failed, reason `setup-failed`).
A reply without tool calls while the check still fails gets the collection output back as the
next user message.

What persists is what the agent does to the venv: each later test run starts from a fresh copy
of the snapshot, so a change the agent makes to the checkout itself is gone. The policy is any
`dsv32.agent.policy.Policy` (an OpenAI-compatible endpoint, our engine in process); its commands
run in the sandbox like every other synthesized code, offline unless the install allows the
network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dsv32.agent.bash_tool import BashTool
from dsv32.agent.loop import run_tool
from dsv32.agent.policy import Policy, PolicyError
from dsv32.agent.sandbox import Sandbox
from dsv32.engine import SamplingParams
from dsv32.synth.code_venv import LOG_TAIL, collects

SYSTEM = """You set up the test environment of a Python repository so that its test suite can run.
The plain install of its dependencies failed; the log is below. You have a bash tool. Its commands run in a
sandbox{network}, from the directory that holds the checkout (`repo/`). The repository's virtualenv is {venv}:
use its python, {venv}/bin/python, by that path (`python` on PATH is another interpreter). Install what is
missing into the virtualenv (pip with local wheels, a vendored copy, a small shim module in its site-packages);
changes to the checkout itself are NOT kept, only the virtualenv is. You are done when
`cd repo && {venv}/bin/python -m pytest --collect-only -q` collects the tests without errors; that is checked
after every turn."""

TASK = """The install failed:

{log}

Make the tests collect."""


@dataclass
class SetupAgent:
    """A `code_venv.Fixer`: (sandbox, checkout, venv, failed install's log) -> (fixed, transcript)."""

    policy: Policy
    max_turns: int = 8
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=4096, temperature=0.6))
    command_timeout: float = 300.0
    check_timeout: float = 300.0

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError(f"the setup agent needs at least one turn, got max_turns={self.max_turns}")

    def __call__(self, box: Sandbox, repo: Path, venv: Path, log: str) -> tuple[bool, str]:
        bash = BashTool(box, timeout=self.command_timeout, max_output=LOG_TAIL)
        tools = {bash.name: bash}
        network = "" if box.network else " without network access"
        messages = [{"role": "system", "content": SYSTEM.format(venv=venv, network=network)},
                    {"role": "user", "content": TASK.format(log=log[-LOG_TAIL:])}]
        transcript: list[str] = []
        for turn in range(1, self.max_turns + 1):
            try:
                reply = self.policy(messages, [bash.schema()], self.sampling)
            except PolicyError as e:
                transcript.append(f"turn {turn}: the policy failed: {e}")
                return False, "\n".join(transcript)
            if reply.message is None:
                transcript.append(f"turn {turn}: {reply.error or 'the reply does not parse'}")
                return False, "\n".join(transcript)
            messages.append(reply.message)
            calls = reply.message.get("tool_calls") or []
            for i, call in enumerate(calls):
                result = run_tool(tools, call)
                transcript.append(f"turn {turn}: {call['function']['name']} {call['function']['arguments']}\n{result}")
                messages.append({"role": "tool", "tool_call_id": call.get("id") or f"call-{turn}-{i}",
                                 "content": result})
            ok, output = collects(box, venv, self.check_timeout)
            if ok:
                transcript.append(f"turn {turn}: the tests collect")
                return True, "\n".join(transcript)
            if not calls:
                transcript.append(f"turn {turn}: no command; the tests still do not collect")
                messages.append({"role": "user", "content": f"The tests still do not collect:\n\n{output}"})
        transcript.append(f"gave up after {self.max_turns} turns: the tests still do not collect")
        return False, "\n".join(transcript)
