"""Dense (FAISS) and BM25 search: exactness, recall of the approximate kinds, save/load, misuse."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import clustered
from margin.errors import MarginError
from margin.retrieval.bm25 import BM25Config, BM25Index
from margin.retrieval.index import (
    DenseIndex,
    Embeddings,
    IndexConfig,
    ivf_nlist,
    ivf_nprobe,
    pq_bits,
    pq_m,
)
from margin.retrieval.passages import Passage
from margin.retrieval.store import EMPTY_CHECKSUM, PassageStore, shard_name, write_shard

N, DIM, N_QUERIES = 3000, 32, 100


@pytest.fixture(scope="module")
def vectors():
    x = clustered(N + N_QUERIES, DIM)
    return x[:N], x[N:]  # (N, DIM) passages, (N_QUERIES, DIM) queries


@pytest.fixture(scope="module")
def embeddings(vectors, tmp_path_factory):
    """The passage vectors as three memory-mapped .npy shards."""
    root = tmp_path_factory.mktemp("emb")
    paths = []
    for i, (lo, hi) in enumerate([(0, 1000), (1000, 2500), (2500, N)]):
        paths.append(root / f"shard-{i}.npy")
        np.save(paths[-1], vectors[0][lo:hi])
    return Embeddings.open(paths, DIM)


@pytest.fixture(scope="module")
def flat(embeddings):
    return DenseIndex.build(embeddings, IndexConfig(kind="flat"))


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def test_flat_equals_numpy_brute_force(vectors, flat):
    x, q = vectors
    result = flat.search(q, k=10)
    scores = q @ x.T  # (N_QUERIES, N)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert result.rows.shape == (N_QUERIES, 10) and result.rows.dtype == np.int64
    assert result.scores.dtype == np.float32
    np.testing.assert_allclose(result.scores, np.take_along_axis(scores, expected, 1), rtol=1e-5)
    assert (result.rows == expected).mean() > 0.99  # ties in float32 may swap neighbours


def test_flat_by_hand():
    e = Embeddings([np.eye(3, dtype=np.float32), np.array([[0.6, 0.8, 0]], np.float32)])
    index = DenseIndex.build(e, IndexConfig())
    result = index.search(np.array([[1, 0, 0], [0, 1, 0]], np.float32), k=2)
    assert result.rows.tolist() == [[0, 3], [1, 3]]  # 1.0 > 0.6 ; 1.0 > 0.8
    np.testing.assert_allclose(result.scores, [[1.0, 0.6], [1.0, 0.8]], atol=1e-6)


def test_hnsw_recall(vectors, embeddings, flat):
    truth = flat.search(vectors[1], 10).rows
    hnsw = DenseIndex.build(embeddings, IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=40))
    assert recall_at_10(hnsw.search(vectors[1], 10).rows, truth) >= 0.95


def test_ivfpq_recall_with_rerank(vectors, embeddings, flat):
    truth = flat.search(vectors[1], 10).rows
    ivf = DenseIndex.build(embeddings, IndexConfig(kind="ivfpq"))
    assert ivf.config.nlist == ivf_nlist(N) and ivf.config.pq_m == pq_m(DIM)
    result = ivf.search(vectors[1], 10)
    assert recall_at_10(result.rows, truth) >= 0.9
    # Re-ranked scores are exact inner products, sorted.
    exact = np.einsum("nd,nkd->nk", vectors[1], ivf.vectors(result.rows))
    np.testing.assert_allclose(result.scores, exact, rtol=1e-5)
    assert (np.diff(result.scores, axis=1) <= 0).all()
    # Without re-ranking, PQ's approximate scores lose recall: re-ranking is doing the work.
    plain = DenseIndex(ivf.index, embeddings, IndexConfig(**{**ivf.config.__dict__, "rerank": 1}))
    assert recall_at_10(plain.search(vectors[1], 10).rows, truth) < 0.9


def test_config_rules_by_hand():
    assert ivf_nlist(1_000_000) == 1024  # sqrt(1e6) = 1000 -> nearest power of two
    assert ivf_nlist(3000) == 64  # sqrt(3000) ~ 55 -> 64 (under the cap 3000 // 39 = 76)
    assert ivf_nlist(1000) == 25  # sqrt(1000) ~ 32 -> 32, capped at 1000 // 39 = 25
    assert ivf_nlist(10) == 1
    assert pq_m(384) == 96 and pq_m(768) == 192 and pq_m(30) == 6  # 30 // 4 = 7 -> divisor 6
    assert pq_bits(1_000_000) == 8 and pq_bits(3000) == 6  # 2**6 * 39 <= 3000 < 2**7 * 39
    assert ivf_nprobe(4096) == 256 and ivf_nprobe(128) == 32 and ivf_nprobe(8) == 8


def test_vectors_reads_the_stored_embeddings(vectors, flat):
    rows = np.array([[0, 2999, -1], [1500, 999, 1000]])
    got = flat.vectors(rows)
    assert got.shape == (2, 3, DIM)
    np.testing.assert_array_equal(got[0, 0], vectors[0][0])
    np.testing.assert_array_equal(got[0, 1], vectors[0][2999])
    np.testing.assert_array_equal(got[0, 2], np.zeros(DIM))  # row -1: nothing found
    np.testing.assert_array_equal(got[1], vectors[0][[1500, 999, 1000]])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(kind, vectors, embeddings, tmp_path):
    index = DenseIndex.build(embeddings, IndexConfig(kind=kind, hnsw_m=8, ef_construction=20))
    index.save(tmp_path / "index.faiss")
    loaded = DenseIndex.load(tmp_path / "index.faiss", embeddings, index.config)  # memory-mapped
    a, b = index.search(vectors[1], 5), loaded.search(vectors[1], 5)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.scores, b.scores)
    with pytest.raises(MarginError, match="read-only"):
        loaded.add(embeddings)  # FAISS would abort the process: refuse instead


def test_k_larger_than_index_and_bad_queries(flat):
    with pytest.raises(MarginError, match=f"k={N + 1} but the index holds {N} passages"):
        flat.search(np.zeros((1, DIM), np.float32), k=N + 1)
    with pytest.raises(MarginError, match="k=0"):
        flat.search(np.zeros((1, DIM), np.float32), k=0)
    with pytest.raises(MarginError, match=r"expected \(n, 32\): dimension mismatch"):
        flat.search(np.zeros((1, DIM + 1), np.float32), k=1)


def test_damaged_files(embeddings, flat, tmp_path):
    path = tmp_path / "index.faiss"
    flat.save(path)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(MarginError, match=r"index\.faiss is corrupt or truncated"):
        DenseIndex.load(path, embeddings, flat.config)
    with pytest.raises(MarginError, match=r"index\.faiss is missing"):
        DenseIndex.load(tmp_path / "nope" / "index.faiss", embeddings, flat.config)
    flat.save(path)
    short = Embeddings(embeddings.shards[:2])
    with pytest.raises(MarginError, match="holds 3000 vectors of dimension 32 but the embeddings"):
        DenseIndex.load(path, short, flat.config)
    npy = tmp_path / "e.npy"
    np.save(npy, np.zeros((10, DIM), np.float32))
    with pytest.raises(MarginError, match="dimension mismatch"):
        Embeddings.open([npy], DIM * 2)
    os.truncate(npy, npy.stat().st_size - 8)
    with pytest.raises(MarginError, match=r"e\.npy is corrupt or truncated"):
        Embeddings.open([npy], DIM)


def test_add_appends_rows(vectors, embeddings):
    first = Embeddings(embeddings.shards[:1])
    index = DenseIndex.build(first, IndexConfig())
    index.add(embeddings)
    assert len(index) == N
    whole = DenseIndex.build(embeddings, IndexConfig())
    np.testing.assert_array_equal(
        index.search(vectors[1], 5).rows, whole.search(vectors[1], 5).rows
    )


# ----------------------------------------------------------------------------- BM25

BM25_PASSAGES = [
    Passage("0", "Mona Lisa", "A portrait painted by Leonardo da Vinci, kept in the Louvre."),
    Passage("1", "Eiffel Tower", "A wrought-iron lattice tower in Paris."),
    Passage("2", "Great Wall", "Fortifications built across northern China."),
    Passage("3", "Louvre", "The world's most-visited museum, in Paris."),
]


@pytest.fixture
def bm25_store(tmp_path):
    write_shard(tmp_path / shard_name(0), BM25_PASSAGES[:3], EMPTY_CHECKSUM)
    store = PassageStore.open(tmp_path, [shard_name(0)])
    write_shard(tmp_path / shard_name(1), BM25_PASSAGES[3:], store.checksum())
    return PassageStore.open(tmp_path)


def test_bm25_finds_the_obvious_passage(bm25_store):
    bm25 = BM25Index.build(bm25_store)
    result = bm25.search(["who painted the mona lisa", "great wall of china", "paris museum"], 2)
    assert result.rows.shape == (3, 2) and result.rows.dtype == np.int64
    assert result.rows[0, 0] == 0 and result.rows[1, 0] == 2
    assert result.rows[2, 0] == 3  # "Louvre ... museum, in Paris": both words
    assert result.scores[2, 0] > result.scores[2, 1] > 0  # the Eiffel Tower has only "paris"
    assert (result.scores[:, 0] > 0).all()


def test_bm25_save_load_and_k(bm25_store, tmp_path):
    bm25 = BM25Index.build(bm25_store, BM25Config(k1=1.2, b=0.5))
    bm25.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    assert loaded.config == BM25Config(k1=1.2, b=0.5)
    a, b = bm25.search(["tower in paris"], 4), loaded.search(["tower in paris"], 4)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.scores, b.scores)
    assert not any(p.suffix == ".pkl" for p in (tmp_path / "bm25").iterdir())
    with pytest.raises(MarginError, match="k=5 but the index holds 4 passages"):
        loaded.search(["paris"], 5)
    with pytest.raises(MarginError, match="list of query strings"):
        loaded.search("paris", 1)  # type: ignore[arg-type]
    with pytest.raises(MarginError, match="not a saved BM25 index"):
        BM25Index.load(tmp_path / "missing")
