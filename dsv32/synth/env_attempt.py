"""One attempt at a general-agent environment: an agent loop with the environment's tools and
`submit_result`, its submission scored by the environment's verifier. What the solvability filter
of `dsv32 synth general` and `dsv32 eval` on an environments.jsonl both run.

The tools and the verifier run the way RL runs them (`dsv32.synth.rl_env.EnvironmentRunner`):
a programmatic family's own code here, model-written code in sandboxes. The episode runs to the
agent's answer (a turn without tool calls) or the loop's limits; the first submission is the one
scored (a second `submit_result` is an error result), and an attempt without one scores 0. The
attempt passes when the verifier gives it the full score, 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv32.agent.loop import AgentConfig, AgentLoop
from dsv32.agent.policy import Policy
from dsv32.agent.tool import Tool
from dsv32.engine import SamplingParams
from dsv32.synth.rl_env import EnvironmentRunner
from dsv32.synth.session import SubmitTool, agent_tools


@dataclass
class Attempt:
    score: float                   # the verifier's score of the submission; 0 without one
    reasons: list[str]             # the verifier's reasons (or why there is no score)
    submitted: str | None          # what the agent submitted
    end: str | None                # the episode's end reason (dsv32.agent.loop.END_REASONS)
    steps: int = 0
    tool_calls: int = 0
    completion_tokens: int = 0
    reasoning_chars: int = 0
    answer: str = field(default="", repr=False)   # the agent's closing message

    @property
    def passed(self) -> bool:
        return self.score == 1.0


def attempt(runner: EnvironmentRunner, directory: str, policy: Policy, sampling: SamplingParams,
            config: AgentConfig | None = None) -> Attempt:
    """One episode of `policy` in the environment saved in `directory`, scored."""
    loaded = runner.load(str(directory))
    submits: list[SubmitTool] = []

    def tools() -> list[Tool]:
        made, submit = agent_tools(loaded.env, loaded.tools.call)
        submits.append(submit)
        return made

    ep = AgentLoop(policy, tools, sampling, config).run(loaded.env.task)
    submitted = submits[-1].submitted if submits else None
    if submitted is None:
        score, reasons = 0.0, [f"nothing was submitted (the episode ended: {ep.end})"]
    else:
        score, reasons = runner.score(str(directory), submitted)
    reasoning = sum(len(m.get("reasoning_content") or "") for m in ep.log if m.get("role") == "assistant")
    return Attempt(score, reasons, submitted, ep.end, len(ep.steps), ep.tool_calls, ep.completion_tokens,
                   reasoning, ep.answer or "")
