"""Tasks for RL: verifiable generators (multi-step arithmetic, with or without a calculator tool),
tasks from JSONL, and the per-domain mix of one mixed RL stage (spec §2.1: reasoning, agent and
alignment tasks in one GRPO stage, each domain with its own reward and KL strength).
"""

import ast
import hashlib
import json
import operator
import random
from dataclasses import dataclass, field, replace
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

_TWO_DIGITS = range(10, 100)

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


def arithmetic_task(rng: random.Random, min_terms: int = 2, max_terms: int = 4, operands: range = range(10),
                    tool: bool = False) -> Task:
    """'What is 3+4*2-5?' with an exact integer answer. The reference solution rewrites the
    expression step by step, or (tool=True, thinking mode) calls the calculator, then boxes."""
    n = rng.randint(min_terms, max_terms)
    terms = [operands[rng.randrange(len(operands))] for _ in range(n)]
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
    # out of distribution for a policy trained on the two above: longer expressions (5-6 terms),
    # and two-digit operands; no prompt of theirs can be one of 2-4 one-digit terms
    "arithmetic-long": lambda rng: replace(arithmetic_task(rng, 5, 6), domain="arithmetic-long"),
    "arithmetic-2digit": lambda rng: replace(arithmetic_task(rng, 2, 3, _TWO_DIGITS), domain="arithmetic-2digit"),
}
OOD_DOMAINS = ("arithmetic-long", "arithmetic-2digit")


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


def prompt_text(task: Task) -> str:
    """The prompt as a reader compares prompts: its user turns' text, whitespace collapsed and
    case folded (a system turn's tool list does not make 'What is 3+4?' another question)."""
    return "\n".join(" ".join(str(m.get("content") or "").split()).casefold()
                     for m in task.messages if m.get("role") == "user")


def prompt_hash(task: Task) -> str:
    """sha256 (hex) of prompt_text: what held-out prompts are excluded from training by."""
    return hashlib.sha256(prompt_text(task).encode("utf-8")).hexdigest()


MAX_REDRAWS = 1000  # draws of one excluded prompt after another before TaskMix.sample gives up


@dataclass
class TaskMix:
    """Draws prompts: a domain by weight, then a task from its generator or its pool (JSONL).
    A prompt whose hash (prompt_hash) is in `exclude` (held-out prompts) is never drawn: a
    generator draws again, a pool leaves it out. `seen` collects the hash of every prompt drawn,
    so a run can count what its training streams shared with its held-out sets."""
    domains: list[Domain]
    pools: dict[str, list[Task]] = field(default_factory=dict)
    exclude: frozenset = frozenset()
    seen: set = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self):
        self.exclude = frozenset(self.exclude)
        if self.exclude:
            self.pools = {k: [t for t in v if prompt_hash(t) not in self.exclude] for k, v in self.pools.items()}
        for d in self.domains:
            if d.name not in GENERATORS and not self.pools.get(d.name):
                raise ValueError(f"domain {d.name!r} has neither a generator ({', '.join(GENERATORS)}) "
                                 "nor tasks in the tasks file" + (" outside the excluded held-out prompts"
                                                                  if self.exclude else ""))
            if d.beta < 0 or d.weight <= 0:
                raise ValueError(f"domain {d.name!r}: beta must be >= 0 and weight > 0")

    def beta(self, name: str) -> float:
        return next(d.beta for d in self.domains if d.name == name)

    def excluding(self, hashes) -> "TaskMix":
        """The same mix, never drawing a prompt whose hash is in `hashes` (nor in self.exclude)."""
        return TaskMix(self.domains, self.pools, self.exclude | frozenset(hashes))

    def sample(self, rng: random.Random, n: int) -> list[Task]:
        picks = rng.choices(self.domains, weights=[d.weight for d in self.domains], k=n)
        out = [self._draw(rng, d) for d in picks]
        self.seen.update(prompt_hash(t) for t in out)
        return out

    def _draw(self, rng: random.Random, d: Domain) -> Task:
        if self.pools.get(d.name):
            return rng.choice(self.pools[d.name])
        for _ in range(MAX_REDRAWS):
            task = GENERATORS[d.name](rng)
            if not self.exclude or prompt_hash(task) not in self.exclude:
                return task
        raise ValueError(f"domain {d.name!r}: {MAX_REDRAWS} draws in a row were excluded held-out prompts; "
                         "the held-out sets cover (nearly) all of its prompts")


def held_out_split(mix: TaskMix, n: int, seed: int = 12345, exclude=frozenset()) -> list[Task]:
    """n distinct prompts of `mix` (by prompt_hash), drawn with their own seed and none of whose
    hashes is in `exclude`: a held-out set. Training mixes then exclude their hashes."""
    rng, out, hashes = random.Random(seed), [], set(exclude)
    draw = TaskMix(mix.domains, mix.pools)  # its own `seen`: held-out draws are not training draws
    for _ in range(MAX_REDRAWS * max(1, n)):
        if len(out) == n:
            break
        task = draw.sample(rng, 1)[0]
        if (h := prompt_hash(task)) not in hashes:
            hashes.add(h)
            out.append(task)
    if len(out) == n:
        return out
    raise ValueError(f"the mix has fewer than {n} distinct prompts outside the excluded ones "
                     f"(found {len(out)}): ask for a smaller held-out set")
