"""The documentation every machine carries offline, as corpus documents: the docstrings of the Python
standard library (and, optionally, of installed packages) and the man pages, if there are any.

Python sources are read with `ast`, never imported, so building a corpus runs no module's code (and
never imports a heavy package); only compiled top-level modules (`math`, `itertools`) are imported, for
`inspect` to read their docstrings. Each module gives one document (its docstring and links to its
members), and each documented public function or class one more (a class with its methods inline).
Urls are `pydoc://<module>` and `pydoc://<module>#<module>.<name>`.

Man pages are read from their roff source by a small reader (headings, paragraphs, fonts, the common
escapes); `.so` aliases and symbolic links are skipped. Urls are `man://<name>.<section>`.
"""

from __future__ import annotations

import ast
import gzip
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from dsv32.agent.documents import Document

SKIP_MODULES = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "pydoc_data", "ensurepip", "this",
                "antigravity", "setup", "conftest"}
MAN_ROOT = Path("/usr/share/man")


def stdlib_modules() -> list[str]:
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)


def installed_modules() -> list[str]:
    """Top-level modules of the installed packages (not the standard library), by name."""
    roots = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    names = {m.name for m in pkgutil.iter_modules(roots)}
    return sorted(n for n in names if not n.startswith("_") and n not in sys.stdlib_module_names
                  and n not in SKIP_MODULES)


def python_docs(modules: Iterable[str]) -> Iterator[Document]:
    """Documents for the given top-level modules and their submodules."""
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or spec.origin is None:
            continue
        if spec.origin.endswith(".py"):
            yield from _source_tree(name, Path(spec.origin), spec.submodule_search_locations)
        else:  # built-in or extension: import it (no Python code runs) and ask inspect
            yield from _compiled_module(name)


def _url(module: str, qualname: str = "") -> str:
    return f"pydoc://{module}" + (f"#{module}.{qualname}" if qualname else "")


def _summary(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0].strip()


def _module_document(module: str, doc: str | None, members: list[Document]) -> Document | None:
    if not doc and not members:
        return None
    listing = "\n".join(f"  * [{m.title}]({m.url}): {_summary(m.text.split(chr(10) * 2, 1)[-1])}"
                        for m in members)
    text = (doc or "").strip() + (f"\n\n## Members\n\n{listing}" if listing else "")
    summary = _summary(doc)
    title = module + (f" — {summary}" if summary.endswith(".") and len(summary) <= 80 else "")
    return Document(_url(module), title, text.strip())


def _source_tree(module: str, path: Path, package_dirs) -> Iterator[Document]:
    yield from _source_module(module, path)
    for location in package_dirs or []:
        for info in pkgutil.iter_modules([location]):
            if info.name.startswith("_") or info.name in SKIP_MODULES:
                continue
            sub = Path(location) / info.name
            if info.ispkg and (sub / "__init__.py").is_file():
                yield from _source_tree(f"{module}.{info.name}", sub / "__init__.py", [str(sub)])
            elif (file := sub.with_suffix(".py")).is_file():
                yield from _source_module(f"{module}.{info.name}", file)


def _public(name: str, exported: set[str] | None) -> bool:
    return name in exported if exported is not None else not name.startswith("_")


def _exported(tree: ast.Module) -> set[str] | None:
    """The names in a literal `__all__`, or None when there is none."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def _signature(node) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"({bases})" if bases else ""
    return f"({ast.unparse(node.args)})"


def _source_module(module: str, path: Path) -> Iterator[Document]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=path.name)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    exported, members, seen = _exported(tree), [], set()
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if not isinstance(node, (*functions, ast.ClassDef)) or node.name in seen:
            continue
        if not _public(node.name, exported) or not (doc := ast.get_docstring(node)):
            continue
        seen.add(node.name)
        qual = f"{module}.{node.name}"
        if isinstance(node, ast.ClassDef):
            text = f"class {qual}{_signature(node)}\n\n{doc}"
            for item in node.body:
                shown = isinstance(item, functions) and (item.name == "__init__" or not item.name.startswith("_"))
                if shown and (item_doc := ast.get_docstring(item)):
                    text += f"\n\n## {item.name}{_signature(item)}\n\n{item_doc}"
        else:
            prefix = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
            text = f"{prefix}{qual}{_signature(node)}\n\n{doc}"
        members.append(Document(_url(module, node.name), qual, f"{text}\n\nModule: [{module}]({_url(module)})"))
    if (page := _module_document(module, ast.get_docstring(tree), members)) is not None:
        yield page
    yield from members


def _compiled_module(module: str) -> Iterator[Document]:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 -- a compiled module that cannot load here has no docs to give
        return
    members = []
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", module) != module or not (doc := inspect.getdoc(obj)):
            continue
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = ""
        qual = f"{module}.{name}"
        text = f"{'class ' if inspect.isclass(obj) else ''}{qual}{sig}\n\n{doc}"
        if inspect.isclass(obj):
            for meth, fn in sorted(vars(obj).items()):
                if not meth.startswith("_") and inspect.isroutine(fn) and (fn_doc := inspect.getdoc(fn)):
                    text += f"\n\n## {meth}\n\n{fn_doc}"
        members.append(Document(_url(module, name), qual, f"{text}\n\nModule: [{module}]({_url(module)})"))
    if (page := _module_document(module, inspect.getdoc(mod), members)) is not None:
        yield page
    yield from members


# Man pages ------------------------------------------------------------------------------------

ESCAPES = {"-": "-", "e": "\\", "&": "", "|": "", "^": "", "~": " ", " ": " ", "0": " ", "%": "",
           "c": "", "/": "", ",": "", ":": "", "'": "'", "`": "`", ".": "."}
GLYPHS = {"em": "—", "en": "–", "bu": "•", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
          "cq": "’", "co": "©", "rg": "®", "tm": "™", "hy": "-", "mi": "-", "pl": "+", "mu": "×",
          "di": "÷", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "de": "°", "ga": "`",
          "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|", "lB": "[", "rB": "]", "R": "®"}
ESCAPE = re.compile(r"\\(?:f(?:\(..|\[[^\]]*\]|.)|s[+-]?\d+|[*n](?:\(..|\[[^\]]*\]|.)|\((..)|\[([^\]]*)\]|(.))")
FONT_MACROS = {"B", "I", "SM", "SB"}
ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
BREAKS = {"PP", "P", "LP", "sp", "TP", "TQ", "HP", "br", "SH", "SS", "IP", "RS", "RE"}


def _unescape(text: str) -> str:
    def one(m):
        if m.group(1) or m.group(2):
            return GLYPHS.get(m.group(1) or m.group(2), "")
        return ESCAPES.get(m.group(3), m.group(3)) if m.group(3) else ""
    return ESCAPE.sub(one, text)


def _macro_args(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_to_text(source: str) -> tuple[str, str]:
    """(title, text) of a man page's roff source: `.TH` names it, `.SH`/`.SS` become `#`/`##`
    headings, filled text joins into paragraphs, `.nf`/`.EX` keep their lines."""
    title, paras, words, fill, tag = "", [], [], True, False  # tag: the next line is a .TP tag

    def end_paragraph():
        if words:
            paras.append((" " if fill else "\n").join(words).replace("\n ", "\n").strip())
            words.clear()

    def add(text):
        nonlocal tag
        words.append(text + "\n" if tag else text)
        tag = False

    for raw in source.splitlines():
        if raw.startswith((".\\\"", "'\\\"", "\\\"")):
            continue
        if raw[:1] in ".'":
            macro, _, rest = raw[1:].strip().partition(" ")
            args = _macro_args(rest)
            if macro == "TH" and args:
                title = f"{args[0].lower()}({args[1]})" if len(args) > 1 else args[0].lower()
            elif macro in ("nf", "EX"):
                end_paragraph()
                fill = False
            elif macro in ("fi", "EE"):
                end_paragraph()
                fill = True
            elif macro in BREAKS:
                end_paragraph()
                if macro in ("SH", "SS") and args:
                    paras.append(("# " if macro == "SH" else "## ") + _unescape(" ".join(args)))
                elif macro == "IP" and args:
                    words.append("  * " if args[0] in ("\\(bu", "\\[bu]", "*", "-") else _unescape(args[0]))
                tag = macro in ("TP", "TQ")
            elif macro in FONT_MACROS and args:
                add(_unescape(" ".join(args)))
            elif macro in ALTERNATING and args:
                add(_unescape("".join(args)))
            continue  # any other request sets layout only
        line = _unescape(raw)
        if line.strip() or not fill:
            add(line if not fill else line.strip())
        else:
            end_paragraph()
    end_paragraph()
    text = "\n\n".join(p for p in paras if p)
    name = re.search(r"^# NAME\n\n(.+)$", text, re.MULTILINE)
    if name and " - " in name.group(1):
        title += " — " + name.group(1).split(" - ", 1)[1].strip()
    return title, text


def man_pages(root: Path = MAN_ROOT, sections: str = "12345678") -> Iterator[Document]:
    """Documents for the man pages under `root` (English ones: `man<section>/` folders)."""
    for section in sections:
        folder = Path(root) / f"man{section}"
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError):
                continue
            source = raw.decode("utf-8", errors="replace")
            if source.lstrip().startswith(".so "):
                continue
            stem = path.name[:-3] if path.suffix == ".gz" else path.name
            title, text = roff_to_text(source)
            if text:
                yield Document(f"man://{stem}", title or stem, text)
