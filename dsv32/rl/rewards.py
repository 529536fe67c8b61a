"""Rewards (spec §2.1): a rule-based outcome (exact answer, `\\boxed{}` math grading, unit tests
run in a sandboxed subprocess), a length penalty and a language-consistency reward, combined per
domain; a generative reward model with per-prompt rubrics for tasks with no rule; and the
self-verification reward of proofs (DeepSeekMath-V2, used by V3.2-Speciale; spec §6).

The paper does not give the functional forms or weights of the penalty and consistency terms;
ours are stated at each function.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction

from dsv32.chat import extract_boxed
from dsv32.eval.proof import parse_score as parse_proof_score
from dsv32.eval.proof import split_self_evaluation, verify_messages

# ---- outcome rules ----


def normalise(answer: str) -> str:
    """Whitespace, a trailing period, surrounding $ and \\text{} wrappers removed."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s


def _number(s: str) -> Fraction | None:
    """An exact value for integers, decimals, a/b and \\frac{a}{b} (also \\dfrac), else None."""
    s = s.replace(",", "")
    m = re.fullmatch(r"(-?)\\d?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        return None if int(m[3]) == 0 else Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1)
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    if m:
        return None if int(m[2]) == 0 else Fraction(int(m[1]), int(m[2]))
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def exact_answer(prediction: str, answer: str) -> float:
    """1 if the answers are equal after normalisation, else 0."""
    return float(normalise(prediction) == normalise(answer))


def boxed_math(text: str, answer: str) -> float:
    """1 if the last complete \\boxed{} in text holds the answer: equal as normalised strings, or
    as exact numbers (0.5 = 1/2 = \\frac{1}{2}); 0 if there is no box."""
    boxed = extract_boxed(text)
    if boxed is None:
        return 0.0
    a, b = normalise(boxed), normalise(answer)
    if a == b:
        return 1.0
    x, y = _number(a), _number(b)
    return float(x is not None and x == y)


def extract_code(text: str) -> str:
    """The last fenced code block (```python or ```), else the whole text."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", text, re.DOTALL)
    return blocks[-1] if blocks else text


# The child bounds its own memory and core files before it runs the program (no preexec_fn,
# which is unsafe in a threaded parent).
_RUNNER = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({m}, {m})); "
           "resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); runpy.run_path(sys.argv[1], run_name='__main__')")


def unit_tests(code: str, tests: str, timeout: float = 5.0, memory_mb: int = 1024) -> float:
    """1 if `code` followed by `tests` (asserts) runs to completion in a fresh isolated Python
    (`-I`: no site, no user paths, no environment) in an empty temporary directory, within
    `timeout` seconds and `memory_mb`; 0 on any failure, crash or timeout. A sandbox against
    accidents and runaway loops, not against a hostile program (use a container for that)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "solution.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code + "\n\n" + tests + "\n")
        posix = os.name == "posix"
        cmd = ["-c", _RUNNER.format(m=memory_mb << 20)] if posix else []
        proc = subprocess.Popen([sys.executable, "-I", *cmd, path], cwd=tmp, env={}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=posix)
        try:
            return float(proc.wait(timeout=timeout) == 0)
        except subprocess.TimeoutExpired:  # the program and anything it started
            os.killpg(proc.pid, signal.SIGKILL) if posix else proc.kill()
            proc.wait()
            return 0.0


# ---- shaping terms ----


def length_penalty(n_tokens: int, max_tokens: int, buffer: int) -> float:
    """0 up to max_tokens - buffer, then linearly down to -1 at max_tokens (DAPO's soft overlong
    penalty; the paper's form is not published)."""
    if buffer <= 0 or n_tokens <= max_tokens - buffer:
        return 0.0
    return -min(1.0, (n_tokens - (max_tokens - buffer)) / buffer)


_SCRIPTS = {
    "en": re.compile(r"[A-Za-z]"),
    "zh": re.compile(r"[\u4e00-\u9fff]"),
}
_LETTER = re.compile(r"[^\W\d_]")


def language_consistency(text: str, language: str) -> float:
    """Share of the letters in text written in the target language's script (1.0 for a text with
    no letters): DeepSeek-R1's form, the proportion of target-language words, by script."""
    if language not in _SCRIPTS:
        raise ValueError(f"language must be one of {', '.join(_SCRIPTS)}, got {language!r}")
    letters = _LETTER.findall(text)
    if not letters:
        return 1.0
    return sum(bool(_SCRIPTS[language].match(c)) for c in letters) / len(letters)


# ---- a generative reward model ----


class GenerativeRM:
    """Scores a response against a per-prompt rubric with any OpenAI-compatible chat endpoint.

    The judge is asked for a JSON object {"score": s} with s in [0, 10]; the reward is s / 10
    (0 if the reply has no such score). `client` may be passed (e.g. an openai.OpenAI over a test
    transport); otherwise one is made for base_url."""

    PROMPT = ("You grade a response against a rubric.\n\n# Rubric\n{rubric}\n\n# Prompt\n{prompt}\n\n"
              "# Response\n{response}\n\nReply with only a JSON object {{\"score\": s}}, s from 0 to 10.")

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, client=None,
                 temperature: float = 0.0):
        if client is None:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"))
        self.client, self.model, self.temperature = client, model, temperature

    def __call__(self, prompt: str, response: str, rubric: str) -> float:
        return parse_score(self.chat([{"role": "user", "content": self.PROMPT.format(
            rubric=rubric, prompt=prompt, response=response)}]))

    def chat(self, messages: list[dict]) -> str:
        """The judge's reply (its content, without reasoning) to a conversation."""
        reply = self.client.chat.completions.create(model=self.model, temperature=self.temperature, messages=messages)
        return reply.choices[0].message.content or ""


def parse_score(text: str) -> float:
    """The judge's score / 10 from its JSON reply (the last {...} holding "score"), clamped to [0, 1]."""
    for m in reversed(re.findall(r"\{[^{}]*\}", text)):
        try:
            s = json.loads(m).get("score")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(s, (int, float)):
            return min(1.0, max(0.0, s / 10))
    return 0.0


# ---- the self-verification reward of proofs ----

ALPHA, BETA = 0.76, 0.24   # DeepSeekMath-V2's weights of the proof and of the self-analysis


def self_verification_reward(format_ok: bool, proof_score: float, self_score: float, meta: float = 1.0,
                             alpha: float = ALPHA, beta: float = BETA) -> float:
    """R = R_format(Y, Z) · (α·R_Y + β·R_Z), DeepSeekMath-V2's generator reward (spec §6), where
    R_Y = s, the verifier's score of the proof Y; R_Z = R_score(s', s) · R_meta(Z), with
    R_score(s', s) = 1 − |s' − s| rewarding a self-score s' that agrees with the verifier, and
    R_meta in [0, 1] a meta-verifier's judgement that the issues Z names are real (1 without one);
    R_format is 1 when the answer has both parts in the required form, else 0."""
    for name, v in (("proof_score", proof_score), ("self_score", self_score), ("meta", meta)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if not format_ok:
        return 0.0
    return alpha * proof_score + beta * (1.0 - abs(self_score - proof_score)) * meta


def proof_outcome(problem: str, answer_text: str, verifier) -> float:
    """The self-verification reward of a generator's answer (proof, `## Self-evaluation`, analysis
    ending in \\boxed{s'}), with `verifier` (messages -> reply text) scoring the proof. No
    meta-verifier: R_meta = 1. A verifier reply without a strict score counts as s = 0."""
    proof, analysis, self_score = split_self_evaluation(answer_text)
    if analysis is None or self_score is None:
        return self_verification_reward(False, 0.0, 0.0)
    s = parse_proof_score(verifier(verify_messages(problem, proof)))
    return self_verification_reward(True, s or 0.0, self_score)


# ---- combined per domain ----


@dataclass
class RewardConfig:
    """How a domain's reward is put together: outcome + length penalty + language consistency."""
    length_weight: float = 1.0
    length_buffer: int = 0                # tokens before the limit where the penalty ramps in (0 = off)
    language_weight: float = 0.0
    code_timeout: float = 5.0


def outcome(task, answer_text: str, rm: GenerativeRM | None = None) -> float:
    """The rule-based (or generative) outcome reward of a final answer for a task."""
    if task.grader == "boxed":
        return boxed_math(answer_text, task.answer)
    if task.grader == "exact":
        return exact_answer(answer_text, task.answer)
    if task.grader == "code":
        return unit_tests(extract_code(answer_text), task.tests)
    if task.grader == "verifier":  # the environment's verifier scored the submission during the rollout
        return task.verdict or 0.0
    if rm is None:
        raise ValueError(f"task of domain {task.domain!r} needs a generative reward model (--rm-url)")
    prompt = next((m["content"] for m in reversed(task.messages) if m["role"] == "user"), "")
    if task.grader == "proof":  # the reward model is the proof verifier; the problem is the last user turn
        return proof_outcome(prompt, answer_text, rm.chat)
    return rm(prompt, answer_text, task.rubric or "A helpful, correct and honest answer.")


def reward(task, answer_text: str, full_text: str, n_tokens: int, max_tokens: int, cfg: RewardConfig,
           rm: GenerativeRM | None = None) -> dict:
    """{'reward', 'outcome', 'length', 'language'}: reward = outcome + w_len * length penalty
    + w_lang * (language consistency of everything the policy wrote, reasoning included)."""
    out = outcome(task, answer_text, rm)
    length = length_penalty(n_tokens, max_tokens, cfg.length_buffer)
    lang = language_consistency(full_text, task.language) if task.language and cfg.language_weight else 1.0
    total = out + cfg.length_weight * length + (cfg.language_weight * lang if task.language else 0.0)
    return {"reward": total, "outcome": out, "length": length, "language": lang}
