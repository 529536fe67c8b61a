"""The local corpus: BM25 finds the documents a reader would pick, survives a save/load round trip
unchanged, and indexes real documentation (the standard library's docstrings, man pages) and a user's
folders and JSONL files."""

import gzip
import json

import numpy as np
import pytest

from dsv32.agent.corpus import Corpus, CorpusError, main, system_documents, terms
from dsv32.agent.documents import Document, DocumentError, html_to_text, read_folder, read_jsonl
from dsv32.agent.sysdocs import man_pages, python_docs, roff_to_text

# Eight short documents; each query below has one answer a person would pick.
ANIMALS = [
    Document("zoo/owl", "Owl",
             "Owls hunt at night. Their large eyes and silent flight make them skilled nocturnal predators of mice."),
    Document("zoo/salmon", "Salmon",
             "Salmon hatch in rivers, migrate to the ocean, and return upstream to spawn where they were born."),
    Document("zoo/camel", "Camel",
             "Camels store fat in their humps and can go for days in the desert without drinking water."),
    Document("zoo/bee", "Honey bee",
             "Bees collect nectar from flowers and turn it into honey; a colony has one queen."),
    Document("zoo/penguin", "Penguin",
             "Penguins cannot fly; they swim with their flippers and breed on the Antarctic ice."),
    Document("zoo/bat", "Bat",
             "Bats are the only mammals capable of true flight and find insects at night by echolocation."),
    Document("zoo/beaver", "Beaver",
             "Beavers build dams of branches and mud across streams, turning them into ponds."),
    Document("zoo/panda", "Giant panda",
             "大熊猫生活在中国的竹林里，几乎只吃竹子。"),
]
QUERIES = {
    "which animal makes honey from nectar": "zoo/bee",
    "fish that swims upstream to spawn": "zoo/salmon",
    "surviving in the desert without water": "zoo/camel",
    "mammal that hunts insects by echolocation": "zoo/bat",
    "builds dams on streams": "zoo/beaver",
    "bird that cannot fly and lives on ice": "zoo/penguin",
    "熊猫吃什么": "zoo/panda",
}


@pytest.fixture(scope="module")
def zoo():
    return Corpus.build(ANIMALS, progress=False)


def ranking(corpus, query):
    return [(doc.url, round(score, 6)) for doc, score in corpus.search(query, k=8)]


def test_terms_are_lowercase_words_and_single_cjk_characters_without_stopwords():
    assert terms("The JSON_dumps of a Str") == ["json", "dumps", "str"]
    assert terms("大熊猫 eats") == ["大", "熊", "猫", "eats"]


def test_bm25_finds_the_document_a_reader_would_pick(zoo):
    for query, url in QUERIES.items():
        assert zoo.search(query, k=1)[0][0].url == url, query
    assert zoo.search("the of and", k=5) == []  # stopwords only: no hit, not every document
    assert zoo.search("xylophone", k=5) == []


def test_a_saved_corpus_loads_with_identical_rankings_and_no_pickle(zoo, tmp_path):
    zoo.save(tmp_path / "zoo")
    for npy in (tmp_path / "zoo" / "bm25").glob("*.npy"):
        np.load(npy, allow_pickle=False)  # plain arrays
    loaded = Corpus.load(tmp_path / "zoo")
    assert loaded.documents == zoo.documents
    for query in [*QUERIES, "night flight", "river ocean"]:
        assert ranking(loaded, query) == ranking(zoo, query)
    (tmp_path / "zoo" / "corpus.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(CorpusError, match="format 'other'"):
        Corpus.load(tmp_path / "zoo")
    with pytest.raises(CorpusError, match="no corpus.json"):
        Corpus.load(tmp_path)


def test_the_stdlib_builder_indexes_real_docstrings():
    corpus = Corpus.build(system_documents(man=False, modules=["json", "csv", "pathlib", "math"]), progress=False)
    best = corpus.search("serialize obj to a JSON formatted str", k=3)
    assert best[0][0].url == "pydoc://json#json.dumps"
    assert best[0][0].text.startswith("json.dumps(obj, *, skipkeys=False")
    module = corpus.get("pydoc://json")
    assert "  * [json.dumps](pydoc://json#json.dumps): Serialize ``obj`` to a JSON formatted ``str``." in module.text
    assert corpus.search("square root", k=1)[0][0].url == "pydoc://math#math.sqrt"  # compiled, read by inspect
    assert corpus.get("pydoc://json.decoder#json.decoder.JSONDecoder") is not None  # submodules too


def test_python_docs_read_sources_without_importing_them(tmp_path, monkeypatch):
    pkg = tmp_path / "sideeffect"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A package."""\nraise SystemExit("imported!")\n')
    (pkg / "tools.py").write_text('def hammer(nail):\n    """Drive a nail."""\n\ndef _hidden():\n    """No."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    urls = {d.url: d for d in python_docs(["sideeffect"])}
    hammer = "pydoc://sideeffect.tools#sideeffect.tools.hammer"
    assert set(urls) == {"pydoc://sideeffect", "pydoc://sideeffect.tools", hammer}
    assert urls[hammer].text.startswith("sideeffect.tools.hammer(nail)\n\nDrive a nail.")


ROFF = r""".\" a page written for this test
.TH GREET 1 "2024" "greet 1.0" "User Commands"
.SH NAME
greet \- say hello to someone
.SH SYNOPSIS
.B greet
[\fB\-\-loud\fR] \fINAME\fR
.SH OPTIONS
.TP
\fB\-\-loud\fR
print in capitals \(em for noisy rooms
.SH EXAMPLE
.nf
greet world
greet \-\-loud world
.fi
"""


def test_man_pages_are_read_from_their_roff_source(tmp_path):
    title, text = roff_to_text(ROFF)
    assert title == "greet(1) — say hello to someone"
    assert text == ("# NAME\n\ngreet - say hello to someone\n\n# SYNOPSIS\n\ngreet [--loud] NAME\n\n# OPTIONS\n\n"
                    "--loud\nprint in capitals — for noisy rooms\n\n# EXAMPLE\n\ngreet world\ngreet --loud world")
    (tmp_path / "man1").mkdir()
    (tmp_path / "man1" / "greet.1.gz").write_bytes(gzip.compress(ROFF.encode()))
    (tmp_path / "man1" / "hello.1").write_text(".so man1/greet.1\n")  # an alias
    (tmp_path / "man1" / "hi.1.gz").symlink_to("greet.1.gz")
    pages = list(man_pages(tmp_path, "18"))
    assert [(p.url, p.title) for p in pages] == [("man://greet.1", "greet(1) — say hello to someone")]


def test_folders_and_jsonl_files_become_documents(tmp_path):
    notes = tmp_path / "notes"
    (notes / "guide").mkdir(parents=True)
    (notes / "guide" / "setup.md").write_text("# Setting up\n\nRead the [overview](../index.html) first.\n")
    (notes / "index.html").write_text("<html><head><title>Overview</title></head><body><h1>Start</h1>"
                                      "<p>See <a href='guide/setup.md'>setup</a>.</p><script>x()</script></body></html>")
    (notes / "todo.txt").write_text("buy lamp oil\n")
    (notes / "image.png").write_bytes(b"\x89PNG")
    docs = list(read_folder(notes))
    assert [(d.url, d.title) for d in docs] == [("notes/guide/setup.md", "Setting up"),
                                                ("notes/index.html", "Overview"), ("notes/todo.txt", "todo")]
    assert docs[1].text == "# Start\n\nSee [setup](guide/setup.md)."
    assert html_to_text("<ul><li>one</li><li><p>two</p></li></ul>") == ("", "  * one\n  * two")

    lines = [{"url": "a", "title": "A", "text": "alpha"}, {"url": "b", "text": "beta", "date": "2024-05-01"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert list(read_jsonl(path)) == [Document("a", "A", "alpha"), Document("b", "b", "beta", "2024-05-01")]
    path.write_text('{"url": "a", "text": "alpha"}\n{"url": "b"}\n')
    with pytest.raises(DocumentError, match="docs.jsonl line 2: field 'text' is missing"):
        list(read_jsonl(path))


def test_the_build_command_writes_a_corpus_that_search_reads(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "lamp.md").write_text("# Lamp\n\nTrim the wick of the lamp every evening.\n")
    (folder / "oven.md").write_text("# Oven\n\nBake bread before dawn.\n")
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text(json.dumps({"url": "x/1", "title": "Tide", "text": "The tide turns twice a day."}) + "\n")
    assert main(["build", "--out", str(tmp_path / "idx"), "--from", str(folder), "--from", str(jsonl)]) == 0
    assert "3 documents indexed" in capsys.readouterr().out
    assert json.loads((tmp_path / "idx" / "corpus.json").read_text())["sources"] == ["notes", "extra.jsonl"]
    assert main(["search", str(tmp_path / "idx"), "when does the tide turn", "-k", "1"]) == 0
    assert capsys.readouterr().out.split() [1:] == ["x/1", "Tide"]
    with pytest.raises(SystemExit, match="not 'stdlib', a folder or a .jsonl file"):
        main(["build", "--out", str(tmp_path / "bad"), "--from", str(tmp_path / "missing.txt")])
