"""``margin index info``: what an index directory holds, for every kind, old or damaged; and the
two defects found on the way: a folder build records its folder, and ``ask`` on an index smaller
than k answers from every passage it has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import QuestionKeywords, one_thread
from margin.cli import main
from margin.generation.decoding import DecodeConfig
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.info import describe_index
from margin.retrieval.manifest import Manifest
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever

JSON_KEYS = {
    "path", "kind", "parts", "passages", "documents", "documents_counted", "encoder",
    "encoder_fingerprint", "dim", "disk_bytes", "memory_bytes", "mapped_bytes", "created_at",
    "updated_at", "corpus", "folders", "checksums", "problems", "margin_version",
}
RECORDS = [  # two passages of one article: 4 passages, 3 distinct titles
    {"id": "fr", "title": "paris", "text": "paris is the capital of france ."},
    {"id": "fr2", "title": "paris", "text": "the seine is a river in paris ."},
    {"id": "de", "title": "berlin", "text": "berlin is the capital of germany ."},
    {"id": "it", "title": "rome", "text": "rome is the capital of italy ."},
]


def run(argv, capsys):
    with one_thread():
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_notes(folder: Path) -> Path:
    """3 files, 4 passages: long.txt is 150 words without a sentence end (100 + 50)."""
    folder.mkdir()
    (folder / "paris.txt").write_text("Paris is the capital of France.\n", encoding="utf-8")
    (folder / "rivers.md").write_text("# Rivers\n\nThe Seine is a river in France.\n",
                                      encoding="utf-8")
    (folder / "long.txt").write_text(" ".join(f"w{i}" for i in range(150)) + "\n",
                                     encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def notes_index(tmp_path_factory, st_model):
    """``margin index build --corpus notes/`` with the tiny sentence-transformers model."""
    root = tmp_path_factory.mktemp("notes")
    notes = write_notes(root / "notes")
    out = root / "notes-index"
    with one_thread():
        assert main(["index", "build", "--corpus", str(notes), "--encoder", str(st_model),
                     "--out", str(out)]) == 0
    return out, notes


@pytest.fixture(scope="module")
def records_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("records") / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def fields(stdout: str) -> dict[str, str]:
    """The printed lines as {name: value}."""
    return dict(line.split(maxsplit=1) for line in stdout.splitlines())


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- info


def test_info_of_a_folder_index_counts_its_files_and_passages(notes_index, st_model):
    out, notes = notes_index
    info = describe_index(out)
    assert (info.kind, info.parts, info.passages) == ("flat", [], 4)
    assert (info.documents, info.documents_counted) == (3, "files")
    assert info.encoder == str(st_model)
    manifest = Manifest.read(out)
    assert info.encoder_fingerprint == manifest.encoder["fingerprint"][:12]
    assert info.dim == manifest.encoder["dim"]
    assert info.corpus == str(notes.resolve()) and info.folders == [str(notes.resolve())]
    assert (info.created_at, info.updated_at) == (manifest.created_at, manifest.updated_at)
    assert (info.checksums, info.problems) == ("ok", [])
    assert info.disk_bytes == disk_bytes(out)
    assert info.memory_bytes == (out / "index.faiss").stat().st_size  # flat: the vectors
    passages = sum(p.stat().st_size for p in (out / "passages").iterdir())
    embeddings = sum(p.stat().st_size for p in (out / "embeddings").iterdir())
    assert info.mapped_bytes == passages + embeddings


def test_info_json_is_one_object_with_stable_keys(notes_index, capsys):
    out, notes = notes_index
    code, stdout, _ = run(["index", "info", "--index", out, "--json"], capsys)
    assert code == 0
    [obj] = [json.loads(line) for line in stdout.splitlines()]
    assert set(obj) == JSON_KEYS
    assert obj == describe_index(out).to_json()
    assert (obj["kind"], obj["passages"], obj["documents"], obj["checksums"]) == (
        "flat", 4, 3, "ok")
    assert obj["corpus"] == str(notes.resolve())


def test_info_prints_aligned_lines(notes_index, capsys):
    out, notes = notes_index
    code, stdout, _ = run(["index", "info", "--index", out], capsys)
    assert code == 0
    printed = fields(stdout)
    assert list(printed) == ["index", "kind", "passages", "documents", "encoder", "disk",
                            "memory", "built", "updated", "corpus", "checksums"]
    assert printed["passages"] == "4" and printed["documents"] == "3 files"
    assert printed["corpus"] == str(notes.resolve()) and printed["checksums"].startswith("ok")


def test_info_of_a_bm25_index_counts_titles(records_jsonl, tmp_path, capsys):
    out = tmp_path / "bm25"
    assert run(["index", "build", "--corpus", records_jsonl, "--kind", "bm25", "--out", out],
               capsys)[0] == 0
    info = describe_index(out)
    assert (info.kind, info.passages, info.documents, info.documents_counted) == (
        "bm25", 4, 3, "titles")
    assert (info.encoder, info.encoder_fingerprint, info.dim) == (None, None, None)
    assert info.corpus == str(records_jsonl.resolve()) and info.folders == []  # defect (a)
    assert info.memory_bytes == disk_bytes(out / "bm25") and info.checksums == "ok"
    code, stdout, _ = run(["index", "info", "--index", out], capsys)
    assert code == 0 and fields(stdout)["encoder"] == "none (BM25)"


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_info_of_approximate_kinds_and_passages_given_in_python(kind, tmp_path, keyword_encoder):
    passages = [Passage(r["id"], r["title"], r["text"]) for r in RECORDS]
    with one_thread():
        build_index(passages, keyword_encoder, tmp_path / kind, kind=kind, progress=False)
    info = describe_index(tmp_path / kind)
    assert (info.kind, info.passages, info.documents, info.dim) == (kind, 4, 3, 8)
    assert info.corpus is None and info.checksums == "ok"  # passages: no path to record
    assert info.memory_bytes == (tmp_path / kind / "index.faiss").stat().st_size


def test_info_names_the_parts_of_a_split_index(tmp_path, keyword_encoder):
    from margin.retrieval.sharded import split_index

    passages = [Passage(r["id"], r["title"], r["text"]) for r in RECORDS]
    with one_thread():
        build_index(passages, keyword_encoder, tmp_path / "flat", progress=False)
        split_index(tmp_path / "flat", parts=2)
    assert describe_index(tmp_path / "flat").parts == [2]


def test_a_corrupt_file_fails_the_checksums_naming_it(notes_index, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(notes_index[0], out)
    data = bytearray((out / "index.faiss").read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 notices
    (out / "index.faiss").write_bytes(bytes(data))
    info = describe_index(out)
    assert info.checksums == "failed" and len(info.problems) == 1
    assert "index.faiss" in info.problems[0]
    code, stdout, _ = run(["index", "info", "--index", out], capsys)
    assert code == 0 and fields(stdout)["checksums"].startswith("failed: ")
    assert "index.faiss" in fields(stdout)["checksums"]
    assert describe_index(out, verify=False).checksums == "skipped"  # sizes only: they match
    (out / "index.faiss").write_bytes(bytes(data[:-1]))
    assert describe_index(out, verify=False).checksums == "failed"


def test_an_old_manifest_shows_unknown(notes_index, tmp_path, capsys):
    """Older margins wrote neither the corpus nor the file checksums (timestamps were there
    from the first manifest on: a manifest without them is refused as corrupt)."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(notes_index[0], out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    del manifest["corpus"], manifest["files"]
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    info = describe_index(out)
    assert (info.corpus, info.checksums) == (None, "unknown")
    assert info.folders == [str(notes_index[1].resolve())]  # the passage store still knows
    code, stdout, _ = run(["index", "info", "--index", out], capsys)
    assert code == 0
    printed = fields(stdout)
    assert printed["corpus"].startswith("unknown") and printed["checksums"].startswith("unknown")


def test_a_missing_directory_is_one_line_and_nonzero(tmp_path, capsys):
    code, stdout, err = run(["index", "info", "--index", tmp_path / "nope"], capsys)
    assert code == 2 and stdout == ""
    assert err.strip().splitlines() == [
        f"margin: error: {tmp_path / 'nope'}: no such index directory; build the index first"]


def test_info_of_the_default_index(notes_index, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("MARGIN_HOME", str(tmp_path))
    code, _, err = run(["index", "info", "--index", "default"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not built yet" in err
    from margin.retrieval.retriever import default_index_dir

    shutil.copytree(notes_index[0], default_index_dir())
    code, stdout, _ = run(["index", "info", "--index", "default", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["path"] == str(default_index_dir())


# ----------------------------------------------------------------------------- defect (a)


def test_a_folder_build_records_the_folder(notes_index):
    """The CLI reads the folder itself (chunking, glob) and hands the builder passages; the
    manifest still names the folder, not "<passages>"."""
    out, notes = notes_index
    assert Manifest.read(out).corpus == str(notes.resolve())


def test_add_and_refresh_keep_the_recorded_corpus(notes_index, tmp_path, st_model, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(notes_index[0], out)
    more = tmp_path / "more"
    more.mkdir()
    (more / "alps.txt").write_text("The Alps are mountains.\n", encoding="utf-8")
    assert run(["index", "add", "--index", out, "--corpus", more], capsys)[0] == 0
    added = Manifest.read(out)
    assert added.corpus == str(notes_index[1].resolve()) and added.updated_at >= added.created_at
    info = describe_index(out)
    assert (info.documents, info.passages) == (4, 5)
    assert info.folders == sorted([str(notes_index[1].resolve()), str(more.resolve())])
    assert run(["index", "refresh", "--index", out, "--encoder", st_model, "--out",
                tmp_path / "refreshed"], capsys)[0] == 0
    assert Manifest.read(tmp_path / "refreshed").corpus == str(notes_index[1].resolve())


# ----------------------------------------------------------------------------- defect (b)


@pytest.fixture
def tiny_rag(tmp_path, bart):
    """A RAG whose index holds 3 passages, asking k=5 by default."""
    passages = [Passage(str(i), t, x) for i, (t, x) in enumerate([
        ("Paris", "Paris is the capital of France."),
        ("Berlin", "Berlin is the capital of Germany."),
        ("Seine", "The Seine is a river in France.")])]
    encoder = QuestionKeywords(("capital", "france", "germany", "river"))
    build_index(passages, encoder, tmp_path / "tiny", progress=False)
    retriever = Retriever(open_index(tmp_path / "tiny"), encoder)
    return RAG(bart, retriever, doc_score_scale=5.0, default_k=5,
               default_decode=DecodeConfig(max_new_tokens=3))


def test_ask_with_k_above_the_index_size_uses_every_passage(tiny_rag, caplog):
    with one_thread(), caplog.at_level("WARNING", logger="margin"):
        [answer] = tiny_rag.ask(["capital of france?"])
    assert len(answer.passages) == 3 and answer.passages[0].passage.title == "Paris"
    assert sum(p.prior for p in answer.passages) == pytest.approx(1.0, abs=1e-5)
    [record] = [r for r in caplog.records if r.name == "margin"]
    assert "\n" not in record.getMessage() and "--k" in record.getMessage()
    assert "3 passages" in record.getMessage()


def test_ask_on_the_command_line_with_a_tiny_index(tiny_rag, tmp_path, capsys, caplog,
                                                   monkeypatch):
    monkeypatch.setattr(RAG, "load", classmethod(lambda cls, **kw: tiny_rag))
    with caplog.at_level("WARNING", logger="margin"):
        code, stdout, _ = run(["ask", "--index", tmp_path / "tiny", "--json",
                               "capital of france?"], capsys)
    assert code == 0
    [obj] = [json.loads(line) for line in stdout.splitlines()]
    assert len(obj["passages"]) == 3
    assert "the index holds 3 passages" in caplog.text
