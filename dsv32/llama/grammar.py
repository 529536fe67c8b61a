"""What a chat request constrains a ChatML reply to (SmolLM2's format, `dsv32.llama.chatml`), as a
grammar in llguidance's Lark dialect, built from the V3.2 grammar's pieces (`dsv32.chat.grammar`):
  response_format     {json}<|im_end|>
  a forced tool call  <tool_call>[\\n{"name": ..., "arguments": {...}},\\n...\\n]</tool_call><|im_end|>
JSON is written compactly, as `json.dumps` writes it.
"""

import json

from dsv32.chat import ChatFormatError
from dsv32.chat.grammar import GrammarRules, forced_tools, json_rule, literal, response_json_schema
from dsv32.llama.chatml import IM_END, TOOL_CALL_END, TOOL_CALL_START

CALL_START, CALL_END = TOOL_CALL_START + "[\n", "\n]" + TOOL_CALL_END   # as render_chatml_tool_calls writes them


def _call(g: GrammarRules, fn: dict) -> str:
    schema = fn.get("parameters") or {"type": "object"}
    head = literal('{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ')
    return g.rule(f"call{len(g.rules)}", f"{head} {json_rule(schema)} {literal('}')}")


def chatml_grammar(special_ids: dict[str, int | None], *, thinking: bool = False,
                   response_format: dict | None = None, tools: list[dict] | None = None,
                   tool_choice=None, parallel_tool_calls: bool = True) -> str | None:
    """The grammar a ChatML reply must follow, or None if it is free; arguments as for
    `dsv32.chat.grammar.chat_grammar` (special_ids: `<|im_end|>`'s id)."""
    schema, fns = response_json_schema(response_format), forced_tools(tools, tool_choice)
    if schema is not None and fns is not None:
        raise ChatFormatError("a JSON response_format and a forced tool call cannot both hold: choose one")
    if schema is None and fns is None:
        return None
    if thinking:
        raise ChatFormatError("this model's chat format (ChatML) has no thinking mode")
    g = GrammarRules(special_ids)
    if schema is not None:
        return g.text(f"{json_rule(schema)} {g.token(IM_END)}")
    calls = " | ".join(_call(g, fn) for fn in fns)
    more = f"({literal(',' + chr(10))} ({calls}))*" if parallel_tool_calls and tool_choice == "required" else ""
    return g.text(f"{literal(CALL_START)} ({calls}) {more} {literal(CALL_END)} {g.token(IM_END)}")
