"""Sharded retrieval: merged top-k of S parts equals the unsharded top-k; parts on Ray actors; one
retrieval actor per machine shared by processes."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import TableEncoder, clustered
from margin.errors import MarginError
from margin.retrieval.build import add_to_index, build_index
from margin.retrieval.index import SearchResult
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.sharded import (
    RayShardedIndex,
    RemoteRetriever,
    ShardedIndex,
    merge_topk,
    part_bounds,
    retrieval_actor,
    split_index,
)

N, DIM = 300, 16


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(N + 40, DIM, seed=3)  # (340, 16): 300 indexed, 40 left for queries/adding


@pytest.fixture
def index_dir(vectors, tmp_path):
    """A flat index of 300 clustered vectors, in shards of 64 (part bounds fall inside shards)."""
    table = {f"v{i}": v for i, v in enumerate(vectors)}
    passages = [Passage(f"v{i}", f"T{i}", f"text {i}") for i in range(N)]
    build_index(passages, TableEncoder(table), tmp_path / "idx", shard_size=64, progress=False)
    return tmp_path / "idx"


def test_merge_topk_by_hand():
    a = SearchResult(np.array([[0.9, 0.5, 0.1]], np.float32), np.array([[2, 0, 1]]))
    b = SearchResult(np.array([[0.7, 0.5, -np.inf]], np.float32), np.array([[1, 0, -1]]))
    merged = merge_topk([a, b], starts=[0, 10], k=4)
    # 0.9 (row 2), 0.7 (row 11), then the 0.5 tie: row 0 before row 10.
    np.testing.assert_array_equal(merged.rows, [[2, 11, 0, 10]])
    np.testing.assert_allclose(merged.scores, [[0.9, 0.7, 0.5, 0.5]])
    tail = merge_topk([a, b], starts=[0, 10], k=6)
    assert tail.rows[0, -1] == -1 and tail.scores[0, -1] == -np.inf  # no hit sorts last


def test_part_bounds():
    assert part_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert part_bounds(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(MarginError, match="cannot split 4 passages into 5 parts"):
        part_bounds(4, 5)


@pytest.mark.parametrize(("parts", "k"), [(1, 10), (3, 10), (7, 50)])
def test_sharded_equals_unsharded(index_dir, vectors, parts, k):
    """7 parts of ~43 rows and k=50: each part returns fewer than k, the merge still fills k."""
    split_index(index_dir, parts)
    sharded = ShardedIndex.open(index_dir, parts)
    assert len(sharded.parts) == parts and len(sharded) == N
    assert sharded.starts == [a for a, _ in part_bounds(N, parts)]
    queries = vectors[N:]  # (40, 16), not in the index
    whole = open_index(index_dir).search(queries, k)
    merged = sharded.search(queries, k)
    np.testing.assert_array_equal(merged.rows, whole.rows)
    np.testing.assert_allclose(merged.scores, whole.scores, rtol=1e-5)
    truth = np.argsort(-(queries @ vectors[:N].T), axis=1, kind="stable")[:, :k]  # brute force
    np.testing.assert_array_equal(merged.rows, truth)
    np.testing.assert_array_equal(sharded.vectors(merged.rows[:2]), vectors[merged.rows[:2]])


def test_parts_must_match_the_index(index_dir, vectors):
    with pytest.raises(MarginError, match=r"has no parts-2/; split it first"):
        ShardedIndex.open(index_dir, 2)
    split_index(index_dir, 2)
    table = {f"v{i}": v for i, v in enumerate(vectors)}
    add_to_index(index_dir, [Passage(f"v{N}", "new", "new")], TableEncoder(table), progress=False)
    with pytest.raises(MarginError, match="split from another version of the index"):
        ShardedIndex.open(index_dir, 2)
    split_index(index_dir, 2)
    assert len(ShardedIndex.open(index_dir, 2)) == N + 1


def test_split_an_ivfpq_index_keeps_its_kind(vectors, tmp_path):
    table = {f"v{i}": v for i, v in enumerate(vectors)}
    passages = [Passage(f"v{i}", "t", "x") for i in range(N)]
    build_index(passages, TableEncoder(table), tmp_path / "pq", kind="ivfpq", progress=False)
    split_index(tmp_path / "pq", 2)
    sharded = ShardedIndex.open(tmp_path / "pq", 2)
    assert [p.config.kind for p in sharded.parts] == ["ivfpq", "ivfpq"]
    queries = vectors[:20]  # indexed vectors: each must find itself first (exact re-ranking)
    np.testing.assert_array_equal(sharded.search(queries, 5).rows[:, 0], np.arange(20))


# ----------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_ray_sharded_equals_unsharded(ray_cluster, index_dir, vectors):
    split_index(index_dir, 2)
    remote = RayShardedIndex.open(index_dir, 2)
    try:
        queries = vectors[N:]
        whole = open_index(index_dir).search(queries, 10)
        merged = remote.search(queries, 10)
        np.testing.assert_array_equal(merged.rows, whole.rows)
        np.testing.assert_allclose(merged.scores, whole.scores, rtol=1e-5)
    finally:
        remote.close()


@pytest.mark.slow
def test_one_retrieval_actor_per_machine(ray_cluster, index_dir, vectors):
    """Two processes asking for the index's retriever get the same actor, and its answers are
    those of a local Retriever (passages, scores, rows and stored vectors)."""
    ray = ray_cluster
    actor = retrieval_actor(index_dir)
    again = retrieval_actor(index_dir)
    assert actor._actor_id == again._actor_id

    @ray.remote(num_cpus=0)
    def from_another_process(path: str) -> tuple[str, int]:
        import os

        from margin.retrieval.sharded import retrieval_actor as find

        return find(path)._actor_id.hex(), os.getpid()

    other_id, other_pid = ray.get(from_another_process.remote(str(index_dir)))
    import os

    assert other_pid != os.getpid() and other_id == actor._actor_id.hex()

    remote = RemoteRetriever(actor)
    queries = vectors[N : N + 5]
    got = remote.retrieve_by_vector(queries, k=4, with_vectors=True)
    local = open_index(index_dir)
    want = local.search(queries, 4)
    assert len(remote) == N
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    assert [p.id for p in got.passages[0]] == [f"v{r}" for r in want.rows[0]]
    np.testing.assert_array_equal(got.vectors, vectors[want.rows])
    with pytest.raises(MarginError, match="k=400 but the index holds 300"):
        remote.retrieve_by_vector(queries, k=400)
    ray.kill(actor)


# ----------------------------------------------------------------------------- compressed kinds


@pytest.mark.parametrize(
    "settings",
    [{"kind": "hnswsq"}, {"kind": "hnswsq", "sq_bits": 4}, {"kind": "ivfpq", "opq": True}],
)
def test_compressed_kinds_with_exact_reranking(settings, tmp_path):
    """HNSW over 8/4-bit scalar codes and OPQ+IVF-PQ: built, saved, reopened memory-mapped; with
    exact re-ranking from the stored vectors their top-10 matches brute force, and the scores
    are the exact inner products."""
    from margin.retrieval.index import IndexConfig

    vectors = clustered(3000, 32, seed=5)
    table = {f"v{i}": v for i, v in enumerate(vectors)}
    passages = [Passage(f"v{i}", "t", "x") for i in range(2900)]
    config = IndexConfig(**settings)
    build_index(passages, TableEncoder(table), tmp_path / "i", config=config, progress=False)
    index = open_index(tmp_path / "i")
    assert index.dense.config.kind == settings["kind"] and index.dense.config.rerank == 10
    queries = vectors[2900:]  # (100, 32)
    found = index.search(queries, 10)
    exact = queries @ vectors[:2900].T  # (100, 2900)
    truth = np.argsort(-exact, axis=1)[:, :10]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.rows, truth, strict=True)])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(
        found.scores, np.take_along_axis(exact, found.rows, 1), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(MarginError, match="sq_bits=5 is not supported"):
        IndexConfig(kind="hnswsq", sq_bits=5).resolved(10, 32)
