"""The documents a local corpus holds, and the readers for a user's own: a JSONL file or a folder of
text, markdown and HTML files.

A document is a url (its id), a title and a text. The text is plain or markdown; its links are markdown
links `[text](url)`, which the browser turns into numbered links (`【3†text】`) that `open` follows.
HTML is reduced to that form when it is read, with the standard library's parser. Links are kept as
written; the browser resolves relative ones against the document's url, so a folder read with
`read_folder` keeps its cross-references.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
                 ".rst": "text", ".html": "html", ".htm": "html"}
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
MARKDOWN_LINK = re.compile(r"\[([^\]\n]*)\]\(([^()\s]*)\)")
MARKDOWN_TITLE = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)


class DocumentError(ValueError):
    """A document that cannot be read: names the file, the line or the field."""


@dataclass(frozen=True)
class Document:
    url: str
    title: str
    text: str
    date: str | None = None  # shown as publish_date in search results ("none" when unknown)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj, where: str = "document") -> Document:
        if not isinstance(obj, dict):
            raise DocumentError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("url", "title", "text", "date"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise DocumentError(f"{where}: field {key!r} must be a string")
        if not obj.get("text"):
            raise DocumentError(f"{where}: field 'text' is missing or empty")
        if not obj.get("url"):
            raise DocumentError(f"{where}: field 'url' is missing or empty")
        return cls(obj["url"], obj.get("title") or obj["url"], obj["text"], obj.get("date"))


def domain(url: str) -> str:
    """The host a url names: its network location, else its first path segment."""
    rest = SCHEME.sub("", url, count=1).lstrip("/")
    return re.split(r"[/#?]", rest, maxsplit=1)[0] or url


def resolve(base: str, href: str) -> str:
    """A link target as a full url: absolute links as they are, relative ones against `base`
    (a url with a scheme, or a scheme-less path whose first segment plays the host)."""
    if SCHEME.match(href):
        return href
    page = base.split("#", 1)[0]
    if href.startswith("#"):
        return page + href
    scheme = SCHEME.match(page)
    head = scheme.group(0) if scheme else ""
    slashes = "//" if page[len(head):].startswith("//") else ""
    path = page[len(head) + len(slashes):]
    if href.startswith("/"):
        return head + slashes + path.split("/", 1)[0] + posixpath.normpath(href)
    return head + slashes + posixpath.normpath(posixpath.join(posixpath.dirname(path), href))


def strip_links(text: str) -> str:
    """Markdown links reduced to their text (for indexing and snippets)."""
    return MARKDOWN_LINK.sub(lambda m: m.group(1), text)


def read_jsonl(path: str | Path) -> Iterator[Document]:
    """Documents from a JSONL file, one {"url", "title", "text"[, "date"]} object per line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DocumentError(f"{path.name} line {n}: not JSON ({e})") from None
            yield Document.from_json(obj, f"{path.name} line {n}")


def read_folder(folder: str | Path) -> Iterator[Document]:
    """Every text, markdown and HTML file under `folder`, in path order. A file's url is the folder's
    name and its path inside it (`notes/guide/setup.md`), so relative links between files resolve."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DocumentError(f"{folder.name}: not a folder")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        kind = TEXT_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            continue
        url = f"{folder.name}/{path.relative_to(folder).as_posix()}"
        raw = path.read_text(encoding="utf-8", errors="replace")
        if kind == "html":
            title, text = html_to_text(raw)
        else:
            text = raw
            heading = MARKDOWN_TITLE.search(text) if kind == "markdown" else None
            title = heading.group(1) if heading else path.stem
        if text.strip():
            yield Document(url, title or path.stem, text.strip("\n"))


class _HTMLText(HTMLParser):
    """HTML to markdown-like text: headings as `#`, list items as `  * `, links as `[text](url)`,
    blocks separated by blank lines, whitespace collapsed outside <pre>."""

    BLOCKS = frozenset({"p", "div", "section", "article", "header", "footer", "main", "table", "tr", "ul",
              "ol", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "li", "dl", "dt", "dd"})
    SKIP = frozenset({"script", "style", "head", "noscript", "template", "svg"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks, self.line, self.prefix = [], [], ""
        self.title, self.in_title, self.skip, self.pre = "", False, 0, 0
        self.link: list | None = None  # [href, text parts] while inside <a>

    def flush(self):
        text = "".join(self.line)
        if not self.pre:
            text = re.sub(r"\s+", " ", text).strip()
        if text.strip():
            self.blocks.append(self.prefix + text)
            self.prefix = ""
        self.line = []

    def text(self) -> str:
        """Blocks separated by blank lines; consecutive list items on consecutive lines."""
        out = []
        for i, block in enumerate(self.blocks):
            tight = i and block.startswith("  * ") and self.blocks[i - 1].startswith("  * ")
            out.append(("\n" if tight else "\n\n") * bool(i) + block)
        return "".join(out)

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        elif tag in self.SKIP:
            self.skip += 1
        elif tag == "br":
            self.line.append("\n" if self.pre else " ")
        elif tag in self.BLOCKS:
            self.flush()
            if tag == "pre":
                self.pre += 1
            elif tag == "li":
                self.prefix = "  * "
            elif tag[0] == "h" and tag[1:].isdigit():
                self.prefix = "#" * int(tag[1:]) + " "
        elif tag == "a":
            href = dict(attrs).get("href")
            self.link = [href, []] if href and not href.startswith(("javascript:", "mailto:")) else None

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        elif tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "a" and self.link is not None:
            href, parts = self.link
            self.link = None
            text = re.sub(r"\s+", " ", "".join(parts)).strip().replace("[", "(").replace("]", ")")
            self.line.append(f"[{text}]({href})" if text else "")
        elif tag in self.BLOCKS:
            self.flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skip:
            (self.link[1] if self.link is not None else self.line).append(data)


def html_to_text(html: str) -> tuple[str, str]:
    """(title, text) of an HTML page; the title is <title>, else the first heading."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    parser.flush()
    title = re.sub(r"\s+", " ", parser.title).strip()
    if not title:
        title = next((b.lstrip("#").strip() for b in parser.blocks if b.startswith("#")), "")
    return title, parser.text()
