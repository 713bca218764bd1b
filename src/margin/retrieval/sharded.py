"""Sharded retrieval: one index split into S parts, searched part by part, merged exactly.

A 21M-passage index does not have to live in one process, or on one machine. Its rows are cut
into S contiguous ranges; part s is a FAISS index over rows [start_s, start_s + rows_s) of the
same memory-mapped embeddings (``DIR/parts-S/part-0000s.faiss``, described by ``parts.json``).
A query is searched in every part and the S top-k lists are merged (:func:`merge_topk`). For
exact search the merge *is* the unsharded top-k: every passage of the global top-k is in the
top-k of its own part, so it survives the merge. (For approximate kinds each part is as good
as an index of its size.)

The parts can be served in one process (:class:`ShardedIndex`), or by Ray actors, each holding
one part, on as many machines as the cluster has (:class:`RayShardedIndex`). And so that the
several training or serving processes of one machine do not each load their own copy of the
index, :func:`retrieval_actor` gives them one shared Ray actor per machine that holds the index
and the passage store and answers their searches (:class:`RemoteRetriever` wraps it with the
interface of :class:`margin.retrieval.retriever.Retriever`).

>>> split_index("wiki-index", parts=4)                              # doctest: +SKIP
>>> ShardedIndex.open("wiki-index", parts=4).search(vectors, k=5)    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from margin._io import atomic_path, write_json_atomic
from margin.errors import MarginError
from margin.retrieval.index import DenseIndex, Embeddings, IndexConfig, SearchResult
from margin.retrieval.passages import Passage
from margin.retrieval.reader import LoadedIndex, open_index
from margin.retrieval.retriever import Retrieved

PARTS_FORMAT = "margin-parts"  # parts.json "format" marker
PARTS_FILE = "parts.json"
NAMESPACE = "margin"  # Ray namespace of the shared retrieval actors


def merge_topk(results: Sequence[SearchResult], starts: Sequence[int], k: int) -> SearchResult:
    """Merge per-part top-k lists into the global top-k (best score first, ties: lower row).

    results[s].rows are rows of part s; ``starts[s]`` turns them into global rows. Row -1 (no
    hit) stays -1 and sorts last.
    """
    scores = np.concatenate([r.scores for r in results], axis=1)  # (n, S * k)
    rows = np.concatenate(
        [np.where(r.rows >= 0, r.rows + start, -1) for r, start in zip(results, starts,
                                                                       strict=True)],
        axis=1,
    )  # (n, S * k)
    tie = np.where(rows >= 0, rows, np.iinfo(np.int64).max)
    order = np.lexsort((tie, -scores), axis=-1)[:, :k]  # (n, k)
    return SearchResult(
        np.take_along_axis(scores, order, 1).astype(np.float32),
        np.take_along_axis(rows, order, 1).astype(np.int64),
    )


def part_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """S contiguous row ranges of near-equal size covering 0..n: [(start, stop), ...]."""
    if not 1 <= parts <= n:
        raise MarginError(f"cannot split {n} passages into {parts} parts; use 1 <= parts <= {n}")
    edges = np.linspace(0, n, parts + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def split_index(
    directory: str | Path, parts: int, config: IndexConfig | None = None
) -> Path:
    """Write ``DIR/parts-<parts>/``: one FAISS index per row range, and ``parts.json``.

    config: how to index each part; None: the index's own kind and settings (IVF sizes are
    resolved again for the part's size). Written atomically; returns the parts directory.
    """
    loaded = _open_dense(directory)
    dense = loaded.dense
    assert dense is not None
    config = config or replace(
        dense.config, nlist=None, nprobe=None, train_size=None, pq_bits=None
    )
    out = loaded.path / f"parts-{parts}"
    entries = []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for s, (start, stop) in enumerate(part_bounds(len(dense.embeddings), parts)):
            part = DenseIndex.build(_row_range(dense.embeddings, start, stop), config)
            name = f"part-{s:05d}.faiss"
            part.save(tmp / name)
            entries.append({"file": name, "start": start, "rows": stop - start,
                            "index_params": asdict(part.config)})
        write_json_atomic(tmp / PARTS_FILE, {
            "format": PARTS_FORMAT,
            "format_version": 1,
            "corpus_checksum": loaded.manifest.corpus_checksum,
            "parts": entries,
        })
    return out


class ShardedIndex:
    """The S parts of an index, searched one after the other in this process, merged exactly.

    Same ``search``/``vectors`` interface as :class:`margin.retrieval.index.DenseIndex`.
    """

    def __init__(self, parts: list[DenseIndex], starts: list[int], embeddings: Embeddings):
        self.parts = parts  # one DenseIndex per row range
        self.starts = starts  # first global row of each part
        self.embeddings = embeddings  # all vectors, memory-mapped (for vectors())

    @classmethod
    def open(
        cls, directory: str | Path, parts: int, only: Sequence[int] | None = None,
        loaded: LoadedIndex | None = None,
    ) -> ShardedIndex:
        """Open the parts written by :func:`split_index` (``only``: just those part numbers)."""
        loaded = loaded or _open_dense(directory)
        assert loaded.dense is not None
        root = loaded.path / f"parts-{parts}"
        entries = _read_parts(root, loaded)
        wanted = range(len(entries)) if only is None else only
        indexes, starts = [], []
        for s in wanted:
            entry = entries[s]
            view = _row_range(
                loaded.dense.embeddings, entry["start"], entry["start"] + entry["rows"]
            )
            config = IndexConfig(**entry["index_params"])
            indexes.append(DenseIndex.load(root / entry["file"], view, config, mmap=True))
            starts.append(int(entry["start"]))
        return cls(indexes, starts, loaded.dense.embeddings)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-k of every part, merged. queries: (n, dim) float32."""
        if k < 1 or k > len(self.embeddings):
            raise MarginError(f"k={k} but the index holds {len(self.embeddings)} passages; "
                              f"use 1 <= k <= {len(self.embeddings)}")
        results = [_padded(p.search(queries, min(k, len(p))), k) for p in self.parts]
        return merge_topk(results, self.starts, k)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored embeddings of global ``rows`` -> rows.shape + (dim,)."""
        return self.embeddings.take(rows)


class RayShardedIndex:
    """The S parts served by S Ray actors (spread over the cluster's machines), merged here."""

    def __init__(self, actors: list[Any], starts: list[int], ray: Any):
        self.actors, self.starts, self.ray = actors, starts, ray

    @classmethod
    def open(
        cls, directory: str | Path, parts: int, address: str | None = None, num_cpus: float = 0
    ) -> RayShardedIndex:
        """Start one actor per part; each opens its own part (memory-mapped) on its node."""
        from margin.retrieval.distributed import connect

        ray = connect(address)
        path = str(Path(directory).resolve())
        loaded = _open_dense(path)
        entries = _read_parts(loaded.path / f"parts-{parts}", loaded)
        actor = ray.remote(_PartActor).options(num_cpus=num_cpus)
        actors = [actor.remote(path, parts, s) for s in range(len(entries))]
        return cls(actors, [int(e["start"]) for e in entries], ray)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Search every part in parallel on its actor; merge the S top-k lists."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (n, dim)
        ref = self.ray.put(queries)  # sent once, read by every actor
        results = self.ray.get([a.search.remote(ref, k) for a in self.actors])
        return merge_topk([_padded(r, k) for r in results], self.starts, k)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


class _PartActor:
    """A Ray actor holding one part of a sharded index."""

    def __init__(self, directory: str, parts: int, part: int):
        self.index = ShardedIndex.open(directory, parts, only=[part]).parts[0]

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        return self.index.search(queries, min(k, len(self.index)))


# ----------------------------------------------------------------------------- shared retriever


class RetrievalService:
    """A Ray actor holding an index and its passage store for all processes of one machine."""

    def __init__(self, directory: str, parts: int | None = None):
        self.loaded = open_index(directory)
        self.sharded = None if parts is None else ShardedIndex.open(
            directory, parts, loaded=self.loaded
        )

    def size(self) -> int:
        return self.loaded.manifest.passages

    def manifest(self) -> dict[str, Any]:
        return self.loaded.manifest.to_json()

    def search(self, queries: np.ndarray, k: int, with_vectors: bool = False) -> Retrieved:
        """Top-k passages of question vectors (n, dim); the hits' vectors if asked."""
        dense = self.loaded.dense if self.sharded is None else self.sharded
        if dense is None:
            raise MarginError(f"{self.loaded.path} is a BM25 index: serve a dense index")
        result = dense.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        if (result.rows < 0).any():
            raise MarginError("the index found fewer passages than asked for; lower k")
        passages: list[list[Passage]] = self.loaded.passages(result)
        vectors = dense.vectors(result.rows) if with_vectors else None  # (n, k, dim)
        return Retrieved(passages, result.scores, result.rows, vectors)


def retrieval_actor(
    directory: str | Path,
    parts: int | None = None,
    address: str | None = None,
    detached: bool = False,
) -> Any:
    """The machine's shared :class:`RetrievalService` for ``directory``: created by the first
    process that asks, found by name by every other one (on the same node).

    detached: keep it alive after the process that created it exits (serving); otherwise it
    lives as long as that process's Ray job.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from margin.retrieval.distributed import connect

    ray = connect(address)
    path = str(Path(directory).resolve())
    node = ray.get_runtime_context().get_node_id()
    digest = hashlib.sha256(f"{path}\0{parts}".encode()).hexdigest()[:16]
    return ray.remote(RetrievalService).options(
        name=f"margin-retriever-{node[:16]}-{digest}",
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached" if detached else None,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        num_cpus=0,
        max_concurrency=8,  # FAISS releases the GIL: searches of several processes overlap
    ).remote(path, parts)


class RemoteRetriever:
    """:class:`margin.retrieval.retriever.Retriever`'s search side, answered by a
    :func:`retrieval_actor`.

    >>> retriever = RemoteRetriever(retrieval_actor("wiki-index"), encoder)  # doctest: +SKIP
    >>> retriever.retrieve(["who wrote hamlet?"], k=5)  # doctest: +SKIP
    """

    kind = "dense"  # a RetrievalService serves dense indexes only

    def __init__(self, actor: Any, encoder: Any = None):
        import ray

        self.actor, self.encoder, self.ray = actor, encoder, ray
        self._size: int | None = None

    def __len__(self) -> int:
        if self._size is None:
            self._size = int(self.ray.get(self.actor.size.remote()))
        return self._size

    @property
    def index_encoder(self) -> dict | None:
        """The served index's passage-encoder record (as :attr:`Retriever.index_encoder`)."""
        return self.ray.get(self.actor.manifest.remote()).get("encoder")

    def retrieve(
        self, questions: Sequence[str], k: int = 5, with_vectors: bool = False
    ) -> Retrieved:
        """Encode here (with this process's question encoder), search there."""
        if self.encoder is None:
            raise MarginError("this RemoteRetriever has no question encoder; give one")
        return self.retrieve_by_vector(self.encoder.encode_queries(list(questions)), k,
                                       with_vectors)

    def retrieve_by_vector(
        self, query_vectors: np.ndarray, k: int = 5, with_vectors: bool = False
    ) -> Retrieved:
        """Top-k passages for question vectors (n, dim), from the shared actor."""
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        try:
            return self.ray.get(self.actor.search.remote(queries, k, with_vectors))
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, MarginError):
                raise MarginError(str(exc.cause)) from None
            raise


# ----------------------------------------------------------------------------- helpers


def _open_dense(directory: str | Path) -> LoadedIndex:
    loaded = open_index(directory)
    if loaded.dense is None:
        raise MarginError(f"{directory} is a BM25 index; only dense indexes are split into parts")
    return loaded


def _read_parts(root: Path, loaded: LoadedIndex) -> list[dict[str, Any]]:
    """The entries of ``root/parts.json``, checked against the index they split."""
    parts = root.name.removeprefix("parts-")
    path = root / PARTS_FILE
    if not path.is_file():
        raise MarginError(
            f"{loaded.path} has no {root.name}/; split it first: split_index(dir, parts={parts})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != PARTS_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}")
        entries = data["parts"]
        covered = sum(int(e["rows"]) for e in entries)
    except (ValueError, KeyError, TypeError) as exc:
        raise MarginError(f"{path} is corrupt ({exc}); split the index again") from None
    if data.get("corpus_checksum") != loaded.manifest.corpus_checksum or covered != len(
        loaded.store
    ):
        raise MarginError(
            f"{root} was split from another version of the index (passages were added since); "
            f"split it again: split_index(dir, parts={parts})"
        )
    return entries


def _row_range(embeddings: Embeddings, start: int, stop: int) -> Embeddings:
    """Rows [start, stop) of memory-mapped embeddings, as views (nothing is read)."""
    pieces = []
    for shard, lo in zip(embeddings.shards, embeddings.offsets[:-1], strict=True):
        a, b = max(start, int(lo)), min(stop, int(lo) + len(shard))
        if a < b:
            pieces.append(shard[a - int(lo) : b - int(lo)])
    return Embeddings(pieces)


def _padded(result: SearchResult, k: int) -> SearchResult:
    """Widen a part's (n, k') result to (n, k) with row -1 / score -inf (a part smaller than k)."""
    missing = k - result.rows.shape[1]
    if missing <= 0:
        return result
    n = result.rows.shape[0]
    return SearchResult(
        np.concatenate([result.scores, np.full((n, missing), -np.inf, np.float32)], axis=1),
        np.concatenate([result.rows, np.full((n, missing), -1, np.int64)], axis=1),
    )
