"""The index directory: build, resume after a crash (SIGKILL), validate on open, append."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import margin
from helpers import DOCS, KeywordEncoder, TableEncoder, clustered, kill_after_shards
from margin.errors import MarginError
from margin.retrieval.build import add_to_index, build_index
from margin.retrieval.index import IndexConfig
from margin.retrieval.manifest import MANIFEST
from margin.retrieval.passages import Passage, read_corpus
from margin.retrieval.reader import (
    ensure_encoder_matches,
    ensure_query_encoder_matches,
    open_index,
    verify_index,
)
from margin.retrieval.store import chain_checksum

TESTS = Path(__file__).parent


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def many_docs(n: int) -> list[dict]:
    """n documents mentioning keywords in a varying mix (so results are not all ties)."""
    words = ["paris", "france", "berlin", "germany", "rome", "italy", "river", "mountain"]
    return [
        {
            "id": f"d{i}",
            "title": f"Doc {i}",
            "text": " ".join(words[(i * j) % 8] for j in range(1, 2 + i % 5)),
        }
        for i in range(n)
    ]


def query(encoder: KeywordEncoder, *texts: str) -> np.ndarray:
    return encoder.encode_queries(list(texts))  # (n, dim)


# ----------------------------------------------------------------------------- build and open


def test_build_and_search_by_hand(corpus_jsonl, keyword_encoder, tmp_path):
    out = tmp_path / "idx"
    manifest = build_index(corpus_jsonl, keyword_encoder, out, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "idx"]  # no work directory left
    assert sorted(os.listdir(out)) == ["embeddings", "index.faiss", MANIFEST, "passages"]
    index = open_index(out)
    # "mountain": Alps is all mountain (score 1); Rome has rome x2, italy, mountain (1/sqrt(6)).
    result = index.search(query(keyword_encoder, "mountain"), k=2)
    assert [p.title for p in index.passages(result)[0]] == ["Alps", "Rome"]
    np.testing.assert_allclose(result.scores[0], [1.0, 1 / np.sqrt(6)], rtol=1e-6)
    # "germany": the Rhine (river, germany: 1/sqrt(2)) beats Berlin (berlin x2, germany: 1/sqrt(5)).
    result = index.search(query(keyword_encoder, "germany"), k=2)
    assert [p.title for p in index.passages(result)[0]] == ["Rhine", "Berlin"]
    # The manifest says what the index is.
    passages = list(read_corpus(corpus_jsonl))
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["kind"] == "flat" and on_disk["metric"] == "ip" and on_disk["passages"] == 6
    assert on_disk["corpus_checksum"] == chain_checksum(passages) == manifest.corpus_checksum
    assert on_disk["encoder"] == {
        "spec": keyword_encoder.spec,
        "fingerprint": keyword_encoder.fingerprint,
        "dim": 8,
    }
    assert on_disk["shards"] == [
        {"name": "shard-00000", "rows": 6, "checksum": chain_checksum(passages)}
    ]
    assert on_disk["format_version"] == 1 and on_disk["margin_version"] == margin.__version__
    assert on_disk["index_params"]["kind"] == "flat" and "created_at" in on_disk
    np.testing.assert_array_equal(
        np.load(out / "embeddings" / "shard-00000.npy"), keyword_encoder.encode_passages(passages)
    )


def test_bm25_index_needs_no_encoder(corpus_jsonl, tmp_path):
    build_index(corpus_jsonl, None, tmp_path / "idx", kind="bm25", progress=False)
    index = open_index(tmp_path / "idx")
    assert index.manifest.encoder is None and index.dense is None
    result = index.search(["a mountain range"], k=1)
    assert index.passages(result)[0][0].title == "Alps"
    with pytest.raises(MarginError, match="BM25 index: search it with query strings"):
        index.search(np.zeros((1, 8), np.float32), k=1)


def test_build_refuses_bad_requests(corpus_jsonl, keyword_encoder, tmp_path):
    with pytest.raises(MarginError, match="'hnsw' index needs an encoder"):
        build_index(corpus_jsonl, None, tmp_path / "a", kind="hnsw", progress=False)
    with pytest.raises(MarginError, match="kind='flat' but the config is for 'hnsw'"):
        build_index(
            corpus_jsonl,
            keyword_encoder,
            tmp_path / "a",
            kind="flat",
            config=IndexConfig(kind="hnsw"),
            progress=False,
        )
    with pytest.raises(MarginError, match="unknown index kind 'annoy'"):
        build_index(corpus_jsonl, keyword_encoder, tmp_path / "a", kind="annoy", progress=False)
    dup = write_jsonl(tmp_path / "dup.jsonl", [DOCS[0], DOCS[1], DOCS[0]])
    with pytest.raises(MarginError, match="occurs more than once in the corpus"):
        build_index(dup, keyword_encoder, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_existing_output_needs_overwrite(corpus_jsonl, keyword_encoder, tmp_path):
    out = tmp_path / "idx"
    build_index(corpus_jsonl, keyword_encoder, out, progress=False)
    with pytest.raises(MarginError, match=r"exists \(an index\); replace it with --overwrite"):
        build_index(corpus_jsonl, keyword_encoder, out, progress=False)
    build_index(corpus_jsonl, None, out, kind="bm25", overwrite=True, progress=False)
    assert open_index(out).manifest.kind == "bm25"
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "idx"]


def test_config_kind_is_used_and_resolved(keyword_encoder, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", many_docs(60))
    manifest = build_index(
        corpus,
        keyword_encoder,
        tmp_path / "idx",
        config=IndexConfig(kind="hnsw", hnsw_m=8),
        progress=False,
    )
    assert manifest.kind == "hnsw" and manifest.index_params["hnsw_m"] == 8
    assert open_index(tmp_path / "idx").dense.config.hnsw_m == 8


# ----------------------------------------------------------------------------- resume


class FailingEncoder(KeywordEncoder):
    """Raises on call number ``fail_at`` (1-based) of encode_passages: a crash mid-build."""

    def __init__(self, fail_at: int, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.fail_at = 0, fail_at

    def encode_passages(self, passages, batch_size=64, progress=False):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated crash")
        return super().encode_passages(passages, batch_size, progress)


def assert_same_index(a: Path, b: Path, encoder: KeywordEncoder) -> None:
    x, y = open_index(a), open_index(b)
    assert x.manifest.corpus_checksum == y.manifest.corpus_checksum
    assert x.manifest.shards == y.manifest.shards
    assert x.store.ids().to_pylist() == y.store.ids().to_pylist()
    for ex, ey in zip(x.dense.embeddings.shards, y.dense.embeddings.shards, strict=True):
        np.testing.assert_array_equal(ex, ey)
    q = query(encoder, "paris", "river mountain", "germany italy", "rome")
    rx, ry = x.search(q, k=10), y.search(q, k=10)
    np.testing.assert_array_equal(rx.rows, ry.rows)
    np.testing.assert_array_equal(rx.scores, ry.scores)


def test_resume_after_an_exception(keyword_encoder, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", many_docs(40))
    with pytest.raises(KeyboardInterrupt):
        build_index(
            corpus, FailingEncoder(fail_at=4), tmp_path / "idx", shard_size=5, progress=False
        )
    with pytest.raises(MarginError, match="build was interrupted; run the same build again"):
        open_index(tmp_path / "idx")
    resumed = KeywordEncoder()
    build_index(corpus, resumed, tmp_path / "idx", shard_size=5, progress=False)
    assert resumed.passages_encoded == 40 - 3 * 5  # three finished shards were kept
    build_index(corpus, keyword_encoder, tmp_path / "ref", shard_size=5, progress=False)
    assert_same_index(tmp_path / "idx", tmp_path / "ref", keyword_encoder)


def test_resume_notices_a_changed_corpus(keyword_encoder, tmp_path):
    docs = many_docs(40)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    with pytest.raises(KeyboardInterrupt):
        build_index(
            corpus, FailingEncoder(fail_at=6), tmp_path / "idx", shard_size=5, progress=False
        )
    docs[12]["text"] = "edited paris"  # in shard 2 of the five finished ones
    write_jsonl(corpus, docs)
    resumed = KeywordEncoder()
    build_index(corpus, resumed, tmp_path / "idx", shard_size=5, progress=False)
    assert resumed.passages_encoded == 40 - 2 * 5  # only shards 0 and 1 still matched
    build_index(corpus, keyword_encoder, tmp_path / "ref", shard_size=5, progress=False)
    assert_same_index(tmp_path / "idx", tmp_path / "ref", keyword_encoder)


def test_other_plan_starts_afresh(tmp_path, caplog):
    corpus = write_jsonl(tmp_path / "c.jsonl", many_docs(20))
    with pytest.raises(KeyboardInterrupt):
        build_index(
            corpus, FailingEncoder(fail_at=3), tmp_path / "idx", shard_size=5, progress=False
        )
    other = KeywordEncoder(keywords=("paris", "rome", "river"))
    build_index(corpus, other, tmp_path / "idx", shard_size=5, progress=False)
    assert "discarding the unfinished build" in caplog.text and "encoder" in caplog.text
    assert other.passages_encoded == 20  # nothing reused from the other encoder's shards
    assert open_index(tmp_path / "idx").manifest.encoder["dim"] == 3


CRASH_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from helpers import KeywordEncoder
from margin.retrieval.build import build_index

class SlowEncoder(KeywordEncoder):
    def encode_passages(self, passages, batch_size=64, progress=False):
        time.sleep(0.25)
        return super().encode_passages(passages, batch_size, progress)

build_index(sys.argv[2], SlowEncoder(), sys.argv[3], shard_size=5, progress=False)
print("finished")
"""


def test_resume_after_sigkill(keyword_encoder, tmp_path):
    """Kill a build process at an arbitrary moment; the rerun must give the same index."""
    corpus = write_jsonl(tmp_path / "c.jsonl", many_docs(60))  # 12 shards, 0.25 s each
    out = tmp_path / "idx"
    work = tmp_path / ".idx.building"
    kill_after_shards(CRASH_SCRIPT, [str(TESTS), str(corpus), str(out)], work)
    assert not out.exists()
    with pytest.raises(MarginError, match="interrupted"):
        open_index(out)

    resumed = KeywordEncoder()
    build_index(corpus, resumed, out, shard_size=5, progress=False)
    assert 0 < resumed.passages_encoded <= 60 - 3 * 5
    build_index(corpus, keyword_encoder, tmp_path / "ref", shard_size=5, progress=False)
    assert_same_index(out, tmp_path / "ref", keyword_encoder)


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def built(corpus_jsonl, keyword_encoder, tmp_path):
    out = tmp_path / "idx"
    build_index(corpus_jsonl, keyword_encoder, out, progress=False, shard_size=4)
    return out


def test_open_missing_and_corrupt_manifest(built, tmp_path):
    with pytest.raises(MarginError, match="no such index directory"):
        open_index(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarginError, match=r"not a margin index \(no manifest.json\)"):
        open_index(tmp_path / "empty")
    manifest = built / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(MarginError, match=r"manifest\.json is corrupt .*rebuild the index"):
        open_index(built)
    data = json.loads(text)
    manifest.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(MarginError, match="format_version 99 is not supported"):
        open_index(built)
    manifest.write_text(json.dumps({**data, "passages": 7}))
    with pytest.raises(MarginError, match="corrupt"):
        open_index(built)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: os.remove(d / "passages" / "shard-00001.arrow"),
            r"passages/shard-00001\.arrow is missing; rebuild",
        ),
        (
            lambda d: os.truncate(d / "passages" / "shard-00000.arrow", 100),
            r"passages/shard-00000\.arrow is corrupt or truncated",
        ),
        (
            lambda d: os.remove(d / "embeddings" / "shard-00001.npy"),
            r"embeddings/shard-00001\.npy is missing",
        ),
        (
            lambda d: os.truncate(d / "embeddings" / "shard-00000.npy", 140),
            r"embeddings/shard-00000\.npy is corrupt or truncated",
        ),
        (
            lambda d: np.save(d / "embeddings" / "shard-00000.npy", np.zeros((4, 9), np.float32)),
            r"expected float32 \(n, 8\): dimension mismatch",
        ),
        (
            lambda d: np.save(d / "embeddings" / "shard-00000.npy", np.zeros((3, 8), np.float32)),
            r"shard-00000\.npy has 3 rows, the manifest says 4",
        ),
        (lambda d: os.truncate(d / "index.faiss", 60), r"index\.faiss is corrupt or truncated"),
        (lambda d: os.remove(d / "index.faiss"), r"index\.faiss is missing"),
    ],
)
def test_open_damaged_files(built, damage, message):
    damage(built)
    with pytest.raises(MarginError, match="margin index verify") as info:  # sizes in manifest
        open_index(built)
    assert "\n" not in str(info.value)
    strip_file_checksums(built)  # as written before them: the structural checks guard it
    with pytest.raises(MarginError, match=message) as info:
        open_index(built)
    assert "\n" not in str(info.value)


def strip_file_checksums(index: Path) -> None:
    """Make ``index``'s manifest look written by a margin without file checksums."""
    data = json.loads((index / MANIFEST).read_text())
    del data["files"]
    (index / MANIFEST).write_text(json.dumps(data))


def test_open_rejects_swapped_passages(built, corpus_jsonl, keyword_encoder, tmp_path):
    docs = [dict(d) for d in DOCS]
    docs[5]["text"] = "The Rhine is a long river in Germany."
    other = tmp_path / "other"
    build_index(
        write_jsonl(tmp_path / "o.jsonl", docs),
        keyword_encoder,
        other,
        shard_size=4,
        progress=False,
    )
    os.replace(other / "passages" / "shard-00001.arrow", built / "passages" / "shard-00001.arrow")
    with pytest.raises(MarginError, match=r"shard-00001\.arrow has \d+ bytes, manifest\.json "):
        open_index(built)
    strip_file_checksums(built)  # as written before file checksums: the chain catches it
    with pytest.raises(MarginError, match="shard-00001.arrow does not match the shard checksum"):
        open_index(built)


def test_ensure_encoder_matches(built):
    manifest = open_index(built).manifest
    ensure_encoder_matches(manifest, KeywordEncoder())
    ensure_encoder_matches(manifest, KeywordEncoder(keywords="abcdefgh", role="question"))
    with pytest.raises(
        MarginError,
        match=r"index .*idx was built with encoder keyword-paris-.* "
        r"\(8-d, sha256 [0-9a-f]{12}\); the given encoder is "
        r"keyword-a-b-c-d-e-f-g-h",
    ):
        ensure_encoder_matches(manifest, KeywordEncoder(keywords="abcdefgh"))
    with pytest.raises(MarginError, match="the given encoder is .* \\(3-d"):
        ensure_encoder_matches(manifest, KeywordEncoder(keywords="abc", role="question"))


def test_k_larger_than_index(built, keyword_encoder):
    with pytest.raises(MarginError, match="k=7 but the index holds 6 passages"):
        open_index(built).search(query(keyword_encoder, "paris"), k=7)


# ----------------------------------------------------------------------------- add


@pytest.mark.parametrize("kind", ["flat", "hnsw", "bm25"])
def test_add_equals_building_on_the_union(kind, tmp_path):
    docs = many_docs(30)
    base = write_jsonl(tmp_path / "base.jsonl", docs[:17])
    extra = write_jsonl(tmp_path / "extra.jsonl", docs[17:])
    union = write_jsonl(tmp_path / "all.jsonl", docs)
    encoder = None if kind == "bm25" else KeywordEncoder()
    build_index(base, encoder, tmp_path / "idx", kind=kind, shard_size=5, progress=False)
    adding = None if kind == "bm25" else KeywordEncoder()
    manifest = add_to_index(tmp_path / "idx", extra, adding, progress=False)
    assert adding is None or adding.passages_encoded == 13  # old passages not re-encoded
    assert [s.rows for s in manifest.shards] == [5, 5, 5, 2, 5, 5, 3]
    assert manifest.generation == 1 and manifest.passages == 30
    build_index(
        union,
        KeywordEncoder() if encoder else None,
        tmp_path / "ref",
        kind=kind,
        shard_size=5,
        progress=False,
    )
    a, b = open_index(tmp_path / "idx"), open_index(tmp_path / "ref")
    assert a.manifest.corpus_checksum == b.manifest.corpus_checksum  # independent of sharding
    assert a.store.ids().to_pylist() == b.store.ids().to_pylist()
    if kind == "bm25":
        q = ["paris", "river mountain", "germany italy"]
    else:
        q = query(KeywordEncoder(), "paris", "river mountain", "germany italy")
    ra, rb = a.search(q, k=8), b.search(q, k=8)
    np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-6)
    if kind != "hnsw":  # exact kinds: same rows too (HNSW graphs differ with insertion order)
        np.testing.assert_array_equal(ra.rows, rb.rows)
    leftovers = {p.name for p in (tmp_path / "idx").iterdir()}
    expected = {MANIFEST, "passages", a.manifest.index_file} | (
        {"embeddings"} if encoder else set()
    )
    assert leftovers == expected  # the old index file is gone


def test_add_to_ivfpq_keeps_the_trained_quantiser(tmp_path):
    import faiss

    vectors = clustered(2600, 16)
    table = {f"v{i}": v for i, v in enumerate(vectors)}
    passages = [Passage(f"v{i}", "t", "x") for i in range(2600)]
    out = tmp_path / "idx"
    build_index(
        passages[:2000], TableEncoder(table), out, kind="ivfpq", shard_size=1000, progress=False
    )
    before = open_index(out, mmap=False).dense.index
    centroids = faiss.vector_to_array(faiss.downcast_index(before.quantizer).codes)
    add_to_index(out, passages[2000:], TableEncoder(table), progress=False)
    after = open_index(out, mmap=False).dense
    assert len(after) == 2600 and after.config.nlist == before.nlist
    np.testing.assert_array_equal(
        faiss.vector_to_array(faiss.downcast_index(after.index.quantizer).codes), centroids
    )
    queries = vectors[2000:2100]  # new vectors: search them among all, compare with brute force
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]  # (100, 10)
    found = after.search(queries, k=10).rows
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9
    assert (found == np.arange(2000, 2100)[:, None]).any(axis=1).all()  # each finds itself


def test_add_refuses_known_ids_and_keeps_the_index(built, keyword_encoder, tmp_path):
    before = (built / MANIFEST).read_text()
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"title": "New", "text": "paris"}, DOCS[2]])
    with pytest.raises(MarginError, match="is already in the index"):
        add_to_index(built, clash, keyword_encoder, progress=False)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "title": "A", "text": "rome"}] * 2)
    with pytest.raises(MarginError, match="occurs more than once"):
        add_to_index(built, dup, keyword_encoder, progress=False)
    assert (built / MANIFEST).read_text() == before
    assert len(open_index(built).store) == 6


def test_add_refuses_another_encoder(built, tmp_path):
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"title": "New", "text": "rome"}])
    with pytest.raises(MarginError, match="was built with encoder"):
        add_to_index(built, extra, KeywordEncoder(keywords=("a", "b")), progress=False)
    with pytest.raises(MarginError, match="pass its encoder"):
        add_to_index(built, extra, None, progress=False)


def test_crash_during_add_leaves_the_old_index_valid(built, keyword_encoder, tmp_path):
    extra = write_jsonl(tmp_path / "extra.jsonl", many_docs(12))
    q = query(keyword_encoder, "rome", "river")
    expected = open_index(built).search(q, k=3)
    with pytest.raises(KeyboardInterrupt):
        add_to_index(built, extra, FailingEncoder(fail_at=2), progress=False)
    index = open_index(built)
    assert len(index.store) == 6
    np.testing.assert_array_equal(index.search(q, k=3).rows, expected.rows)
    manifest = add_to_index(built, extra, keyword_encoder, progress=False)  # cleans up, then adds
    assert manifest.passages == 18 and len(open_index(built).store) == 18
    assert replace(manifest, path=None) == replace(open_index(built).manifest, path=None)


# ----------------------------------------------------------------------------- integrity


def flip_byte(path: Path, at: float = 0.5) -> None:
    """Invert one byte at the given fraction of the file (inside its data, not its header)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_overwrite_refuses_a_directory_that_is_not_an_index(corpus_jsonl, keyword_encoder,
                                                           tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    with pytest.raises(MarginError, match=r"d is not a margin index \(no manifest\.json\)") as info:
        build_index(corpus_jsonl, keyword_encoder, out, overwrite=True, progress=False)
    assert "\n" not in str(info.value)
    assert (out / "important.txt").read_text() == "keep me"
    assert not (tmp_path / ".d.building").exists()
    (out / "important.txt").unlink()  # an empty directory may be built into
    build_index(corpus_jsonl, keyword_encoder, out, overwrite=True, progress=False)
    assert open_index(out).manifest.passages == len(DOCS)


def test_a_build_that_fails_before_its_first_shard_leaves_nothing(keyword_encoder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a",\n')
    with pytest.raises(MarginError, match="bad.jsonl:1"):
        build_index(bad, keyword_encoder, tmp_path / "idx", progress=False)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(MarginError, match="no passages"):
        build_index(empty, keyword_encoder, tmp_path / "idx", progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed while encoding the first shard
        build_index(write_jsonl(tmp_path / "c.jsonl", many_docs(10)), FailingEncoder(fail_at=1),
                    tmp_path / "idx", shard_size=5, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "c.jsonl", "empty.jsonl"]
    with pytest.raises(KeyboardInterrupt):  # one finished shard: kept for the rerun to resume
        build_index(tmp_path / "c.jsonl", FailingEncoder(fail_at=2), tmp_path / "idx",
                    shard_size=5, progress=False)
    assert (tmp_path / ".idx.building" / "plan.json").is_file()


@pytest.mark.parametrize(
    "name", ["index.faiss", "embeddings/shard-00000.npy", "passages/shard-00001.arrow"]
)
def test_a_flipped_byte_is_refused_on_open(built, name):
    flip_byte(built / name)
    with pytest.raises(MarginError, match=rf"{name} does not match its sha256 in manifest\.json"
                       r".*margin index verify") as info:
        open_index(built)
    assert "\n" not in str(info.value)
    problems = verify_index(built, encoder=False)
    assert any(name in p and "sha256" in p for p in problems), problems


def test_verify_index_on_a_sound_index_and_an_old_one(built):
    assert verify_index(built, encoder=False) == []
    strip_file_checksums(built)
    assert open_index(built).manifest.files is None  # still loads
    assert verify_index(built, encoder=False) == [
        f"{built / MANIFEST} records no file checksums (written by an older margin); rebuild "
        "the index to make its files verifiable"
    ]


def corrupt_text(path: Path, word: bytes) -> None:
    """Replace the first byte of ``word`` in an Arrow shard by 0xff: invalid UTF-8."""
    data = path.read_bytes()
    i = data.index(word)
    path.write_bytes(data[:i] + b"\xff" + data[i + 1 :])


def test_corrupt_text_at_query_time_is_one_line(built, keyword_encoder):
    corrupt_text(built / "passages" / "shard-00001.arrow", b"Seine")
    loaded = open_index(built, verify=False)  # the cheap checks of a large index pass
    with pytest.raises(MarginError, match=r"passages/shard-00001\.arrow: passage text is corrupt"
                       r".*margin index verify --index") as info:
        loaded.passages(loaded.search(query(keyword_encoder, "river"), k=3))
    assert "\n" not in str(info.value)
    assert any("shard-00001.arrow" in p for p in verify_index(built, encoder=False))


def test_manifest_paths_must_stay_inside_the_index(built, corpus_jsonl, keyword_encoder,
                                                   tmp_path):
    other = tmp_path / "other"
    build_index(corpus_jsonl, keyword_encoder, other, kind="hnsw", progress=False)
    data = json.loads((built / MANIFEST).read_text())
    for edit in ({"index_file": "../other/index.faiss"},
                 {"shards": [{**data["shards"][0], "name": "../../other/passages/shard-00000"},
                             data["shards"][1]]}):
        (built / MANIFEST).write_text(json.dumps({**data, **edit}))
        with pytest.raises(MarginError, match=r"manifest\.json names .* outside the index "
                           r"directory; rebuild the index"):
            open_index(built)


def test_hand_edited_checksum_or_kind_is_refused(built):
    data = json.loads((built / MANIFEST).read_text())
    shards = [{**data["shards"][0], "checksum": "0" * 64}, data["shards"][1]]
    (built / MANIFEST).write_text(json.dumps({**data, "shards": shards}))
    with pytest.raises(MarginError, match=r"shard-00000\.arrow does not match the shard "
                       r"checksum in manifest\.json"):
        open_index(built)
    (built / MANIFEST).write_text(json.dumps({**data, "kind": "hnsw"}))
    with pytest.raises(MarginError, match=r"index\.faiss is a flat index but manifest\.json "
                       r"says hnsw; rebuild the index"):
        open_index(built)


def test_query_encoder_with_other_weights_is_refused(built):
    manifest = open_index(built).manifest
    ensure_query_encoder_matches(manifest, KeywordEncoder(role="question"))
    with pytest.raises(MarginError, match=r"has other weights .* --allow-encoder-mismatch"):
        ensure_query_encoder_matches(manifest, KeywordEncoder(keywords="abcdefgh",
                                                              role="question"))
