"""A run's config dataclass as command-line flags: one --flag per field, its help text the
field's own comment, its default the field's default, and `--config FILE` (TOML or JSON) under
the flags.

The comments stay where a reader of the dataclass looks for them:

    seq_len: int = 256                    # tokens per training window
    # several lines of comment directly above a field
    # document it too
    lr: float | None = None

`field_docs` reads them back from the source (tokenize + ast), so the dataclass needs no
`metadata={"help": ...}` and the help never drifts from the comment.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import tomllib
from pathlib import Path


def field_docs(cls) -> dict[str, str]:
    """{field name: its comment} for a dataclass: the comment at the end of the field's line, or the
    comment lines directly above it (joined); fields without a comment are left out."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen build): no help text, flags still work
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    docs = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and n not in code_lines:  # a block of comment-only lines
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(above + trailing).strip()
        if text:
            docs[node.target.id] = text
    return docs


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One --flag per field of `cls` (lists take several values, bools are --flag / --no-flag),
    each with its comment and default as help, parsed to None when not given (so a --config file
    and the dataclass defaults show through), and --config FILE."""
    docs = field_docs(cls)
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of these options (names as "
                        "below, with _ or -); flags given on the command line override it")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = default_of(f)
        shown = ("none" if default is None or default == [] else
                 " ".join(map(str, default)) if isinstance(default, list) else default)
        text = f"{docs.get(f.name, '')} (default: {shown})".strip().replace("%", "%%")
        kind = str(f.type)
        if kind.startswith("list"):
            parser.add_argument(flag, dest=f.name, nargs="+", help=text)
        elif kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            typ = int if "int" in kind else float if "float" in kind else str
            parser.add_argument(flag, dest=f.name, type=typ, help=text, metavar=f.name.upper())


def read_config_file(path: str | Path) -> dict:
    """The options in a .toml or .json file, as a flat table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path} is not valid TOML: {e}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"--config {path}: expected a .toml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a table of options, not {type(data).__name__}")
    return data


def config_values(cls, args: argparse.Namespace, skip=()) -> dict:
    """The field values of `cls` that the user set: those of --config FILE (names checked), then
    the flags given on the command line over them."""
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    values = {}
    if getattr(args, "config", None):
        data = {k.replace("-", "_"): v for k, v in read_config_file(args.config).items()}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"--config {args.config}: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(names))})")
        kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for k, v in data.items():
            _check_type(args.config, k, kinds[k], v)
        values.update(data)
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return values


def _check_type(path, name: str, kind: str, value) -> None:
    """A --config value of the field's type (its annotation as written: int, float | None, list[str]...)."""
    if value is None and "None" in kind:
        return
    ok = {"bool": lambda v: isinstance(v, bool), "list": lambda v: isinstance(v, list),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}
    base = next((b for b in ("list", "bool", "int", "float", "str") if kind.startswith(b)), None)
    if base and not ok[base](value):
        raise ValueError(f"--config {path}: {name} must be {kind}, got {value!r}")
