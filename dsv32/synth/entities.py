"""Long-tail entities of a local corpus: what the search-QA pipeline asks questions about (spec §5,
search agent, step 1: "sample informative long-tail entities").

An entity is a document, named by its title. Its document frequency is the number of documents
whose index terms hold every term of that title: the pages that mention the entity, its own page
among them. The counts come from the BM25 index itself (a term's column of bm25s's score matrix
lists the documents that hold the term; Lucene's BM25 scores every holder above zero).

An entity is long-tail when its document frequency is at most `max_df` (and its title has at
least one index term): few pages name it, so a question about it is not answered by common
knowledge or by the first search result of a popular name. A sample is the long-tail entities in
an order drawn from a seed; its first n are the same for any n, so a larger run extends a smaller
one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from dsv32.agent.corpus import Corpus, terms


@dataclass(frozen=True)
class Entity:
    url: str
    title: str
    df: int          # documents that mention every term of the title

    def to_json(self) -> dict:
        return {"url": self.url, "title": self.title, "df": self.df}


def postings(corpus: Corpus, term: str) -> np.ndarray:
    """The index positions of the documents that hold a term (empty for a term not in the index)."""
    column = corpus.index.vocab_dict.get(term)
    if column is None:
        return np.empty(0, dtype=np.int64)
    indptr, indices = corpus.index.scores["indptr"], corpus.index.scores["indices"]
    return np.asarray(indices[indptr[column]:indptr[column + 1]])


def mentions(corpus: Corpus, title: str) -> int:
    """How many documents hold every index term of a title (0 for a title with no index term)."""
    wanted = sorted(set(terms(title)))
    if not wanted:
        return 0
    held = postings(corpus, wanted[0])
    for term in wanted[1:]:
        held = np.intersect1d(held, postings(corpus, term), assume_unique=True)
    return int(held.size)


def long_tail(corpus: Corpus, max_df: int) -> list[Entity]:
    """Every long-tail entity of the corpus, in index order."""
    if max_df < 1:
        raise ValueError(f"max_df must be >= 1 (an entity's own page mentions it), got {max_df}")
    found = []
    for doc in corpus.documents:
        df = mentions(corpus, doc.title)
        if 1 <= df <= max_df:
            found.append(Entity(doc.url, doc.title, df))
    return found


def sample_entities(corpus: Corpus, n: int, max_df: int, seed: int = 0) -> list[Entity]:
    """The first n long-tail entities in the seed's order (all of them when there are fewer)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    found = long_tail(corpus, max_df)
    random.Random(seed).shuffle(found)
    return found[:n]
