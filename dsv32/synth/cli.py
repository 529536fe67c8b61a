"""`dsv32 synth KIND ...`: one subcommand per kind of synthesized task. Each kind's module has
`add_arguments(parser)` and `run(args) -> int`; they are imported only when their command runs."""

from __future__ import annotations

import argparse
import importlib

KINDS = {  # name -> (module, one line of help)
    "code": ("dsv32.synth.code_cli", "code-agent environments from a git repository's history (F2P > 0, P2F = 0)"),
    "general": ("dsv32.synth.general_cli", "general-agent environments: a database, tools, a task and its verifier"),
    "search": ("dsv32.synth.search_cli", "search QA over a local corpus, kept only when verified"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv32 synth", description="Synthesize agentic tasks (spec §5).")
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, (module, help_) in KINDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(missing=module)
    args = parser.parse_args(argv)
    module = KINDS[args.kind][0]
    if getattr(args, "missing", None):
        parser.error(f"`dsv32 synth {args.kind}` is not built yet ({module})")
    return importlib.import_module(module).run(args)
