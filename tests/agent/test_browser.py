"""The browser against DeepSeek's own search-agent trajectories (tests/agent/fixtures, official V3.2
encoding test data): the encoder renders them byte for byte, our tools are their tools, and every page
we rebuild from their text renders exactly as DeepSeek's browser rendered it. Then the verbs on a
small corpus of our own."""

import json
import re
from pathlib import Path

import pytest

from dsv32.agent.browser import Browser
from dsv32.agent.corpus import Corpus
from dsv32.agent.documents import Document, domain
from dsv32.agent.page import document_page, find_page, search_page, view, wrap
from dsv32.chat import encode_messages

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["search_wo_date", "search_w_date"]
HEADER = re.compile(r"^\[(\d+)\] (.*) \((.*)\)\n\*\*viewing lines \[(\d+) - (\d+)\] of (\d+)\*\*\n\n(.*)$", re.DOTALL)
HIT = re.compile(r"^  \* 【(\d+)†(.*); publish_date: (.*?)†([^†】]*)】 (.*)$", re.DOTALL)


def messages(name):
    return json.loads((FIXTURES / f"test_input_{name}.json").read_text(encoding="utf-8"))["messages"]


def calls_and_results(name):
    """(tool name, arguments, DeepSeek's result) for every call, in order."""
    out, pending = [], []
    for m in messages(name):
        if m["role"] == "assistant":
            pending = list(m.get("tool_calls") or [])
        elif m["role"] == "tool":
            call = pending.pop(0)["function"]
            out.append((call["name"], json.loads(call["arguments"]), m["content"]))
    return out


def parse(result):
    """cursor, title, url, first, last, last line of page, {line number: line} of a page result."""
    m = HEADER.match(result)
    lines = {}
    for row in m.group(7).split("\n"):
        number, _, line = row.partition(": ")
        lines[int(number.rstrip(":")[1:])] = line
    return int(m.group(1)), m.group(2), m.group(3), int(m.group(4)), int(m.group(5)), int(m.group(6)), lines


def unwrap(lines):
    """Page lines joined back into text lines: a line continues the one before when wrapping the two
    joined gives them back (wrapping keeps every space), else it starts a new one."""
    text, current = [], None
    for line in lines:
        if current is not None and line and wrap(current + line)[-2:] == wrap(current)[-1:] + [line]:
            current += line
            continue
        if current is not None:
            text.append(current)
        current = line
    return "\n".join(text + ([current] if current is not None else []))


def search_hits(lines, url_of=lambda i, host: f"https://{host}/"):
    page = [lines[n] for n in sorted(lines)]
    items = []
    for line in page[page.index("# Search Results") + 2:]:
        if line.startswith("  * 【"):
            items.append(line)
        else:
            items[-1] += line
    hits = []
    for i, item in enumerate(items):
        m = HIT.match(item)
        assert m and int(m.group(1)) == i, item
        hits.append((m.group(2), url_of(i, m.group(4)), None if m.group(3) == "none" else m.group(3), m.group(5)))
    return hits


def rebuild(url, title, views):
    """A document whose page has DeepSeek's lines where their views show them and one-dot filler
    lines elsewhere (one per unseen line)."""
    known, total = {}, 0
    for _, _, _, _, _, last, lines in views:
        known.update(lines)
        total = last + 1
    start = 1 + len(wrap(f"URL: {url}"))  # an empty line and the URL come first
    runs, n = [], start
    while n < total:
        if n not in known:
            runs.append(".")
            n += 1
            continue
        end = n
        while end + 1 < total and end + 1 in known:
            end += 1
        runs.append(unwrap([known[k] for k in range(n, end + 1)]))
        n = end + 1
    return Document(url, title, "\n".join(runs))


@pytest.mark.parametrize("name", NAMES)
def test_the_encoder_renders_deepseeks_search_trajectories_byte_for_byte(name):
    expected = (FIXTURES / f"test_output_{name}.txt").read_text(encoding="utf-8")
    assert encode_messages(messages(name), "thinking", drop_thinking=True) == expected.strip()


@pytest.mark.parametrize("name", NAMES)
def test_our_tools_are_deepseeks_search_open_find(name):
    """(The first trajectory also offers DeepSeek's `python` tool, a Jupyter kernel: not ours.)"""
    browser = Browser(corpus=None)
    assert [t.schema() for t in browser.tools()] == messages(name)[0]["tools"][:3]


def test_search_pages_render_as_deepseeks():
    pages = [r for name in NAMES for tool, _, r in calls_and_results(name) if tool == "search"]
    assert len(pages) == 29
    for result in pages:
        cursor, query, url, *_, lines = parse(result)
        assert url == f"Search_Results/{query}"
        assert view(search_page(query, search_hits(lines)), cursor) == result


def test_document_views_and_find_pages_render_as_deepseeks():
    """Two annual reports seen through several views and three finds each (the first fixture), an
    untitled arXiv page and a Chinese blog page (the second)."""
    results = {n: [r for _, _, r in calls_and_results(n)] for n in NAMES}
    checks = 0
    for name, group, finds in [("search_wo_date", "wildlife_2021", [("2.2", 0), ("Contributed services", 0)]),
                               ("search_wo_date", "wildlife_2022", [("Petroleum", 0), ("Emeritus", 0),
                                                                    ("Contributed services", 0)]),
                               ("search_w_date", "2510.19631", []), ("search_w_date", "151974603", [])]:
        shown = [r for r in results[name] if r.startswith("[") and group in r.split("\n")[0]]
        views = [parse(r) for r in shown if "/find?pattern=" not in r.split("\n")[0]]
        _, title, url, *_ = views[0]
        page = document_page(rebuild(url, title, views))
        pages = [r for r in shown if "/find?" not in r.split("\n")[0]]
        for (cursor, _, _, first, last, _, _), result in zip(views, pages):
            assert view(page, cursor, first, last - first + 1) == result
            checks += 1
        for pattern, _ in finds:
            result = next(r for r in shown if f"`{pattern.lower()}`" in r.split("\n")[0])
            assert view(find_page(page, pattern), parse(result)[0]) == result
            checks += 1
    assert checks == 13


class Replay(Browser):
    """Our browser with DeepSeek's search hits and the documents its pages show."""

    def __init__(self, hits, documents):
        super().__init__(corpus=type("Docs", (), {"get": lambda _, url: documents.get(url)})())
        self.fixture_hits = hits

    def hits(self, query, topn):
        return self.fixture_hits[query]


@pytest.mark.parametrize("name", NAMES)
def test_replaying_deepseeks_trajectories_through_our_browser(name):
    """Every call of the trajectory, in order: search and find pages, fetch errors and cursors come
    out exactly; an opened page has DeepSeek's header and lines, its length set by our view budget."""
    calls = calls_and_results(name)
    pages, opened = {}, {}  # cursor -> parsed page; hit url -> the document behind it
    for tool, args, result in calls:
        if result.startswith("["):
            pages[parse(result)[0]] = parse(result)
    groups = {}
    for cursor, title, url, *_ in pages.values():
        groups.setdefault(url, []).append(pages[cursor])
    hits = {}
    for cursor, page in pages.items():
        if page[2].startswith("Search_Results/"):
            hits[page[1]] = search_hits(page[6], lambda i, host, c=cursor: f"https://{host}/hit/{c}/{i}")
    expected = [result for _, _, result in calls]
    for n, (tool, args, result) in enumerate(calls):
        if tool == "open" and "id" in args:
            query = pages[args["cursor"]][1]
            title, hit_url, date, snip = hits[query][args["id"]]
            if not result.startswith("Error fetching URL"):
                _, title, url, *_ = parse(result)
                opened[hit_url] = rebuild(url, title, [v for v in groups[url] if "/find?" not in v[2]])
            elif domain(failed := result.split("`")[1]) == domain(hit_url):
                hits[query][args["id"]] = (title, failed, date, snip)
            else:  # DeepSeek's fetcher rewrote arxiv.org to ar5iv.org (gpt-oss's does too); we don't
                expected[n] = f"Error fetching URL `{hit_url}`"
    browser = Replay(hits, opened)
    tools = {t.name: t for t in browser.tools()}
    for (tool, args, _), result in zip(calls, expected):
        ours = tools[tool](json.dumps(args))
        if tool == "open" and result.startswith("[") and "/find?" not in result.split("\n")[0]:
            theirs, mine = parse(result), parse(ours)
            assert mine[:4] == theirs[:4] and mine[5] == theirs[5]  # cursor, title, url, first, last line
            common = set(mine[6]) & set(theirs[6])
            assert len(common) >= 40 and all(mine[6][n] == theirs[6][n] for n in common)
        else:
            assert ours == result
    assert len(browser.stack) == len(pages)


# --- our own corpus -------------------------------------------------------------------------------

DOCS = [
    Document("wiki/lighthouse.md", "Lighthouse",
             "# Lighthouse\n\nA lighthouse is a tower with a lamp that guides ships at night.\n\n"
             "The keeper trims the wick every evening. See [the keeper's log](keeper.md) and "
             "[fog signals](https://example.org/fog).\n\n" + "\n".join(f"Line {i} of the history." for i in range(60))
             + "\n\nThe lamp was electrified in 1920."),
    Document("wiki/keeper.md", "Keeper's log",
             "Storm on the 3rd; the lamp stayed lit. Back to the [lighthouse](lighthouse.md)."),
    Document("wiki/bakery.md", "Bakery", "Bread is baked before dawn in a wood-fired oven."),
]


@pytest.fixture
def browser():
    return Browser(Corpus.build(DOCS, progress=False))


def test_search_then_open_a_result_then_follow_a_link(browser):
    search, open_, _ = browser.tools()
    ranked = [doc.url for doc, _ in browser.corpus.search("lamp keeper")]
    assert sorted(ranked) == ["wiki/keeper.md", "wiki/lighthouse.md"]  # the bakery has neither word
    page = search({"query": "lamp keeper"})
    assert page.startswith("[0] lamp keeper (Search_Results/lamp keeper)\n**viewing lines [0 - ")
    shown = "".join(browser.stack[0].lines)
    keeper = ranked.index("wiki/keeper.md")
    assert f"  * 【{keeper}†Keeper's log; publish_date: none†wiki】 Storm on the 3rd" in shown
    doc = open_({"id": ranked.index("wiki/lighthouse.md")})
    assert doc.startswith("[1] Lighthouse (wiki/lighthouse.md)\n**viewing lines [0 - 70] of 70**\n\n"
                          "L0: \nL1: URL: wiki/lighthouse.md\n")
    assert ("L6: The keeper trims the wick every evening. See 【0†the keeper's log】 and 【1†fog \n"
            "L7: signals†example.org】.") in doc  # a link to another site names it; links wrap too
    assert open_({"id": 0}).startswith("[2] Keeper's log (wiki/keeper.md)\n")
    assert open_({"cursor": 1, "id": 1}) == "Error fetching URL `https://example.org/fog`"
    assert open_({"id": "wiki/bakery.md"}).startswith("[3] Bakery (wiki/bakery.md)\n")
    assert open_({"id": "wiki/lighthouse.md", "view_source": True, "loc": 6, "num_lines": 1}) == (
        "[4] Lighthouse (view-source:wiki/lighthouse.md)\n**viewing lines [6 - 6] of 70**\n\n"
        "L6: The keeper trims the wick every evening. See [the keeper's log](keeper.md) and ")
    assert len(browser.stack) == 5  # the failed fetch used no cursor


def test_find_lists_matches_as_a_page_and_its_links_open_near_them(browser):
    _, open_, find = browser.tools()
    open_({"id": "wiki/lighthouse.md"})
    found = find({"pattern": "ELECTRIFIED"})
    line = len(document_page(DOCS[0]).lines) - 1
    assert found == ("[1] Find results for text: `electrified` in `Lighthouse` "
                     "(wiki/lighthouse.md/find?pattern=electrified)\n**viewing lines [0 - 1] of 1**\n\n"
                     f"L0: # 【0†match at L{line}】\nL1: The lamp was electrified in 1920.")
    assert open_({"id": 0}).startswith(f"[2] Lighthouse (wiki/lighthouse.md)\n**viewing lines [{line - 4} - {line}]")
    missing = find({"pattern": "no such words", "cursor": 0})
    assert missing.endswith("L0: No `find` results for pattern: `no such words`")
    scrolled = open_({"cursor": 0, "loc": 10, "num_lines": 3})
    assert scrolled.startswith(f"[4] Lighthouse (wiki/lighthouse.md)\n**viewing lines [10 - 12] of {line}**")


def test_errors_come_back_as_results(browser):
    search, open_, find = browser.tools()
    assert open_({}) == "error: No pages to access!"
    assert search({"query": "zeppelin"}) == ("[0] zeppelin (Search_Results/zeppelin)\n**viewing lines [0 - 2] of 2**\n\n"
                                             "L0: \nL1: URL: Search_Results/zeppelin\nL2: # Search Results")
    assert find({"pattern": "x"}) == "error: Cannot run `find` on search results page or find results page"
    assert open_({"id": 3}) == "error: Invalid link id `3`."
    assert open_({"cursor": 7}) == "error: Cursor `7` is out of range. Available cursor indices: [0 - 0]."
    assert open_({"loc": 99}) == "error: Invalid location parameter: `99`. Cannot exceed page maximum of 2."
    assert search({"query": "lamp", "source": "books"}) == "error: source must be one of web, news, got 'books'"
    assert search({"query": "lamp", "top_n": 3}) == ("error: search has no argument(s) top_n; "
                                                      "it takes query, topn, source")
    assert open_({"id": True}).startswith("error: id must be a link id")
    assert len(browser.stack) == 1
