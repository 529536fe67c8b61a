"""Math prompt, boxed-answer extraction, Speciale profile, and the stdlib-only import."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv32.chat import SPECIALE, V32, ChatFormatError, encode_messages, extract_boxed, math_prompt

E = "<｜end▁of▁sentence｜>"


def test_math_prompt_is_the_paper_template():
    assert math_prompt("What is 1+1?") == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1}, then \\boxed{x^{2}+{y}}", "x^{2}+{y}"),
        ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{7} and an unfinished \\boxed{8", "7"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("no box here", None),
        ("\\boxed{}", ""),
    ],
)
def test_extract_boxed(text, answer):
    assert extract_boxed(text) == answer


WEATHER = {"type": "function", "function": {"name": "w", "parameters": {}}}


def test_speciale_is_v32_without_tools():
    messages = [{"role": "user", "content": math_prompt("1+1?")}]
    assert SPECIALE.encode(messages) == V32.encode(messages) == encode_messages(messages)
    assert SPECIALE.parse("think</think>\\boxed{2}" + E)["content"] == "\\boxed{2}"
    call = {"type": "function", "function": {"name": "w", "arguments": "{}"}}
    for bad in (
        [{"role": "system", "content": "", "tools": [WEATHER]}] + messages,
        messages + [{"role": "assistant", "reasoning_content": "r", "tool_calls": [call]}],
        messages + [{"role": "tool", "content": "x"}],
    ):
        with pytest.raises(ChatFormatError, match="does not support tool calling"):
            SPECIALE.encode(bad)
    with pytest.raises(ChatFormatError, match="does not support tool calling"):
        SPECIALE.encode(messages, tools=[WEATHER])
    completion = f'</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="w">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls>{E}'
    assert V32.parse(completion)["tool_calls"] == [call]
    with pytest.raises(ChatFormatError, match="calls a tool"):
        SPECIALE.parse(completion)


def test_import_uses_the_standard_library_only():
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import dsv32.chat\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'dsv32'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
