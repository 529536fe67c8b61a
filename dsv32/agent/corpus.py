"""A local document corpus with a BM25 index: what the browser's `search` looks things up in.

Documents (url, title, text) come from a user's folder or JSONL file (`documents.py`) or from the
documentation the machine carries (`sysdocs.py`: Python docstrings, man pages). The index is bm25s's
(Lucene BM25, k1=1.5, b=0.75) over our own terms: lowercased words, CJK characters one by one, English
stopwords dropped; a document is indexed as its title followed by its text, link targets left out.

On disk a corpus is a directory with no pickle in it:
  corpus.json       format, version, count and the sources it was built from
  documents.jsonl   one {"url", "title", "text"[, "date"]} per line, in index order
  bm25/             bm25s's own save: params and vocabulary as JSON, the score matrix as .npy arrays
                    (written and read with allow_pickle=False)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from dsv32.agent.documents import Document, DocumentError, read_folder, read_jsonl, strip_links
from dsv32.agent.sysdocs import MAN_ROOT, installed_modules, man_pages, python_docs, stdlib_modules

if TYPE_CHECKING:
    import bm25s

log = logging.getLogger(__name__)

FORMAT, VERSION = "dsv32-corpus", 1
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
TERM = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")


class CorpusError(ValueError):
    """A corpus directory that cannot be read, or documents that cannot be indexed."""


def _bm25s():
    import bm25s  # the optional extra `agent`: pip install dsv32[agent]

    return bm25s


@functools.cache
def stopwords() -> frozenset[str]:
    """bm25s's English stopwords (Lucene's list)."""
    return frozenset(_bm25s().stopwords.STOPWORDS_EN)


def terms(text: str) -> list[str]:
    """The index terms of a text: lowercased words and single CJK characters, stopwords dropped."""
    drop = stopwords()
    return [t for t in TERM.findall(text.lower()) if t not in drop]


class Corpus:
    """Documents in index order, a url -> position map and the BM25 index over them."""

    def __init__(self, documents: list[Document], index: bm25s.BM25, sources: list[str] | None = None):
        self.documents, self.index, self.sources = documents, index, sources or []
        self.by_url = {d.url: i for i, d in enumerate(documents)}

    @classmethod
    def build(cls, documents: Iterable[Document], sources: list[str] | None = None,
              progress: bool = True) -> Corpus:
        """Index documents (duplicates of an earlier url are skipped), with a progress bar."""
        kept, seen, tokens, duplicates = [], set(), [], 0
        for doc in tqdm(documents, desc="indexing", unit=" docs", disable=not progress):
            if doc.url in seen:
                duplicates += 1
                continue
            seen.add(doc.url)
            kept.append(doc)
            tokens.append(terms(doc.title + "\n" + strip_links(doc.text)))
        if not kept:
            raise CorpusError("no documents to index")
        if duplicates:
            log.info("skipped %d documents whose url came earlier", duplicates)
        index = _bm25s().BM25()
        index.index(tokens, show_progress=False)
        return cls(kept, index, sources)

    def __len__(self) -> int:
        return len(self.documents)

    def get(self, url: str) -> Document | None:
        """The document at a url, or at the url without its #fragment."""
        i = self.by_url.get(url, self.by_url.get(url.split("#", 1)[0]))
        return None if i is None else self.documents[i]

    def search(self, query: str, k: int = 10) -> list[tuple[Document, float]]:
        """The k best documents for a query with their BM25 scores; only documents that match a
        query term, best first, ties in index order."""
        query_terms = terms(query)
        if not query_terms or k <= 0:
            return []
        scores = self.index.get_scores(query_terms)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.documents[i], float(scores[i])) for i in order if scores[i] > 0]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "documents.jsonl").open("w", encoding="utf-8") as f:
            for doc in self.documents:
                f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
        self.index.save(directory / "bm25", allow_pickle=False, show_progress=False)
        meta = {"format": FORMAT, "version": VERSION, "count": len(self), "sources": self.sources}
        (directory / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Corpus:
        directory = Path(directory)
        meta_path = directory / "corpus.json"
        if not meta_path.is_file():
            raise CorpusError(f"{directory.name}: no corpus.json (build one with `dsv32 corpus build`)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CorpusError(f"{directory.name}/corpus.json: format {meta.get('format')!r} "
                              f"version {meta.get('version')!r}, expected {FORMAT!r} version {VERSION}")
        try:
            documents = list(read_jsonl(directory / "documents.jsonl"))
        except DocumentError as e:
            raise CorpusError(str(e)) from None
        index = _bm25s().BM25.load(directory / "bm25", allow_pickle=False, show_progress=False)
        if len(documents) != meta["count"] or index.scores["num_docs"] != meta["count"]:
            raise CorpusError(f"{directory.name}: corpus.json counts {meta['count']} documents, "
                              f"documents.jsonl has {len(documents)}, the index {index.scores['num_docs']}")
        return cls(documents, index, meta.get("sources"))


def system_documents(packages: bool = False, man: bool = True, man_sections: str = "12345678",
                     modules: list[str] | None = None) -> Iterable[Document]:
    """The machine's own documentation: the standard library's docstrings (or those of `modules`),
    installed packages' if asked, and the man pages if there are any."""
    names = modules if modules is not None else stdlib_modules()
    if packages:
        names = names + installed_modules()
    yield from python_docs(names)
    if man:
        yield from man_pages(MAN_ROOT, man_sections)


def main(argv: list[str] | None = None) -> int:
    """`dsv32 corpus build --out DIR --from stdlib|FOLDER|FILE.jsonl` (the lead wires it into the CLI)."""
    parser = argparse.ArgumentParser(prog="dsv32 corpus", description="Local document corpora for the browser tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="index documents into a corpus directory")
    build.add_argument("--out", required=True, help="directory to write the corpus to")
    build.add_argument("--from", dest="source", action="append",
                       help="'stdlib' (Python docstrings and man pages), a folder of .txt/.md/.html "
                            "files, or a .jsonl file of {url, title, text}; repeat to combine (default stdlib)")
    build.add_argument("--packages", action="store_true", help="with stdlib: installed packages' docstrings too")
    build.add_argument("--no-man", action="store_true", help="with stdlib: leave the man pages out")
    build.add_argument("--man-sections", default="12345678",
                       help="with stdlib: man sections to read (default 12345678)")
    search = commands.add_parser("search", help="query a corpus directory")
    search.add_argument("corpus")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10)
    args = parser.parse_args(argv)

    if args.command == "search":
        corpus = Corpus.load(args.corpus)
        for doc, score in corpus.search(args.query, args.k):
            print(f"{score:7.2f}  {doc.url}  {doc.title}")
        return 0

    def documents():
        for source in args.source or ["stdlib"]:
            if source == "stdlib":
                yield from system_documents(args.packages, not args.no_man, args.man_sections)
            elif source.endswith(".jsonl"):
                yield from read_jsonl(source)
            elif Path(source).is_dir():
                yield from read_folder(source)
            else:
                raise SystemExit(f"--from {source}: not 'stdlib', a folder or a .jsonl file")

    try:
        corpus = Corpus.build(documents(), sources=[Path(s).name for s in args.source or ["stdlib"]])
    except (DocumentError, CorpusError) as e:
        raise SystemExit(f"error: {e}") from None
    corpus.save(args.out)
    print(f"{len(corpus)} documents indexed into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
