"""The browser DeepSeek-V3.2's search agent drives, over a local corpus: `search`, `open`, `find`.

Every call that shows a page pushes it on a stack; its position is the page's cursor, printed as
`[cursor]` in front of it, and `open`/`find` name earlier pages by cursor (-1: the latest). A search
result page links its hits (`【3†title; publish_date: none†domain】`), a document page its own links,
a find page its matches; `open(id=3)` follows link 3 of the page at `cursor`, `open(loc=120)` without
an id scrolls that page (as a new cursor), `open(id="url")` opens a url directly.

What DeepSeek's fixtures confirm (tests/agent/fixtures): the three schemas below, word for word; the
page format (see page.py); cursors counting up over search, open and find, one per page shown; a
fetch that fails returning ``Error fetching URL `{url}` `` as the result, with no cursor used; an
empty search returning the empty result page. Inferred from gpt-oss's browser: the other errors'
wording, `find` refused on search and find pages, a find link opening its page 4 lines above the
match, `view_source`. Those come back as "error: ..." results through `Tool`; the failed fetch
does not, because the model was trained on DeepSeek's exact text and it is the page's outcome,
not a misuse of the tool.
"""

from __future__ import annotations

from dsv32.agent.corpus import Corpus, terms
from dsv32.agent.page import (
    VIEW_SOURCE, VIEW_TOKENS, Page, approx_tokens, document_page, find_page, search_page, snippet,
    source_page, truncate, view,
)
from dsv32.agent.tool import Tool, ToolError

JSON_SCHEMA = "http://json-schema.org/draft-07/schema#"
SOURCES = ["web", "news"]

SEARCH_PARAMETERS = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "The search query string"},
        "topn": {"type": "integer", "description": "Number of top results to display", "default": 10},
        "source": {"type": "string", "description": "Source to search within", "enum": SOURCES, "default": "web"},
    },
    "required": ["query"],
    "additionalProperties": False,
    "$schema": JSON_SCHEMA,
}
OPEN_DESCRIPTION = (
    "Opens the link id from the page indicated by cursor starting at line number loc, showing num_lines "
    "lines. Valid link ids are displayed with the formatting: 【{id}†.*】. If cursor is not provided, the "
    "most recent page is implied. If id is a string, it is treated as a fully qualified URL associated "
    "with source. If loc is not provided, the viewport will be positioned at the beginning of the "
    "document or centered on the most relevant passage, if available. Use this function without id to "
    "scroll to a new location of an opened page."
)
OPEN_PARAMETERS = {
    "type": "object",
    "properties": {
        "id": {"description": "Link ID (number) or fully qualified URL (string)",
               "anyOf": [{"type": "integer"}, {"type": "string"}], "default": -1},
        "cursor": {"type": "integer", "description": "Page cursor indicator", "default": -1},
        "loc": {"type": "integer", "description": "Starting line number", "default": -1},
        "num_lines": {"type": "integer", "description": "Number of lines to show", "default": -1},
        "view_source": {"type": "boolean", "description": "Whether to view source", "default": False},
        "source": {"type": "string", "description": "Source associated with the URL", "enum": SOURCES,
                   "default": "web"},
    },
    "additionalProperties": False,
    "$schema": JSON_SCHEMA,
}
FIND_PARAMETERS = {
    "type": "object",
    "properties": {
        "pattern": {"type": "string", "description": "The exact pattern to search for"},
        "cursor": {"type": "integer", "description": "Page cursor to search in", "default": -1},
    },
    "required": ["pattern"],
    "additionalProperties": False,
    "$schema": JSON_SCHEMA,
}


class Browser:
    """The page stack and the three verbs over a corpus. `count_tokens` measures the default view
    (a tokenizer's `lambda s: len(tok.encode(s))`; bytes/4 when not given)."""

    def __init__(self, corpus: Corpus, view_tokens: int = VIEW_TOKENS, count_tokens=approx_tokens,
                 max_results: int = 50):
        self.corpus, self.view_tokens, self.count_tokens = corpus, view_tokens, count_tokens
        self.max_results = max_results
        self.stack: list[Page] = []
        self.cache: dict[str, Page] = {}

    def reset(self) -> None:
        """Forget every page (a new episode)."""
        self.stack.clear()
        self.cache.clear()

    def tools(self) -> list[Tool]:
        return [Search(self), Open(self), Find(self)]

    # --- the verbs ----------------------------------------------------------------------------

    def search(self, query: str, topn: int = 10, source: str = "web") -> str:
        check_source(source)
        if not query.strip():
            raise ToolError("query must not be empty")
        return self.show(search_page(query, self.hits(query, max(1, min(topn, self.max_results)))))

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False, source: str = "web") -> str:
        check_source(source)
        if isinstance(id, bool) or not isinstance(id, (int, str)):
            raise ToolError(f"id must be a link id (integer) or a url (string), got {id!r}")
        page, line = None, None
        if isinstance(id, str):  # a url
            url = id
        else:
            current = self.page(cursor)
            if id < 0:  # scroll the page at cursor
                page, url = current, current.url
            elif id < len(current.links):  # follow a link
                url, line = current.links[id].url, current.links[id].line
            else:
                raise ToolError(f"Invalid link id `{id}`.")
        if view_source and not url.startswith(VIEW_SOURCE):
            page, url = None, VIEW_SOURCE + url
        if page is None and (page := self.fetch(url)) is None:
            return f"Error fetching URL `{truncate(url)}`"
        if loc < 0:  # a find result opens 4 lines above its match
            loc = 0 if line is None else line - 4 if line > 4 else line
        return self.show(page, loc, num_lines)

    def find(self, pattern: str, cursor: int = -1) -> str:
        if not pattern:
            raise ToolError("pattern must not be empty")
        page = self.page(cursor)
        if page.kind != "document":
            raise ToolError("Cannot run `find` on search results page or find results page")
        return self.show(find_page(page, pattern))

    # --- state --------------------------------------------------------------------------------

    def page(self, cursor: int = -1) -> Page:
        if not self.stack:
            raise ToolError("No pages to access!")
        if cursor == -1:
            return self.stack[-1]
        if not 0 <= cursor < len(self.stack):
            raise ToolError(f"Cursor `{cursor}` is out of range. "
                            f"Available cursor indices: [0 - {len(self.stack) - 1}].")
        return self.stack[cursor]

    def show(self, page: Page, loc: int = 0, num_lines: int = -1) -> str:
        """Render the page as the next cursor and push it (nothing is pushed if it cannot be shown)."""
        text = view(page, len(self.stack), loc, num_lines, self.view_tokens, self.count_tokens)
        self.stack.append(page)
        return text

    def fetch(self, url: str) -> Page | None:
        """The page at a url: from the pages seen, else built from the corpus document."""
        if url in self.cache:
            return self.cache[url]
        source = url.startswith(VIEW_SOURCE)
        doc = self.corpus.get(url[len(VIEW_SOURCE):] if source else url)
        if doc is None:
            return None
        page = self.cache[url] = source_page(doc) if source else document_page(doc)
        return page

    def hits(self, query: str, topn: int) -> list[tuple[str, str, str | None, str]]:
        """(title, url, date, snippet) of the best documents for a query."""
        wanted = set(terms(query))
        return [(doc.title, doc.url, doc.date, snippet(doc.text, wanted, terms))
                for doc, _ in self.corpus.search(query, topn)]


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise ToolError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")


class _BrowserTool(Tool):
    def __init__(self, browser: Browser):
        self.browser = browser


class Search(_BrowserTool):
    name = "search"
    description = "Searches for information related to query and displays topn results."
    parameters = SEARCH_PARAMETERS

    def run(self, **arguments) -> str:
        return self.browser.search(**arguments)


class Open(_BrowserTool):
    name = "open"
    description = OPEN_DESCRIPTION
    parameters = OPEN_PARAMETERS

    def run(self, **arguments) -> str:
        return self.browser.open(**arguments)


class Find(_BrowserTool):
    name = "find"
    description = "Finds exact matches of pattern in the current page, or the page given by cursor."
    parameters = FIND_PARAMETERS

    def run(self, **arguments) -> str:
        return self.browser.find(**arguments)
