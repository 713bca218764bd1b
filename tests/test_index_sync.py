"""Keeping an index in step with its folder: `margin index sync` and `margin index remove`.

A folder generated here (a PDF, an HTML page with script and navigation noise, a Markdown file
with headings, a text file) is indexed with the keyword encoder, whose search results can be
worked out by hand: a one-keyword query scores a passage by that keyword's share of it, and 0
when the passage does not hold it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    ADMIN_TOKEN,
    SERVER_KEYWORDS,
    KeywordEncoder,
    QuestionKeywords,
    build_world,
    make_app,
    make_pdf,
    one_thread,
)
from margin.cli import main
from margin.errors import MarginError
from margin.retrieval import update
from margin.retrieval.build import add_to_index, build_index
from margin.retrieval.index import DenseIndex, Embeddings, IndexConfig
from margin.retrieval.manifest import Manifest
from margin.retrieval.passages import Chunking, Passage, read_corpus
from margin.retrieval.reader import open_index, verify_index
from margin.retrieval.sync import reading_record, remove_document, sync_index

FACTS = {  # the fact only that file holds -> (its title, its source)
    "zebra": ("Savanna Report", "reports/savanna.pdf#page=2"),
    "quokka": ("Island Wildlife", "web/island.html"),
    "narwhal": ("Arctic Notes", "arctic.md"),
    "axolotl": ("lakes.txt", "lakes.txt"),
}
NOISE = ("trackerpixel", "menuitem")  # in the HTML's script and navigation only
KEYWORDS = [*FACTS, "walrus", "otter", "animal", *NOISE]
KINDS = ("flat", "hnsw", "ivfpq", "hnswsq", "bm25")

HTML = """<!doctype html><html><head><title>Island Wildlife</title>
<script>var trackerpixel = 1;</script></head>
<body><nav><a href="/">menuitem Home</a></nav>
<article><h1>On the island</h1><p>The quokka is a small animal that smiles.</p></article>
</body></html>"""
MARKDOWN = "# Arctic Notes\n\nSome notes on the north.\n\n## Whales\n\nThe narwhal is an animal.\n"


class SpyEncoder(KeywordEncoder):
    """The keyword encoder, remembering the source of every passage it encodes."""

    def __init__(self):
        super().__init__(KEYWORDS)
        self.sources: list[str] = []

    def encode_passages(self, passages, batch_size=64, progress=False):
        self.sources.extend(p.source for p in passages)
        return super().encode_passages(passages, batch_size, progress)


def write_folder(root: Path) -> Path:
    (root / "reports").mkdir(parents=True)
    (root / "web").mkdir()
    (root / "reports" / "savanna.pdf").write_bytes(
        make_pdf(["Grassland survey animal", "The zebra grazes here"], "Savanna Report"))
    (root / "web" / "island.html").write_text(HTML, "utf-8")
    (root / "arctic.md").write_text(MARKDOWN, "utf-8")
    (root / "lakes.txt").write_text("The axolotl is an animal of lakes.\n", "utf-8")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "notes")


def build(folder: Path, out: Path, kind: str = "flat", shard_size: int = 100,
          encoder: KeywordEncoder | None = None) -> KeywordEncoder:
    encoder = encoder or SpyEncoder()
    build_index(read_corpus(folder), None if kind == "bm25" else encoder, out, kind=kind,
                shard_size=shard_size, progress=False,
                document_folders=reading_record(folder, Chunking(), None))
    return encoder


def top(directory: Path, word: str) -> tuple[Passage, float]:
    """The best passage for a one-keyword query, and its score."""
    index = open_index(directory)
    query = KeywordEncoder(KEYWORDS).encode_queries([word]) if index.dense else [word]
    result = index.search(query, k=1)
    return index.passages(result)[0][0], float(result.scores[0, 0])


def texts(directory: Path) -> list[str]:
    store = open_index(directory).store
    return [p.text for p in store.get(range(len(store)))]


def edit_and_delete(folder: Path) -> None:
    """arctic.md: the narwhal becomes a walrus (new size and time); lakes.txt is deleted."""
    (folder / "arctic.md").write_text(MARKDOWN.replace("narwhal", "walrus"), "utf-8")
    (folder / "lakes.txt").unlink()


# ----------------------------------------------------------------------------- sync


def test_each_file_is_found_then_sync_re_encodes_only_the_edited_file(folder, tmp_path):
    out = tmp_path / "idx"
    encoder = build(folder, out)
    for fact, (title, source) in FACTS.items():
        best, score = top(out, fact)
        assert (best.title, best.source) == (title, source) and score > 0, fact
    assert not any(noise in t for t in texts(out) for noise in NOISE)  # script, nav dropped
    before = Manifest.read(out)

    edit_and_delete(folder)
    encoder.sources.clear()
    report = sync_index(out, folder, encoder, progress=False)

    assert encoder.sources == ["arctic.md"]  # the edited file only, once
    changes = report.changes
    assert (changes.added, changes.changed, changes.removed, changes.unchanged) == (
        [], ["arctic.md"], ["lakes.txt"], 2)
    assert (report.encoded, report.removed) == (1, 2)
    best, score = top(out, "walrus")
    assert (best.title, best.source, best.id) == ("Arctic Notes", "arctic.md", "arctic.md:1")
    assert score > 0
    for gone in ("narwhal", "axolotl"):
        assert top(out, gone)[1] == 0 and not any(gone in t for t in texts(out))
    for fact in ("zebra", "quokka"):  # untouched files still found, with their titles
        assert top(out, fact)[0].title == FACTS[fact][0]
    after = Manifest.read(out)
    assert after.generation == before.generation + 1 and after.passages == before.passages - 1
    assert verify_index(out, encoder=False) == []
    assert report.summary() == (
        f"synced {out} with {folder.resolve()}: 0 added, 1 changed, 1 removed, 2 unchanged "
        f"files; 1 passages encoded, 2 removed ({after.passages} passages)")


@pytest.mark.parametrize("kind", KINDS)
def test_sync_adds_changes_and_removes_for_every_kind(folder, tmp_path, kind):
    out = tmp_path / kind
    encoder = build(folder, out, kind, shard_size=2)  # several shards: some kept, some rewritten
    edit_and_delete(folder)
    (folder / "river.txt").write_text("The otter is an animal of rivers.\n", "utf-8")
    encoder.sources.clear()
    report = sync_index(out, folder, None if kind == "bm25" else encoder, progress=False)
    assert (report.changes.added, report.changes.changed) == (["river.txt"], ["arctic.md"])
    assert sorted(encoder.sources) == ([] if kind == "bm25" else ["arctic.md", "river.txt"])
    assert top(out, "otter")[0].source == "river.txt"
    assert top(out, "walrus")[0].source == "arctic.md"
    assert top(out, "axolotl")[1] == 0 and top(out, "narwhal")[1] == 0
    assert top(out, "zebra")[0].source == "reports/savanna.pdf#page=2"
    assert verify_index(out, encoder=False) == []
    # what a fresh build of the folder gives, passage for passage (order aside)
    fresh = tmp_path / "fresh"
    build(folder, fresh, kind)
    synced, built = open_index(out).store, open_index(fresh).store
    assert len(synced) == len(built) == 5
    for a, b in zip(sorted(synced.get(range(5)), key=lambda p: p.id),
                    sorted(built.get(range(5)), key=lambda p: p.id), strict=True):
        assert (a.id, a.title, a.text, a.source, a.file) == (b.id, b.title, b.text, b.source,
                                                              b.file)


def test_an_unchanged_or_only_touched_folder_is_left_as_it_is(folder, tmp_path):
    out = tmp_path / "idx"
    encoder = build(folder, out)
    before = Manifest.read(out)
    later = (folder / "lakes.txt").stat().st_mtime_ns + 10**9
    os.utime(folder / "lakes.txt", ns=(later, later))  # same content, a newer time
    encoder.sources.clear()
    report = sync_index(out, folder, encoder, progress=False)
    assert encoder.sources == [] and report.changes.unchanged == 4 and not report.changes.any
    assert Manifest.read(out) == before  # no new generation
    # a later real change rewrites the touched file's shard: its record takes the new time
    (folder / "arctic.md").write_text(MARKDOWN.replace("narwhal", "walrus"), "utf-8")
    sync_index(out, folder, encoder, progress=False)
    records = {f.path: f for f, _ in open_index(out).store.files()}
    assert records["lakes.txt"].mtime_ns == later


def test_sync_reads_the_folder_as_it_was_built_unless_told(folder, tmp_path, capsys):
    out = tmp_path / "idx"
    argv = ["index", "build", "--corpus", folder, "--out", out, "--kind", "bm25",
            "--chunk-words", "3", "--glob", "*.md"]
    assert run(argv, capsys)[0] == 0
    folders = Manifest.read(out).document_folders
    assert folders == {str(folder.resolve()): {"glob": "*.md", "chunk_words": 3,
                                               "chunk_overlap": 0}}
    edit_and_delete(folder)  # lakes.txt was never indexed (not *.md)
    code, printed, _ = run(["index", "sync", "--index", out], capsys)  # the recorded folder
    assert code == 0
    assert "0 added, 1 changed, 0 removed, 0 unchanged files" in printed.splitlines()[0]
    assert any("walrus" in t for t in texts(out))
    assert all(len(t.split()) <= 3 for t in texts(out))
    (folder / "arctic.md").write_text(MARKDOWN, "utf-8")  # told otherwise: 50-word passages
    assert run(["index", "sync", "--index", out, "--chunk-words", "50"], capsys)[0] == 0
    assert texts(out) == ["Arctic Notes Some notes on the north. Whales The narwhal is an animal."]
    assert Manifest.read(out).document_folders[str(folder.resolve())]["chunk_words"] == 50


def test_new_shards_after_a_sync_do_not_collide_with_an_add(folder, tmp_path):
    """A sync names its shards past the highest number; a later add must too."""
    out = tmp_path / "idx"
    encoder = build(folder, out, shard_size=1)  # arctic, lakes, pdf page 1, page 2, island
    (folder / "web" / "island.html").write_text(HTML.replace("quokka", "walrus"), "utf-8")
    sync_index(out, folder, encoder, progress=False)
    names = [s.name for s in Manifest.read(out).shards]
    assert names == ["shard-00000", "shard-00001", "shard-00002", "shard-00003", "shard-00005"]
    add_to_index(out, [Passage("x", "Otters", "The otter is an animal.")], encoder,
                 progress=False)
    assert Manifest.read(out).shards[-1].name == "shard-00006"
    assert verify_index(out, encoder=False) == [] and top(out, "otter")[0].id == "x"
    assert top(out, "walrus")[0].source == "web/island.html"


# ----------------------------------------------------------------------------- crash and resume


def test_a_sync_that_fails_midway_leaves_the_old_index_and_a_rerun_finishes(
    folder, tmp_path, monkeypatch
):
    out, reference = tmp_path / "idx", tmp_path / "reference"
    encoder = build(folder, out, shard_size=1)
    (folder / "river.txt").write_text("The otter is an animal. An otter swims.\n", "utf-8")
    (folder / "sea.txt").write_text("The walrus is an animal.\n", "utf-8")
    (folder / "web" / "island.html").write_text(HTML.replace("quokka", "walrus"), "utf-8")
    shutil.copytree(out, reference)
    before = Manifest.read(out)

    saved = []
    real = update.save_npy

    def fail_after_first_shard(path, array):
        if saved:
            raise KeyboardInterrupt  # as a kill would, between two shards
        saved.append(path)
        real(path, array)

    monkeypatch.setattr(update, "save_npy", fail_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        sync_index(out, folder, encoder, progress=False)
    monkeypatch.undo()
    assert Manifest.read(out) == before and verify_index(out, encoder=False) == []
    assert top(out, "quokka")[0].source == "web/island.html"  # the old index answers as before

    encoder.sources.clear()
    sync_index(out, folder, encoder, progress=False)
    resumed = list(encoder.sources)
    full = SpyEncoder()
    sync_index(reference, folder, full, progress=False)
    assert full.sources == ["river.txt", "sea.txt", "web/island.html"]  # a shard each
    assert resumed == full.sources[1:]  # the finished shard was kept, not encoded again
    assert verify_index(out, encoder=False) == [] and Manifest.read(out).generation == 1
    for word in ("walrus", "otter", "zebra", "quokka", "narwhal"):
        assert top(out, word) == top(reference, word)


# ----------------------------------------------------------------------------- remove


@pytest.mark.parametrize("kind", KINDS)
def test_remove_by_source_and_by_id_for_every_kind(folder, tmp_path, kind):
    out = tmp_path / kind
    build(folder, out, kind, shard_size=2)
    n = len(open_index(out).store)
    assert remove_document(out, source="reports/savanna.pdf", progress=False)[0] == 2  # 2 pages
    assert top(out, "zebra")[1] == 0 and not any("zebra" in t for t in texts(out))
    assert remove_document(out, id="web/island.html:1", progress=False)[0] == 1
    assert top(out, "quokka")[1] == 0
    index = open_index(out)
    assert len(index.store) == n - 3 and verify_index(out, encoder=False) == []
    ids = [p.id for p in index.store.get(range(len(index.store)))]
    assert ids == ["arctic.md:1", "lakes.txt:1"]  # the others keep their ids (and order)
    assert top(out, "narwhal")[0].id == "arctic.md:1" and top(out, "axolotl")[0].source == (
        "lakes.txt")
    assert remove_document(out, source=str(folder / "arctic.md"), progress=False)[0] == 1
    with pytest.raises(MarginError, match="no passages; delete the index directory"):
        remove_document(out, source="lakes.txt", progress=False)
    assert top(out, "axolotl")[0].source == "lakes.txt" and verify_index(out, encoder=False) == []


def test_remove_a_corpus_document_split_into_passages(tmp_path):
    corpus = [Passage("doc-1", "T", "paris"), Passage("doc-2", "T", "france"),
              Passage("doc-10", "T", "rome"), Passage("other", "T", "river")]
    encoder = KeywordEncoder()
    build_index(corpus, encoder, tmp_path / "idx", progress=False)
    assert remove_document(tmp_path / "idx", id="doc", progress=False)[0] == 3
    assert [p.id for p in open_index(tmp_path / "idx").store.get([0])] == ["other"]


@pytest.mark.parametrize(("kind", "opq"), [("flat", False), ("ivfpq", False), ("ivfpq", True)])
def test_faiss_removal_equals_the_same_index_given_only_the_rows_kept(kind, opq):
    """Removing in place (no re-training, no re-encoding) and renumbering the rows gives the
    index FAISS would have built from the kept vectors with the same training."""
    import faiss

    vectors = np.random.default_rng(0).standard_normal((800, 16)).astype(np.float32)
    config = IndexConfig(kind=kind, opq=opq, rerank=1)
    index = DenseIndex.build(Embeddings([vectors]), config)
    same = faiss.clone_index(index.index)
    same.reset()  # trained, empty
    drop = np.array([0, 3, 400, 799])
    kept = np.delete(vectors, drop, axis=0)
    index.remove(drop)
    same.add(kept)
    got = index.index.search(kept[:40], 10)
    want = same.search(kept[:40], 10)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])
    hnsw = DenseIndex.build(Embeddings([vectors]), IndexConfig(kind="hnsw"))
    with pytest.raises(MarginError, match="cannot remove vectors in place"):
        hnsw.remove(drop)


# ----------------------------------------------------------------------------- command line


def run(argv, capsys):
    with one_thread():
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sync_and_remove_print_one_line(folder, tmp_path, capsys):
    out = tmp_path / "idx"
    assert run(["index", "build", "--corpus", folder, "--out", out, "--kind", "bm25"],
               capsys)[0] == 0
    edit_and_delete(folder)
    code, printed, _ = run(["index", "sync", "--index", out, "--corpus", folder], capsys)
    assert code == 0 and printed.startswith(f"synced {out} with {folder.resolve()}: 0 added")
    code, printed, _ = run(["index", "remove", "--index", out, "--source", "web/island.html"],
                           capsys)
    assert (code, printed) == (0, f"removed 1 passages from {out} (3 left)\n")
    code, printed, _ = run(["index", "remove", "--index", out, "--id", "arctic.md:1"], capsys)
    assert (code, printed) == (0, f"removed 1 passages from {out} (2 left)\n")


def test_user_errors_are_one_line(folder, tmp_path, capsys, corpus_jsonl):
    records, notes = tmp_path / "records", tmp_path / "idx"
    assert run(["index", "build", "--corpus", corpus_jsonl, "--out", records, "--kind", "bm25"],
               capsys)[0] == 0
    assert run(["index", "build", "--corpus", folder, "--out", notes, "--kind", "bm25"],
               capsys)[0] == 0
    other = write_folder(tmp_path / "other")
    cases = {
        ("sync", "--index", records, "--corpus", folder): "was not built from a folder",
        ("sync", "--index", notes, "--corpus", tmp_path / "nope"): "no such folder",
        ("sync", "--index", notes, "--corpus", other): "holds no documents of",
        ("sync", "--index", tmp_path / "nope", "--corpus", folder): "no such index directory",
        ("remove", "--index", notes, "--source", "nope.md"): "no passage of",
        ("remove", "--index", notes, "--id", "nope.md:1"): "no passage of",
        ("remove", "--index", notes): "--source PATH or --id ID",
        ("remove", "--index", notes, "--source", "a", "--id", "b"): "--source PATH or --id ID",
    }
    for argv, message in cases.items():
        code, _, err = run(["index", *argv], capsys)
        assert code != 0 and err.startswith("margin: error: ") and err.count("\n") == 1, argv
        assert message in err, (argv, err)
    assert verify_index(notes, encoder=False) == []


# ----------------------------------------------------------------------------- serving


def test_a_running_server_swaps_to_the_synced_index(tmp_path, bart):
    """The admin registers the synced directory under a new name and activates it: a new
    version, the new passages; the old entry still answers from the files it has open."""
    from fastapi.testclient import TestClient

    world = build_world(tmp_path / "indexes", bart)
    root = world[0]
    notes = tmp_path / "indexes" / "notes-folder"
    notes.mkdir()
    (notes / "germany.txt").write_text("Berlin is the capital of Germany.\n", "utf-8")
    (notes / "italy.txt").write_text("Rome is the capital of Italy.\n", "utf-8")
    encoder = QuestionKeywords(SERVER_KEYWORDS)
    build_index(read_corpus(notes), encoder, root / "notes", progress=False)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(make_app(world)) as client:

        def register(name: str) -> dict:
            r = client.post("/v1/indexes", headers=admin,
                            json={"name": name, "directory": "notes", "activate": True})
            assert r.status_code == 201, r.text
            return r.json()

        def best(question: str) -> str:
            r = client.post("/v1/search", json={"query": question, "k": 1})
            assert r.status_code == 200, r.text
            return r.json()["results"][0]["passages"][0]["text"]

        first = register("notes")
        assert best("capital of germany?") == "Berlin is the capital of Germany."
        (notes / "germany.txt").write_text("Bonn is the capital of Germany.\n", "utf-8")
        sync_index(root / "notes", notes, encoder, progress=False)
        assert best("capital of germany?") == "Berlin is the capital of Germany."  # still open
        second = register("notes-2")
        assert second["version"] != first["version"]
        assert best("capital of germany?") == "Bonn is the capital of Germany."
        assert best("capital of italy?") == "Rome is the capital of Italy."
