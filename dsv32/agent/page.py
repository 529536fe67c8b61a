"""Pages as DeepSeek-V3.2's browser shows them to the model.

What DeepSeek's official search-agent fixtures show (tests/agent/fixtures), which this module writes
byte for byte:
  [{cursor}] {title} ({url})
  **viewing lines [{first} - {last}] of {last line of the page}**
  <blank line>
  L{n}: {line}            one per line of the page, text wrapped at 80 columns, spaces kept
A page's text starts with an empty line and `URL: {url}`. A search result page is titled by the
query, at url `Search_Results/{query}`, with `# Search Results` and one item per hit:
  `  * 【{id}†{title}; publish_date: {date or none}†{domain}】 {snippet}`
and a `find` page lists `# 【{id}†match at L{n}】` followed by the 4 lines from line n, for the
lowercased pattern, titled ``Find results for text: `{pattern}` in `{title}` ``.

Inferred from gpt-oss's browser (`gpt_oss/tools/simple_browser`), whose format DeepSeek's follows: the
wrapping rule (textwrap, width 80, whitespace neither dropped nor replaced), a link inside a page as
`【{id}†{text}】` (`【{id}†{text}†{domain}】` when it leaves the page's domain), `【】` in page text shown
as `〖〗`, and how many lines a view shows by default: lines until a token budget is spent (1024
tokens; DeepSeek's second fixture shows about twice that), the line that crosses it included.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import quote, unquote

from dsv32.agent.documents import MARKDOWN_LINK, Document, domain, resolve, strip_links
from dsv32.agent.tool import ToolError

WIDTH = 80
VIEW_TOKENS = 1024
FIND_LINES, FIND_MAX = 4, 50
VIEW_SOURCE = "view-source:"
PAGE_LINK = re.compile(r"【\d+†(?P<text>[^†】]+)(?:†[^†】]+)?】")


@dataclass(frozen=True)
class Link:
    url: str
    line: int | None = None  # where a find result points in its page


@dataclass
class Page:
    url: str
    title: str
    text: str
    links: list[Link] = field(default_factory=list)  # link id -> target
    kind: str = "document"  # "document", "search" or "find"

    @cached_property
    def lines(self) -> list[str]:
        return wrap(self.text)


def wrap(text: str) -> list[str]:
    """The page's lines: each line of text wrapped at 80 columns, no whitespace dropped, so the
    lines of a paragraph join back into it; empty lines kept."""
    return [piece for line in text.split("\n")
            for piece in (textwrap.wrap(line, WIDTH, replace_whitespace=False, drop_whitespace=False)
                          if line else [""])]


def clean(text: str) -> str:
    """Page text with the link brackets taken by the browser's own markup replaced."""
    return text.replace("【", "〖").replace("】", "〗").replace("\u200b", "")


def inline(text: str) -> str:
    """Text for inside a link: one line, no link markup."""
    return re.sub(r"\s+", " ", clean(text)).strip().replace("†", "‡")


def truncate(text: str, limit: int = 1024) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def document_page(doc: Document) -> Page:
    """A document as a page: `URL:` line, then its text with markdown links numbered in order of
    first appearance (one id per target, relative targets resolved against the document's url)."""
    links, ids, here = [], {}, domain(doc.url)

    def number(m: re.Match) -> str:
        text, url = inline(m.group(1)), resolve(doc.url, m.group(2))
        if not text:
            return ""
        if url not in ids:
            ids[url] = len(links)
            links.append(Link(url))
        host = domain(url)
        return f"【{ids[url]}†{text}】" if host == here else f"【{ids[url]}†{text}†{host}】"

    body = MARKDOWN_LINK.sub(number, clean(doc.text))
    return Page(doc.url, doc.title, f"\nURL: {doc.url}\n{body}", links)


def source_page(doc: Document) -> Page:
    """The document's stored text as it is, links unnumbered (`open` with view_source)."""
    url = VIEW_SOURCE + doc.url
    return Page(url, doc.title, f"\nURL: {url}\n{clean(doc.text)}")


def search_page(query: str, hits: list[tuple[str, str, str | None, str]]) -> Page:
    """The result page of a search: hits are (title, url, date, snippet), best first."""
    url = f"Search_Results/{query}"
    items = [f"  * 【{i}†{inline(title)}; publish_date: {date or 'none'}†{domain(hit_url)}】 {inline(snip)}"
             for i, (title, hit_url, date, snip) in enumerate(hits)]
    text = f"\nURL: {url}\n# Search Results" + ("\n\n" + "\n".join(items) if items else "")
    return Page(url, query, text, [Link(hit_url) for _, hit_url, _, _ in hits], kind="search")


def find_page(page: Page, pattern: str) -> Page:
    """The lines of `page` holding `pattern` (case-insensitive), each with the lines after it."""
    pattern = pattern.lower()
    lines = PAGE_LINK.sub(lambda m: m.group("text"), "\n".join(page.lines)).split("\n")
    chunks, links, i = [], [], 0
    while i < len(lines) and len(chunks) < FIND_MAX:
        if pattern not in lines[i].lower():
            i += 1
            continue
        chunks.append(f"# 【{len(chunks)}†match at L{i}】\n" + "\n".join(lines[i:i + FIND_LINES]))
        links.append(Link(page.url, i))
        i += FIND_LINES
    text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
    return Page(f"{page.url}/find?pattern={quote(pattern)}",
                f"Find results for text: `{pattern}` in `{page.title}`", text, links, kind="find")


def approx_tokens(text: str) -> float:
    """About one token per four bytes of UTF-8 (English and CJK alike), for the view budget when no
    tokenizer is given."""
    return len(text.encode("utf-8")) / 4


def view(page: Page, cursor: int, loc: int = 0, num_lines: int = -1, view_tokens: int = VIEW_TOKENS,
         count_tokens=approx_tokens) -> str:
    """Lines loc.. of a page under its header: num_lines of them, or (num_lines <= 0) as many as fit
    the token budget."""
    lines = page.lines
    if loc >= len(lines):
        raise ToolError(f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {len(lines) - 1}.")
    numbered = [f"L{n}: {lines[n]}" for n in range(loc, len(lines))]
    if num_lines > 0:
        shown = numbered[:num_lines]
    else:
        spent, shown = 0.0, []
        for line in numbered:
            shown.append(line)
            spent += count_tokens(line + "\n")
            if spent > view_tokens:
                break
    head = page.title + (f" ({truncate(unquote(page.url))})" if page.url else "")
    last = loc + len(shown) - 1
    return f"[{cursor}] {head}\n**viewing lines [{loc} - {last}] of {len(lines) - 1}**\n\n" + "\n".join(shown)


def snippet(text: str, query_terms: set[str], terms, words: int = 30, limit: int = 200) -> str:
    """The passage of a document that holds most query terms, about `limit` characters, `...` where
    it is cut. `terms` is the corpus's term function."""
    tokens = re.sub(r"\s+", " ", strip_links(text)).strip().split(" ")
    best, best_score = 0, (-1, 0)
    for start in range(0, max(1, len(tokens) - words + 1), max(1, words // 4)):
        found = [t for w in tokens[start:start + words] for t in terms(w) if t in query_terms]
        score = (len(set(found)), len(found))
        if score > best_score:
            best, best_score = start, score
    out, used = [], 0
    for w in tokens[best:]:
        if used + len(w) > limit and out:
            break
        out.append(w)
        used += len(w) + 1
    cut = best + len(out) < len(tokens)
    return ("... " if best else "") + " ".join(out) + (" ..." if cut else "")

