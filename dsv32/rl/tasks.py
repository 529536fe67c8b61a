"""Tasks for RL: verifiable generators (multi-step arithmetic, with or without a calculator tool),
tasks from JSONL, and the per-domain mix of one mixed RL stage (spec §2.1: reasoning, agent and
alignment tasks in one GRPO stage, each domain with its own reward and KL strength).
"""

import ast
import json
import operator
import random
from dataclasses import dataclass, field
from pathlib import Path

from dsv32.chat import math_prompt

GRADERS = ("boxed", "exact", "code", "rm", "proof", "verifier")


@dataclass
class Task:
    domain: str
    messages: list[dict]                  # the prompt conversation
    grader: str = "boxed"                 # boxed | exact | code | rm (generative reward model) | proof | verifier
    answer: str | None = None             # boxed / exact
    tests: str | None = None              # code: Python asserting the solution's behaviour
    rubric: str | None = None             # rm: what a good answer does
    tools: list[dict] | None = None       # OpenAI-format tools the policy may call
    thinking_mode: str = "chat"
    language: str | None = "en"           # language-consistency target (None: no such reward)
    solution: list[dict] | None = None    # reference assistant/tool turns (SFT warm-start)
    # verifier: the synthesized environment (its directory) whose tools the policy calls and whose
    # verifier scores what it submits; the environment runner (`dsv32.synth.rl_env`) writes that
    # score into `verdict` of the trajectory's own copy of the task (None: nothing submitted yet)
    environment: str | None = None
    verdict: float | None = None

    def __post_init__(self):
        if self.grader not in GRADERS:
            raise ValueError(f"task grader must be one of {', '.join(GRADERS)}, got {self.grader!r}")
        if self.grader == "verifier" and not self.environment:
            raise ValueError(f"task of domain {self.domain!r} has grader 'verifier' but no environment")


# ---- a calculator tool ----

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression exactly.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
    """Integer arithmetic (+ - * // % and parentheses) without eval; errors come back as text,
    as a tool result would."""
    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 10**12:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("unsupported expression")
    try:
        return str(ev(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as e:
        return f"error: {e}"


def run_tool(call: dict) -> str:
    """Execute one parsed tool call ({"function": {"name", "arguments": JSON string}})."""
    name = call["function"]["name"]
    try:
        args = json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        return "error: arguments are not JSON"
    if name == "calculator" and isinstance(args.get("expression"), str):
        return calculate(args["expression"])
    return f"error: unknown tool or bad arguments for {name!r}"


# ---- multi-step arithmetic ----

def arithmetic_steps(terms: list[int], ops: list[str]) -> list[str]:
    """The expression rewritten one operation at a time (products first, then left to right)."""
    terms, ops, out = list(terms), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, b = terms[i], terms[i + 1]
        terms[i:i + 2] = [a * b if ops[i] == "*" else a + b if ops[i] == "+" else a - b]
        del ops[i]
        out.append("".join(str(t) + o for t, o in zip(terms, ops + [""])))
    return out


def arithmetic_task(rng: random.Random, min_terms: int = 2, max_terms: int = 4, max_operand: int = 9,
                    tool: bool = False) -> Task:
    """'What is 3+4*2-5?' with an exact integer answer. The reference solution rewrites the
    expression step by step, or (tool=True, thinking mode) calls the calculator, then boxes."""
    n = rng.randint(min_terms, max_terms)
    terms = [rng.randint(0, max_operand) for _ in range(n)]
    ops = [rng.choice("+-*") for _ in range(n - 1)]
    expr = "".join(str(t) + o for t, o in zip(terms, ops + [""]))
    steps = arithmetic_steps(terms, ops)
    answer = steps[-1] if steps else expr
    user = {"role": "user", "content": math_prompt(f"What is {expr}?")}
    if not tool:
        text = " = ".join([expr] + steps) + f". \\boxed{{{answer}}}"
        return Task("arithmetic", [user], answer=answer, solution=[{"role": "assistant", "content": text}])
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expr}}}
    solution = [
        {"role": "assistant", "reasoning_content": "I use the calculator.", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": answer},
        {"role": "assistant", "reasoning_content": f"The calculator says {answer}.", "content": f"\\boxed{{{answer}}}"},
    ]
    return Task("arithmetic-tool", [{"role": "system", "content": "", "tools": [CALCULATOR]}, user], answer=answer,
                tools=[CALCULATOR], thinking_mode="thinking", solution=solution)


GENERATORS = {
    "arithmetic": lambda rng: arithmetic_task(rng),
    "arithmetic-tool": lambda rng: arithmetic_task(rng, tool=True),
}


def load_tasks(path: str | Path) -> list[Task]:
    """JSONL rows: {"domain", "messages" (or "prompt"), "grader", "answer" | "tests" | "rubric",
    optional "tools", "thinking_mode", "language"}."""
    tasks = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" not in row and "prompt" not in row:
            raise ValueError(f"{Path(path).name}:{n}: a task needs 'messages' or 'prompt'")
        messages = row.pop("messages", None) or [{"role": "user", "content": row.pop("prompt")}]
        row.pop("prompt", None)
        tasks.append(Task(messages=messages, domain=row.pop("domain", "general"), **row))
    return tasks


@dataclass
class Domain:
    """One domain of the mix: its share of prompts and its KL strength (0 allowed)."""
    name: str
    beta: float = 0.0
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "Domain":
        """'name', 'name:beta' or 'name:beta:weight'."""
        parts = spec.split(":")
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise ValueError(f"domain spec must be name[:beta[:weight]], got {spec!r}")
        try:
            return cls(parts[0], *(float(p) for p in parts[1:]))
        except ValueError:
            raise ValueError(f"domain spec {spec!r}: beta and weight must be numbers") from None


@dataclass
class TaskMix:
    """Draws prompts: a domain by weight, then a task from its generator or its pool (JSONL)."""
    domains: list[Domain]
    pools: dict[str, list[Task]] = field(default_factory=dict)

    def __post_init__(self):
        for d in self.domains:
            if d.name not in GENERATORS and not self.pools.get(d.name):
                raise ValueError(f"domain {d.name!r} has neither a generator ({', '.join(GENERATORS)}) "
                                 "nor tasks in the tasks file")
            if d.beta < 0 or d.weight <= 0:
                raise ValueError(f"domain {d.name!r}: beta must be >= 0 and weight > 0")

    def beta(self, name: str) -> float:
        return next(d.beta for d in self.domains if d.name == name)

    def sample(self, rng: random.Random, n: int) -> list[Task]:
        picks = rng.choices(self.domains, weights=[d.weight for d in self.domains], k=n)
        return [rng.choice(self.pools[d.name]) if self.pools.get(d.name) else GENERATORS[d.name](rng)
                for d in picks]
