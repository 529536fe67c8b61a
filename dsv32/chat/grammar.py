"""What a chat request constrains its reply to, as a grammar: `response_format` (json_object,
json_schema) and a forced tool call (`tool_choice` "required" or a named function). Standard
library only: the text is llguidance's Lark dialect (JSON schemas inline as `%json{...}`, special
tokens by id as `<[id]>`), compiled and enforced by `dsv32.engine.grammar`.

The reply's whole text is in the grammar, down to the format's end token, so that what the engine
returns is a complete reply for the format's parser:
  V3.2, chat mode       {json}<｜end▁of▁sentence｜>
                        \\n\\n<｜DSML｜function_calls>\\n{invokes}\\n</｜DSML｜function_calls><｜end▁of▁sentence｜>
  V3.2, thinking mode   the same after {reasoning}</think> (the reasoning is free text)
(the converted family's ChatML form is in its own folder, built from the pieces here).
A DSML invoke is written as `dsv32.chat.encode.render_tool_calls` writes it: one parameter per line
in the order of the tool's schema, the required ones always, the others optionally. A parameter
whose schema type is "string" is raw text (string="true"; an `enum`, `const` or `pattern` is
followed, `minLength` / `maxLength` bound it, and it cannot contain "</"); any other is JSON
following its schema (string="false"). JSON is written compactly, with ", " and ": " separators
(what `json.dumps` writes), never with free whitespace.
"""

import json

from dsv32.chat.format import (
    CALLS_END, CALLS_START, DSML, EOS, INVOKE_END, INVOKE_START, PARAM_END, PARAM_START, THINK_END, ChatFormatError,
)

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def literal(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text)


def json_rule(schema: dict, defs: dict | None = None) -> str:
    """An inline JSON-schema lexeme, compact, with the top schema's definitions carried along."""
    if not isinstance(schema, dict):
        raise ChatFormatError(f"a JSON schema must be an object, got {schema!r}")
    schema = {**schema, **(defs or {}), "x-guidance": JSON_STYLE}
    return "%json" + json.dumps(schema)


def _defs(schema: dict) -> dict:
    return {k: schema[k] for k in ("$defs", "definitions") if k in schema}


class GrammarRules:
    """Rules of one Lark grammar, with the special tokens of the vocabulary by id."""

    def __init__(self, special_ids: dict[str, int | None]):
        self.special_ids, self.rules = special_ids, {}

    def token(self, text: str) -> str:
        token_id = self.special_ids.get(text)
        if token_id is None:
            raise ChatFormatError(f"this vocabulary has no single token {text!r}, which the grammar needs")
        return f"<[{token_id}]>"

    def rule(self, name: str, body: str, lazy: bool = False) -> str:
        self.rules[name + ("[lazy]" if lazy else "")] = body
        return name

    def text(self, start: str) -> str:
        return "\n".join([f"start: {start}"] + [f"{k}: {v}" for k, v in self.rules.items()])

    def markup(self, text: str) -> str:
        """A V3.2 markup string, its DSML marker as the special token."""
        parts = text.split(DSML)
        out = []
        for i, part in enumerate(parts):
            if i:
                out.append(self.token(DSML))
            if part:
                out.append(literal(part))
        return " ".join(out)


def _raw_string(g: GrammarRules, name: str, schema: dict) -> str:
    """A string parameter's raw value and the '</' that closes it."""
    if "const" in schema or "enum" in schema:
        options = [schema["const"]] if "const" in schema else schema["enum"]
        if not options or not all(isinstance(o, str) for o in options):
            raise ChatFormatError(f"parameter {name!r}: a string enum must list strings")
        return "(" + " | ".join(literal(o) for o in options) + ") " + literal("</")
    if "pattern" in schema:
        pattern = schema["pattern"].removeprefix("^").removesuffix("$")
        return g.rule(f"p{len(g.rules)}", f"/{pattern.replace('/', chr(92) + '/')}/") + " " + literal("</")
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    count = "*" if (lo, hi) == (0, None) else f"{{{lo},{'' if hi is None else hi}}}"
    return g.rule(f"p{len(g.rules)}", f"/(?s:.{count})<\\//", lazy=True)


def _dsml_invoke(g: GrammarRules, fn: dict) -> str:
    """One invoke of tool `fn` ({"name", "parameters"}), as render_tool_calls writes it."""
    name, schema = fn["name"], fn.get("parameters") or {}
    props, required = schema.get("properties") or {}, set(schema.get("required") or ())
    lines = []
    for key, sub in props.items():
        raw = isinstance(sub, dict) and sub.get("type") == "string"
        head = g.markup(f'{PARAM_START} name="{key}" string="{"true" if raw else "false"}">')
        value = _raw_string(g, key, sub) if raw else json_rule(sub, _defs(schema)) + " " + literal("</")
        line = f"{head} {value} {g.markup(PARAM_END.removeprefix('/') + '>' + chr(10))}"
        lines.append(f"({line})" + ("" if key in required else "?"))
    missing = required - set(props)
    if missing:
        raise ChatFormatError(f"tool {name!r}: required parameters {sorted(missing)} have no schema")
    head = g.markup(f'{INVOKE_START} name="{name}">\n' + ("" if props else "\n"))  # as rendered with no arguments
    return g.rule(f"invoke{len(g.rules)}", " ".join([head, *lines, g.markup(INVOKE_END + ">")]))


def forced_tools(tools: list[dict] | None, tool_choice) -> list[dict] | None:
    """The functions a tool_choice forces one of ({"name", "parameters"} each), or None when it
    forces none ("auto", "none", absent). ChatFormatError for a choice that cannot hold."""
    if tool_choice in (None, "auto", "none"):
        return None
    fns = [t["function"] for t in tools or []]
    if tool_choice == "required":
        if not fns:
            raise ChatFormatError('tool_choice "required" needs at least one tool')
        return fns
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [f for f in fns if f["name"] == name]
        if not chosen:
            raise ChatFormatError(f"tool_choice names {name!r}, which is not among the tools")
        return chosen
    raise ChatFormatError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}")


def response_json_schema(response_format: dict | None) -> dict | None:
    """The JSON schema a response_format asks for ({"type": "object"} for json_object), or None."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    if response_format["type"] == "json_object":
        return {"type": "object"}
    if response_format["type"] == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ChatFormatError("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise ChatFormatError(f"response_format type {response_format['type']!r} is not one of text, json_object, json_schema")


def chat_grammar(special_ids: dict[str, int | None], *, thinking: bool = False,
                 response_format: dict | None = None, tools: list[dict] | None = None,
                 tool_choice=None, parallel_tool_calls: bool = True) -> str | None:
    """The grammar a V3.2 chat request's reply must follow, or None if it is free (another family's
    format has its own, reached through its tokenizer's `reply_grammar`).

    special_ids: special token text -> id in the vocabulary (the DSML marker, EOS, `</think>`); the
    other arguments as in the OpenAI request (tools in OpenAI's format). A forced call is one call
    for a named function or without parallel_tool_calls, else one or more."""
    schema, fns = response_json_schema(response_format), forced_tools(tools, tool_choice)
    if schema is not None and fns is not None:
        raise ChatFormatError("a JSON response_format and a forced tool call cannot both hold: choose one")
    if schema is None and fns is None:
        return None
    g = GrammarRules(special_ids)
    several = parallel_tool_calls and tool_choice == "required"
    if schema is not None:
        body = json_rule(schema)
    else:
        invoke = " | ".join(_dsml_invoke(g, fn) for fn in fns)
        # every "<" before a DSML marker starts its own literal: the lexer then never has to split
        # one literal ("\n</") into two ("\n", "<") when the special token arrives
        nl = literal("\n")
        more = f"({nl} ({invoke}))*" if several else ""
        body = " ".join([g.markup(CALLS_START + ">"), nl, f"({invoke})", more, nl, g.markup(CALLS_END)])
    reasoning = f"{g.rule('reasoning', '/(?s:.*)/')} {g.token(THINK_END)} " if thinking else ""
    return g.text(f"{reasoning}{body} {g.token(EOS)}")
