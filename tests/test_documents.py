"""A folder of the user's own documents as an index: the readers, the walk, the chunking."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import pytest

from helpers import KeywordEncoder, make_pdf
from margin.cli import main
from margin.errors import MarginError
from margin.retrieval.build import add_to_index, build_index
from margin.retrieval.documents import read_folder, walk
from margin.retrieval.passages import Chunking, Passage, chunk_text, read_corpus
from margin.retrieval.reader import open_index
from margin.retrieval.store import EMPTY_CHECKSUM, PassageStore, write_shard

FACTS = {  # the one fact only that file holds -> (its title, its source)
    "zebra": ("Savanna Report", "reports/savanna.pdf#page=2"),
    "quokka": ("Island Wildlife", "web/island.html"),
    "narwhal": ("Arctic Notes", "arctic.md"),
    "axolotl": ("lakes.txt", "lakes.txt"),
}
NOISE = ("trackerpixel", "menuitem", "cssrule", "cookiebanner")  # in the HTML's chrome only
KEYWORDS = [*FACTS, "animal", "hidden", *NOISE]


def encrypted_pdf() -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=io.BytesIO(make_pdf(["secret animal"], "Locked")))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


HTML = """<!doctype html><html><head><title>Island Wildlife</title>
<style>.x { color: red } /* cssrule */</style>
<script>var trackerpixel = 1;</script></head>
<body><header><nav><a href="/">menuitem Home</a> <a href="/b">menuitem Blog</a></nav></header>
<article><h1>On the island</h1><p>The <b>quokka</b> is a small animal that smiles.</p></article>
<aside>cookiebanner: accept all</aside><footer>menuitem Contact</footer>
<noscript>trackerpixel</noscript></body></html>"""

MARKDOWN = """# Arctic Notes

Some *notes* on the north.

## Whales

The **narwhal** is an animal with a [tusk](https://example.org).
"""


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "notes"
    (root / "reports").mkdir(parents=True)
    (root / "web").mkdir()
    (root / ".git").mkdir()
    (root / "reports" / "savanna.pdf").write_bytes(
        make_pdf(["Grassland survey animal", "The zebra grazes here"], "Savanna Report"))
    (root / "web" / "island.html").write_text(HTML, "utf-8")
    (root / "arctic.md").write_text(MARKDOWN, "utf-8")
    (root / "lakes.txt").write_text("The axolotl is an animal of lakes.\n", "utf-8")
    (root / ".secret.txt").write_text("hidden animal", "utf-8")  # hidden: never read
    (root / ".git" / "notes.txt").write_text("hidden animal", "utf-8")  # in a hidden folder
    (root / "empty.md").write_text("  \n", "utf-8")
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf at all")
    (root / "locked.pdf").write_bytes(encrypted_pdf())
    (root / "latin1.txt").write_bytes("caf\xe9 animal".encode("latin-1"))
    (root / "data.csv").write_text("a,b\n", "utf-8")  # not a supported type: not selected
    return root


def test_a_folder_is_indexed_and_each_fact_found_with_its_title_and_source(folder, tmp_path):
    encoder = KeywordEncoder(KEYWORDS)
    skipped = []
    build_index(read_corpus(folder, skipped=skipped), encoder, tmp_path / "idx", progress=False)
    index = open_index(tmp_path / "idx")
    for fact, (title, source) in FACTS.items():
        result = index.search(encoder.encode_queries([fact]), k=1)
        (best,) = index.passages(result)[0]
        assert (best.title, best.source) == (title, source), fact
        assert fact in best.text.lower()
    texts = [p.text.lower() for p in index.store.get(range(len(index.store)))]
    assert not [n for n in (*NOISE, "hidden") if any(n in t for t in texts)]  # chrome dropped
    assert any("on the island" in t for t in texts)  # the article's own heading is kept
    assert sorted((s.path, s.reason.split(" (")[0]) for s in skipped) == [
        ("broken.pdf", "not a readable PDF"),
        ("empty.md", "empty"),
        ("latin1.txt", "not UTF-8"),
        ("locked.pdf", "encrypted"),
    ]


def test_ids_are_the_path_and_position_and_stable(folder):
    first = [p.id for p in read_folder(folder)]
    assert first == [p.id for p in read_folder(folder)]
    assert first == [
        "arctic.md:1", "lakes.txt:1", "reports/savanna.pdf:1", "reports/savanna.pdf:2",
        "web/island.html:1",
    ]  # sorted paths; a PDF's passages number on across its pages


def test_the_store_records_each_file_for_a_later_sync(folder, tmp_path):
    build_index(read_corpus(folder), None, tmp_path / "idx", kind="bm25", progress=False)
    files = {f.path: (f, n) for f, n in open_index(tmp_path / "idx").store.files()}
    assert sorted(files) == ["arctic.md", "lakes.txt", "reports/savanna.pdf", "web/island.html"]
    pdf, count = files["reports/savanna.pdf"]
    data = (folder / "reports" / "savanna.pdf").read_bytes()
    assert count == 2 and pdf.size == len(data)
    assert pdf.sha256 == hashlib.sha256(data).hexdigest()
    assert pdf.mtime_ns == (folder / "reports" / "savanna.pdf").stat().st_mtime_ns
    assert pdf.folder == str(folder.resolve())


def test_a_file_spanning_shards_is_listed_once_and_old_stores_list_none(folder, tmp_path):
    passages = list(read_folder(folder))
    store_dir = tmp_path / "store"
    before = write_shard(store_dir / "shard-00000.arrow", passages[:3], EMPTY_CHECKSUM)
    write_shard(store_dir / "shard-00001.arrow", passages[3:], before)
    files = dict((f.path, n) for f, n in PassageStore.open(store_dir).files())
    assert files["reports/savanna.pdf"] == 2  # one passage in each shard
    old = tmp_path / "old"  # a store of records (as every store written before): no files
    write_shard(old / "shard-00000.arrow", [Passage("a", "T", "text")], EMPTY_CHECKSUM)
    assert PassageStore.open(old).files() == []


def test_index_add_takes_a_folder(folder, tmp_path):
    (tmp_path / "first.jsonl").write_text('{"id": "x", "title": "X", "text": "hello"}\n')
    build_index(tmp_path / "first.jsonl", None, tmp_path / "idx", kind="bm25", progress=False)
    manifest = add_to_index(tmp_path / "idx", read_corpus(folder, glob="*.md"), progress=False)
    assert manifest.passages == 2  # the JSONL's one and arctic.md's (empty.md has no text)
    assert [f.path for f, _ in open_index(tmp_path / "idx").store.files()] == ["arctic.md"]


def test_glob_selects_among_the_files_and_hidden_ones_stay_out(folder):
    assert walk(folder, "*.pdf") == ["broken.pdf", "locked.pdf", "reports/savanna.pdf"]
    assert walk(folder, "web/*") == ["web/island.html"]
    assert ".secret.txt" not in walk(folder, "*") and "data.csv" in walk(folder, "*")
    assert "data.csv" not in walk(folder)  # by default only the supported types


def test_a_folder_with_nothing_readable_is_one_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_text("")
    with pytest.raises(MarginError, match=r"no passages in 1 file\(s\); 1 skipped, e.g. empty"):
        list(read_folder(tmp_path / "d"))


def test_a_missing_docs_extra_names_the_install_command(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # import pypdf now raises ImportError
    with pytest.raises(MarginError, match=r"needs pypdf: pip install 'margin\[docs\]'"):
        read_folder(folder)


# ----------------------------------------------------------------------------- chunking


def test_chunks_prefer_a_paragraph_end_then_a_sentence_end_near_the_limit():
    words = [f"w{i}" for i in range(30)]
    one = " ".join(words[:8]) + ". " + " ".join(words[8:17]) + "\n\n" + " ".join(words[17:])
    # Limit 20 words, window 4: the paragraph end after word 17 is within it.
    assert [len(c.split()) for c in chunk_text(one, Chunking(words=20), True)] == [17, 13]
    # Without boundaries (records, the paper's): exactly at the limit.
    assert [len(c.split()) for c in chunk_text(one, Chunking(words=20))] == [20, 10]
    # A sentence end far before the limit (word 8 of 20) is not used: too short a chunk.
    flat = " ".join(words[:8]) + ". " + " ".join(words[8:])
    assert [len(c.split()) for c in chunk_text(flat, Chunking(words=20), True)] == [20, 10]
    # A sentence end in the window is, when there is no paragraph end.
    near = " ".join(words[:18]) + ". " + " ".join(words[18:])
    assert chunk_text(near, Chunking(words=20), True)[0].endswith("w17.")


def test_overlap_repeats_the_last_words_and_never_stalls():
    text = " ".join(str(i) for i in range(10))
    assert chunk_text(text, Chunking(words=4, overlap=2)) == [
        "0 1 2 3", "2 3 4 5", "4 5 6 7", "6 7 8 9"]
    # the character bound cuts a chunk to fewer words than the overlap: it still moves on
    chunks = chunk_text("aaaa bbbb cccc dddd", Chunking(words=3, overlap=2, chars=9))
    assert chunks == ["aaaa bbbb", "bbbb cccc", "cccc dddd"]


def test_overlap_must_be_less_than_the_chunk_words():
    with pytest.raises(MarginError, match="--chunk-overlap must be .* less than --chunk-words"):
        Chunking(words=10, overlap=10)
    with pytest.raises(MarginError, match="--chunk-words must be at least 1"):
        Chunking(words=0)


def test_chunking_reaches_jsonl_but_a_dpr_tsv_is_kept_as_it_is(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "d", "title": "T", "text": "a b c d e"}\n')
    assert [p.text for p in read_corpus(path, Chunking(words=2))] == ["a b", "c d", "e"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("id\ttext\ttitle\n1\ta b c\tT\n")
    with pytest.raises(MarginError, match="rows are passages already"):
        read_corpus(tsv, Chunking(words=2))
    with pytest.raises(MarginError, match="--glob selects files in a folder"):
        read_corpus(path, glob="*.md")


# ----------------------------------------------------------------------------- command line


def test_cli_builds_from_a_folder_and_reports_the_skipped_files(folder, tmp_path, capsys):
    out = tmp_path / "idx"
    argv = ["index", "build", "--corpus", str(folder), "--out", str(out), "--kind", "bm25"]
    assert main([*argv, "--chunk-words", "3", "--chunk-overlap", "1"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 4 files that gave no text (--verbose lists them)" in printed
    assert len(open_index(out).store) > 5  # 3-word passages: more than one per file
    assert main([*argv, "--overwrite", "--verbose"]) == 0
    printed = capsys.readouterr().out
    assert "  locked.pdf: encrypted (needs a password)" in printed
    assert main([*argv, "--overwrite", "--chunk-words", "5", "--chunk-overlap", "5"]) != 0
    error = capsys.readouterr().err
    assert error.startswith("margin: error: --chunk-overlap must be") and error.count("\n") == 1


def test_passages_copied_from_a_store_keep_their_files(folder, tmp_path):
    """A store's passages carry their files again when read (as a refresh or a sync copies
    them), so a shard written from them records the same files."""
    passages = list(read_folder(folder))
    first = tmp_path / "a" / "shard-00000.arrow"
    write_shard(first, [Passage("r", "Record", "no file"), *passages], EMPTY_CHECKSUM)
    store = PassageStore.open(first.parent)
    copied = store.get(range(len(store)))
    assert copied[0].file is None and [p.file for p in copied[1:]] == [p.file for p in passages]
    write_shard(tmp_path / "b" / "shard-00000.arrow", copied[::-1], EMPTY_CHECKSUM)  # reversed
    assert sorted(PassageStore.open(tmp_path / "b").files(), key=str) == sorted(
        store.files(), key=str)
    interleaved = [passages[2], passages[0], passages[3]]  # the PDF's two pages apart
    with pytest.raises(MarginError, match="savanna.pdf are not consecutive"):
        write_shard(tmp_path / "c" / "shard-00000.arrow", interleaved, EMPTY_CHECKSUM)
