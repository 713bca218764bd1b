"""Dense retrieval: maximum inner product search (MIPS) over the passage embeddings.

RAG retrieves the top-k passages z by d(z)ᵀ q(x) (Sec. 2.2) from a FAISS index of 21M DPR
embeddings; the paper uses HNSW on CPU (Sec. 3, App. C). Four kinds are offered, all scoring by
inner product:

- ``flat``: exact search (``IndexFlatIP``), the reference the others are measured against;
- ``hnsw``: a graph (``IndexHNSWFlat``), fast and close to exact, the paper's choice;
- ``ivfpq``: inverted lists of product-quantised codes (``IndexIVFPQ``), ~15x smaller than flat;
  its approximate scores are corrected by exactly re-scoring ``k * rerank`` candidates with the
  stored embeddings; ``opq=True`` rotates the vectors first (OPQ) so the codes lose less;
- ``hnswsq``: the HNSW graph over scalar-quantised vectors (``IndexHNSWSQ``, ``sq_bits`` per
  dimension: 4x smaller than ``hnsw`` at 8 bits), re-ranked exactly like ``ivfpq``.

docs/scale.md measures both compressed kinds against flat on 1M and 5M 768-d vectors.

The embeddings themselves stay on disk as ``.npy`` shards, memory-mapped (:class:`Embeddings`).
RAG needs them after search: the top-k prior p_eta(z|x) is a softmax over d(z)ᵀq(x) recomputed
in torch so the question encoder gets gradient (Sec. 2.4), hence :meth:`DenseIndex.vectors`.
Indexes are saved with ``faiss.write_index`` (never pickle) and loaded memory-mapped.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from margin._io import atomic_path
from margin.errors import MarginError

DENSE_KINDS = ("flat", "hnsw", "ivfpq", "hnswsq")
RERANKED_KINDS = ("ivfpq", "hnswsq")  # compressed codes: approximate scores, re-ranked exactly
REMOVABLE_KINDS = ("flat", "ivfpq")  # FAISS removes their vectors in place; graphs are rebuilt
SQ_TYPES = {4: "QT_4bit", 6: "QT_6bit", 8: "QT_8bit", 16: "QT_fp16"}  # sq_bits -> FAISS type


@dataclass(frozen=True)
class IndexConfig:
    """How to build and search a dense index. ``None`` fields are set by the rules below."""

    kind: str = "flat"  # "flat" (exact), "hnsw" (the paper's), "ivfpq" or "hnswsq" (compressed)
    hnsw_m: int = 32  # HNSW: neighbours per node (memory: ~2 * hnsw_m * 4 bytes per vector)
    ef_construction: int = 128  # HNSW: build-time candidate list (FAISS: 40; see BENCHMARKS.md)
    ef_search: int = 128  # HNSW: candidate list size while searching (raised to k when smaller)
    nlist: int | None = None  # IVF: number of inverted lists; None: ivf_nlist(n)
    pq_m: int | None = None  # PQ: sub-quantisers = bytes per vector; None: pq_m(dim)
    pq_bits: int | None = None  # PQ: bits per sub-quantiser code; None: 8, fewer for tiny n
    nprobe: int | None = None  # IVF: lists visited per query; None: ivf_nprobe(nlist)
    rerank: int = 10  # ivfpq/hnswsq: re-score k * rerank candidates exactly (embeddings); 1: off
    train_size: int | None = None  # training sample (IVF, OPQ, SQ); None: ivf_train_size(...)
    opq: bool = False  # IVF-PQ: learn an OPQ rotation before product quantisation
    sq_bits: int = 8  # HNSW-SQ: bits per dimension, 4, 6, 8 or 16 (fp16)
    seed: int = 0  # seed of the training sample and of k-means

    def resolved(self, n: int, dim: int) -> IndexConfig:
        """A copy with every rule-based field set for ``n`` vectors of dimension ``dim``."""
        if self.kind not in DENSE_KINDS:
            raise MarginError(f"unknown dense index kind '{self.kind}'; use one of {DENSE_KINDS}")
        if self.kind == "hnswsq":
            if self.sq_bits not in SQ_TYPES:
                raise MarginError(f"sq_bits={self.sq_bits} is not supported; use 4, 6, 8 or 16")
            return replace(self, train_size=self.train_size or min(n, 65_536))
        if self.kind != "ivfpq":
            return self
        nlist = self.nlist or ivf_nlist(n)
        m = self.pq_m or pq_m(dim)
        if dim % m:
            raise MarginError(f"pq_m={m} does not divide the dimension {dim}; pick a divisor")
        return replace(
            self,
            nlist=nlist,
            pq_m=m,
            pq_bits=self.pq_bits or pq_bits(n),
            nprobe=self.nprobe or ivf_nprobe(nlist),
            train_size=self.train_size or ivf_train_size(n, nlist),
        )


def ivf_nlist(n: int) -> int:
    """Inverted lists: the power of two nearest sqrt(n) (1,024 for 1M vectors, 4,096 for 21M), at
    most n/39 so k-means has the 39 points per centroid FAISS asks for. FAISS suggests up to
    16·sqrt(n) for speed; sqrt(n) keeps k-means training affordable on a few CPU cores."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return max(1, min(nlist, n // 39))


def pq_m(dim: int) -> int:
    """Sub-quantisers: one byte per 4 dimensions (96 for 384-d, 192 for DPR's 768-d): with 8-byte
    ids an IVF-PQ entry is dim/4 + 8 bytes against flat's 4·dim, ~15x smaller."""
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return m


def pq_bits(n: int) -> int:
    """Bits per PQ code: 8 (256 centroids per sub-quantiser) once there are 39 * 256 vectors to
    train on; fewer for tiny collections so that every centroid still gets ~39 points."""
    return int(min(8, max(1, math.floor(math.log2(max(2, n // 39))))))


def ivf_nprobe(nlist: int) -> int:
    """Lists visited per query: nlist / 16, but at least 32 (or all lists when fewer).

    Measured on the default corpus (12k MiniLM passages, 128 lists, re-rank on): recall@10 is
    0.85 at nprobe 8, 0.91 at 16, 0.95 at 32; on 1M clustered vectors 64 of 1,024 lists give
    0.99 (benchmarks/retrieval_index.py)."""
    return min(nlist, max(32, nlist // 16))


def ivf_train_size(n: int, nlist: int) -> int:
    """Training sample: 64 points per list, at least 39 * 256 for the PQ codebooks, at most n."""
    return min(n, max(64 * nlist, 39 * 256))


@dataclass(frozen=True)
class SearchResult:
    """Top-k results of a batch of queries, best first; row -1 (score -inf) where none was found."""

    scores: np.ndarray  # (n_queries, k) float32 inner products (BM25: BM25 scores)
    rows: np.ndarray  # (n_queries, k) int64 global passage rows


class Embeddings:
    """Passage vectors in ``.npy`` shards, memory-mapped: rows are read only when asked for."""

    def __init__(self, shards: Sequence[np.ndarray]):
        self.shards = list(shards)  # each (n_shard, dim) float32, usually np.memmap
        sizes = [len(s) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # (n_shards + 1,)
        self.dim = int(self.shards[0].shape[1]) if self.shards else 0

    @classmethod
    def open(cls, paths: Sequence[Path], dim: int) -> Embeddings:
        """Memory-map ``.npy`` shards, checking each is a 2-D float32 array of width ``dim``."""
        shards = []
        for path in paths:
            if not Path(path).is_file():
                raise MarginError(f"{path} is missing; rebuild the index (or restore the file)")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise MarginError(
                    f"{path} is corrupt or truncated ({exc}); rebuild the index"
                ) from None
            if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != dim:
                raise MarginError(
                    f"{path} holds {array.dtype} {array.shape}, expected float32 (n, {dim}): "
                    "dimension mismatch; rebuild the index"
                )
            shards.append(array)
        return cls(shards)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Vectors at global ``rows`` (any shape) -> rows.shape + (dim,); zeros for row -1."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)  # (m,)
        out = np.zeros((flat.size, self.dim), dtype=np.float32)  # (m, dim)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1  # (m,)
        for s in np.unique(shard_of[flat >= 0]):
            where = np.nonzero((shard_of == s) & (flat >= 0))[0]
            local = flat[where] - self.offsets[s]
            order = np.argsort(local)  # sorted reads are kinder to the page cache
            out[where[order]] = self.shards[s][local[order]]
        return out.reshape(*rows.shape, self.dim)


class DenseIndex:
    """A FAISS inner-product index over :class:`Embeddings`; rows are global passage rows.

    >>> index = DenseIndex.build(embeddings, IndexConfig(kind="hnsw"))  # doctest: +SKIP
    >>> result = index.search(query_vectors, k=5)  # (n, 5) scores and rows  # doctest: +SKIP
    >>> index.vectors(result.rows).shape  # (n, 5, dim)  # doctest: +SKIP
    """

    def __init__(
        self, index: faiss.Index, embeddings: Embeddings, config: IndexConfig, writable: bool = True
    ):
        self.index = index  # the FAISS index, ntotal == len(embeddings)
        self.embeddings = embeddings  # memory-mapped vectors, for vectors() and re-ranking
        self.config = config  # resolved config (no None left for the index's kind)
        self.writable = writable  # False when memory-mapped from disk: FAISS cannot add then

    @classmethod
    def build(cls, embeddings: Embeddings, config: IndexConfig) -> DenseIndex:
        """Build (and for IVF-PQ train) an index over every vector in ``embeddings``."""
        n, dim = len(embeddings), embeddings.dim
        if n == 0:
            raise MarginError("cannot build an index over no passages")
        config = config.resolved(n, dim)
        index = _new_faiss_index(config, dim)
        if not index.is_trained:
            rng = np.random.default_rng(config.seed)
            size = min(config.train_size, n)  # a rebuild after removals may have fewer
            sample = np.sort(rng.choice(n, size=size, replace=False))
            index.train(np.ascontiguousarray(embeddings.take(sample)))  # (train_size, dim)
        dense = cls(index, Embeddings([]), config)
        dense.add(embeddings)
        return dense

    def add(self, embeddings: Embeddings) -> None:
        """Index the rows of ``embeddings`` beyond the ones already indexed (append-only)."""
        if not self.writable:
            raise MarginError(
                "this index was opened memory-mapped (read-only); load it with "
                "mmap=False to add passages"
            )
        if embeddings.dim and embeddings.dim != self.index.d:
            raise MarginError(
                f"dimension mismatch: index is {self.index.d}-d, vectors "
                f"{embeddings.dim}-d; use the index's encoder"
            )
        start = self.index.ntotal
        for shard, lo in zip(embeddings.shards, embeddings.offsets[:-1], strict=True):
            skip = max(0, start - int(lo))
            if skip < len(shard):
                self.index.add(np.ascontiguousarray(shard[skip:], dtype=np.float32))
        self.embeddings = embeddings

    def remove(self, rows: np.ndarray) -> None:
        """Drop the vectors of global ``rows``; every later row moves down by the number of
        rows dropped before it, as the passage store compacts when a sync removes passages.

        Only ``REMOVABLE_KINDS`` remove in place: FAISS's flat index compacts its array, and
        the inverted lists of IVF-PQ drop the entries, whose ids are then renumbered (codes and
        trained quantisers kept: nothing is re-encoded or re-trained). A graph (HNSW) cannot
        lose nodes; build it again from the stored vectors (:meth:`build`).
        """
        if self.config.kind not in REMOVABLE_KINDS:
            raise MarginError(
                f"a '{self.config.kind}' index cannot remove vectors in place; build it again "
                "from the stored embeddings"
            )
        if not self.writable:
            raise MarginError(
                "this index was opened memory-mapped (read-only); load it with mmap=False to "
                "remove passages"
            )
        rows = np.unique(np.asarray(rows, dtype=np.int64))  # (m,) sorted
        removed = self.index.remove_ids(rows)
        if removed != len(rows):
            raise MarginError(f"{len(rows) - removed} of the rows to remove are not in the index")
        if self.config.kind == "ivfpq":
            _renumber_ivf(faiss.extract_index_ivf(self.index), rows)
        self.embeddings = Embeddings([])  # stale until the next add() gives the compacted rows

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-k rows by inner product for each query. queries: (n, dim) float32."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise MarginError(
                f"queries have shape {queries.shape}, expected (n, {self.index.d}): "
                "dimension mismatch; encode them with the index's encoder"
            )
        _check_k(k, len(self))
        config = self.config
        candidates = k
        if config.kind in RERANKED_KINDS:
            candidates = min(len(self), k * max(1, config.rerank))
        if config.kind in ("hnsw", "hnswsq"):
            params = faiss.SearchParametersHNSW(efSearch=max(config.ef_search, candidates))
        elif config.kind == "ivfpq":
            params = faiss.SearchParametersIVF(nprobe=config.nprobe)
            if config.opq:  # the IVF parameters go to the index under the rotation
                params = faiss.SearchParametersPreTransform(index_params=params)
        else:
            params = None
        scores, rows = self.index.search(queries, candidates, params=params)  # (n, candidates)
        if candidates > k:
            scores, rows = _rerank(queries, rows, self.embeddings, k)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return SearchResult(scores, rows.astype(np.int64))

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored embeddings of ``rows`` (e.g. SearchResult.rows (n, k)) -> (n, k, dim) float32."""
        return self.embeddings.take(rows)

    def save(self, path: str | Path) -> None:
        """Write the FAISS index to ``path`` atomically (``faiss.write_index``, no pickle)."""
        with atomic_path(Path(path)) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(
        cls, path: str | Path, embeddings: Embeddings, config: IndexConfig, mmap: bool = True
    ) -> DenseIndex:
        """Read an index saved by :meth:`save`; ``mmap=True`` maps it read-only from disk."""
        path = Path(path)
        if not path.is_file():
            raise MarginError(f"{path} is missing; rebuild the index (or restore the file)")
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0  # maps flat codes and inverted lists
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1][:120]
            raise MarginError(
                f"{path} is corrupt or truncated ({reason}); rebuild the index"
            ) from None
        if index.d != embeddings.dim or index.ntotal != len(embeddings):
            raise MarginError(
                f"{path} holds {index.ntotal} vectors of dimension {index.d} but the embeddings "
                f"are {len(embeddings)} x {embeddings.dim}; rebuild the index"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise MarginError(f"{path} is not an inner-product index; rebuild the index")
        for shard in embeddings.shards:  # served: rows are read at random from now on
            _random_access(shard)
        return cls(index, embeddings, config, writable=not mmap)


def faiss_kind(index: faiss.Index) -> str:
    """Which of DENSE_KINDS a FAISS index is (its class), or its class name if none."""
    if isinstance(index, faiss.IndexPreTransform):  # OPQ rotation over an IVF-PQ index
        index = faiss.downcast_index(index.index)
    kinds = {
        "IndexFlatIP": "flat",
        "IndexHNSWFlat": "hnsw",
        "IndexIVFPQ": "ivfpq",
        "IndexHNSWSQ": "hnswsq",
    }
    return kinds.get(type(index).__name__, type(index).__name__)


def _renumber_ivf(ivf: faiss.IndexIVF, removed: np.ndarray) -> None:
    """After ``remove_ids(removed)``: renumber the ids left in the inverted lists so they are
    rows of the compacted store again (id - the number of removed ids below it)."""
    lists = ivf.invlists
    for number in range(lists.nlist):
        n = lists.list_size(number)
        if n == 0:
            continue
        ids_ptr, codes_ptr = lists.get_ids(number), lists.get_codes(number)
        ids = faiss.rev_swig_ptr(ids_ptr, n).copy()  # (n,) int64
        codes = faiss.rev_swig_ptr(codes_ptr, n * lists.code_size).copy()  # (n * code_size,)
        lists.release_ids(number, ids_ptr)
        lists.release_codes(number, codes_ptr)
        ids -= np.searchsorted(removed, ids)  # removed is sorted; no id left is in it
        lists.update_entries(number, 0, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))


def _random_access(array: np.ndarray) -> None:
    """Tell the kernel a memory-mapped shard is read at random rows (re-ranking, vectors()):
    no read-ahead, so the resident set grows by the pages of the rows read, not by the
    128 KiB around each (docs/scale.md). Builds read shards whole and keep read-ahead."""
    raw = getattr(array, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError, ValueError):
            raw.madvise(mmap.MADV_RANDOM)


def _new_faiss_index(config: IndexConfig, dim: int) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if config.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if config.kind in ("hnsw", "hnswsq"):
        if config.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, ip)
        else:
            qtype = getattr(faiss.ScalarQuantizer, SQ_TYPES[config.sq_bits])
            index = faiss.IndexHNSWSQ(dim, qtype, config.hnsw_m, ip)
        index.hnsw.efConstruction = config.ef_construction
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, config.nlist, config.pq_m, config.pq_bits, ip)
    index.cp.seed = config.seed
    index.pq.cp.seed = config.seed
    if not config.opq:
        return index
    return faiss.IndexPreTransform(faiss.OPQMatrix(dim, config.pq_m), index)


def _rerank(
    queries: np.ndarray, rows: np.ndarray, embeddings: Embeddings, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of the candidates, from the stored vectors; keep the best k."""
    vectors = embeddings.take(rows)  # (n, c, dim)
    exact = np.einsum("nd,ncd->nc", queries, vectors)  # (n, c)
    exact = np.where(rows >= 0, exact, -np.inf)
    best = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # (n, k)
    return np.take_along_axis(exact, best, 1), np.take_along_axis(rows, best, 1)


def _check_k(k: int, n: int) -> None:
    if k < 1 or k > n:
        raise MarginError(f"k={k} but the index holds {n} passages; use 1 <= k <= {n}")
