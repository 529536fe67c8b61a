"""The acceptance check of an environment (spec §5: "the solution's output must pass the
verifier"): run the solution through the tools alone, in a sandbox without the database, and
give its result to the verifier.

An environment is accepted when the solution returned a result, made at least one tool call
(a solution that makes none did not use the environment: its answer was written in), and the
verifier scores that result 1.0. Otherwise the check says why, in words the synthesis loop
sends back to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsv32.agent.sandbox import Sandbox
from dsv32.synth.environment import Environment
from dsv32.synth.runner import (
    CodeError,
    LocalTools,
    SandboxedTools,
    local_verify,
    run_solution,
    run_verifier,
)


@dataclass
class Check:
    accepted: bool
    reason: str              # why not, or "accepted"
    calls: int = 0           # the solution's tool calls
    score: float = 0.0       # the verifier's score of the solution's result
    result: str | None = None


def check_environment(env: Environment, root: str | Path, *, trusted: bool = False, unsafe_no_sandbox: bool = False,
                      timeout: float = 120.0) -> Check:
    """Check `env`; sandboxes go under `root` and are removed after. `trusted` (the programmatic
    families' own code) runs the tools and the verifier here; else they run in sandboxes too."""
    boxes: list[Sandbox] = []

    def box(name: str) -> Sandbox:
        boxes.append(Sandbox(root, name, unsafe_no_sandbox=unsafe_no_sandbox))
        return boxes[-1]

    tools = None
    try:
        try:
            tools = (LocalTools(env.tools_code, env.db_path) if trusted
                     else SandboxedTools(box("tools"), env.tools_code, env.db_path))
        except (CodeError, SyntaxError) as e:
            return Check(False, f"the tools do not load: {e}")
        run = run_solution(box("solution"), env.solution_code, env.params, tools.call, timeout=timeout)
        if run.error is not None:
            return Check(False, f"the solution failed: {run.error}", run.calls)
        if run.calls == 0:
            return Check(False, "the solution made no tool call: it must get its facts through the tools", 0,
                         result=run.result)
        try:
            score, reasons = (local_verify(env.verifier_code, run.result, env.params, env.db_path) if trusted else
                              run_verifier(box("verifier"), env.verifier_code, run.result, env.params, env.db_path,
                                           timeout=timeout))
        except Exception as e:  # noqa: BLE001 -- a verifier that crashes, or answers outside the contract
            return Check(False, f"the verifier failed: {type(e).__name__}: {e}", run.calls, result=run.result)
        if score < 1.0:
            why = "; ".join(reasons) or "no reason given"
            return Check(False, f"the verifier scored the solution's result {score:g}: {why}", run.calls, score,
                         run.result)
        return Check(True, "accepted", run.calls, score, run.result)
    finally:
        if tools is not None:
            tools.close()
        for b in boxes:
            b.remove()
