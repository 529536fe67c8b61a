"""The fixed pieces of the DeepSeek-V3.2 chat format: special tokens, markup, the tools section.

V3.2 ships no Jinja template; DeepSeek's Python encoder (`encoding/encoding_dsv32.py` in the
Hugging Face repo) defines the format, and the texts below must match it byte for byte.
"""

import json

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML)

# Tool-call markup. The closing tags of invoke and parameter are matched without their final
# ">" (and the parameter end without its "<"), exactly as the official parser reads them.
CALLS_START = f"\n\n<{DSML}function_calls"
CALLS_END = f"</{DSML}function_calls>"
INVOKE_START = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke"
PARAM_START = f"<{DSML}parameter"
PARAM_END = f"/{DSML}parameter"

THINKING_MODES = ("thinking", "chat")

# The tools section as DeepSeek's encoder writes it today, blank lines between its paragraphs: the
# official encoding fixtures (search-agent trajectories included) render it so. Copies of the
# encoder taken in its first days (vLLM's, SGLang's) have the same text without the blank lines.
TOOLS_SECTION = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<｜DSML｜function_calls>" block like the following as part of your reply to the user:
<｜DSML｜function_calls>
<｜DSML｜invoke name="$FUNCTION_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$FUNCTION_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<｜DSML｜function_calls>
...
</｜DSML｜function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""

RESPONSE_FORMAT_SECTION = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)


class ChatFormatError(ValueError):
    """Messages that cannot be encoded, or a completion that does not parse.

    `offset` is the character offset in the completion text where parsing failed (None for
    encoding errors).
    """

    def __init__(self, what: str, offset: int | None = None):
        self.what, self.offset = what, offset
        super().__init__(what if offset is None else f"{what} at offset {offset}")


def to_json(value) -> str:
    """JSON the way the official encoder writes it: non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False)


def check_thinking_mode(thinking_mode: str) -> bool:
    """Validate the mode and return whether it is thinking mode."""
    if thinking_mode not in THINKING_MODES:
        raise ChatFormatError(f"thinking_mode must be 'thinking' or 'chat', got {thinking_mode!r}")
    return thinking_mode == "thinking"
