"""Opening an index directory (validated) and verifying one (``margin index verify``).

Nothing is trusted before it is checked against the manifest (:mod:`margin.retrieval.manifest`):
:func:`open_index` checks counts, dimensions, kinds and shard checksums every time and hashes every
file when the index is small enough (VERIFY_ON_OPEN_BYTES); :func:`verify_index` reads every byte
and reports every problem. An encoder is refused unless it is the one the index was built with
(Sec. 2.4: "we keep the document encoder fixed") or, for questions, made for it.

>>> index = open_index("wiki-index")  # doctest: +SKIP
>>> index.search(encoder.encode_queries(["who wrote hamlet?"]), k=5)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from margin.errors import MarginError
from margin.retrieval import _checksums
from margin.retrieval.bm25 import BM25Index
from margin.retrieval.index import DenseIndex, Embeddings, SearchResult, faiss_kind
from margin.retrieval.manifest import MANIFEST, Encoder, Manifest, config_of, work_dir
from margin.retrieval.passages import Passage
from margin.retrieval.store import PassageStore

# open_index hashes every file of an index up to this size (0.5-1 s; 40 ms for 12k passages of
# 384-d, 3-6 s for 1M on a 2-core CPU: docs/retrieval.md); larger ones get the cheap checks.
VERIFY_ON_OPEN_BYTES = 512 * 2**20

log = logging.getLogger("margin")


@dataclass
class LoadedIndex:
    """An opened index directory: its manifest, passages and search structure."""

    path: Path  # the index directory
    manifest: Manifest  # what it is
    store: PassageStore  # the passages, memory-mapped
    dense: DenseIndex | None  # for flat/hnsw/ivfpq
    bm25: BM25Index | None  # for bm25

    def search(self, queries: np.ndarray | Sequence[str], k: int) -> SearchResult:
        """Dense: query vectors (n, dim) from the index's encoder; BM25: query strings."""
        if self.dense is not None:
            if not isinstance(queries, np.ndarray):
                raise MarginError(
                    f"{self.path} is a dense index: encode the queries with its encoder "
                    "(encoder.encode_queries) and search with the vectors"
                )
            return self.dense.search(queries, k)
        assert self.bm25 is not None
        if isinstance(queries, np.ndarray):
            raise MarginError(f"{self.path} is a BM25 index: search it with query strings")
        return self.bm25.search(queries, k)

    def passages(self, result: SearchResult) -> list[list[Passage]]:
        """The passages of a search result, one list per query, best first (row -1 dropped)."""
        return [self.store.get(rows[rows >= 0]) for rows in result.rows]


def open_index(directory: str | Path, mmap: bool = True, verify: bool | None = None) -> LoadedIndex:
    """Open and validate an index directory; every inconsistency is a MarginError naming the file.

    mmap: memory-map the FAISS index (read-only); pass False to load it into RAM.
    verify: hash every file against the manifest's sha256 (True), only check that files exist
        with their recorded sizes (False), or None: hash when the files total at most
        VERIFY_ON_OPEN_BYTES, else leave it to :func:`verify_index` (``margin index verify``).
        Counts, dimensions, kinds and shard checksums are checked either way.
    """
    directory = Path(directory)
    if not directory.is_dir():
        if work_dir(directory).exists():
            raise MarginError(
                f"{directory} does not exist yet: its build was interrupted; run the same build "
                "again to resume it"
            )
        raise MarginError(f"{directory}: no such index directory; build the index first")
    manifest = Manifest.read(directory)
    _check_files(manifest, directory, verify)
    store = PassageStore.open(directory / "passages", [f"{s.name}.arrow" for s in manifest.shards])
    for info, table_rows, checksum in zip(
        manifest.shards, store.shard_rows(), store.shard_checksums(), strict=True
    ):
        where = f"{directory / 'passages' / info.name}.arrow"
        if info.rows != table_rows:
            raise MarginError(
                f"{where} has {table_rows} rows, the manifest says {info.rows}; rebuild the index"
            )
        if info.checksum != checksum:
            raise MarginError(
                f"{where} does not match the shard checksum in {MANIFEST}; rebuild the index"
            )
    if store.checksum() != manifest.corpus_checksum:
        raise MarginError(
            f"{directory}/passages does not match the corpus checksum in {MANIFEST}; "
            "rebuild the index"
        )
    dense = bm25 = None
    if manifest.kind == "bm25":
        bm25 = BM25Index.load(directory / manifest.index_file, mmap=mmap)
        if len(bm25) != manifest.passages:
            raise MarginError(
                f"{directory / manifest.index_file} covers {len(bm25)} passages, the manifest "
                f"{manifest.passages}; rebuild the index"
            )
    else:
        if not manifest.encoder:
            raise MarginError(f"{directory / MANIFEST} is corrupt (no encoder); rebuild the index")
        dim = int(manifest.encoder["dim"])
        paths = [directory / "embeddings" / f"{s.name}.npy" for s in manifest.shards]
        embeddings = Embeddings.open(paths, dim)
        for info, path, shard in zip(manifest.shards, paths, embeddings.shards, strict=True):
            if len(shard) != info.rows:
                raise MarginError(
                    f"{path} has {len(shard)} rows, the manifest says {info.rows}; "
                    "rebuild the index"
                )
        config = config_of(manifest)
        dense = DenseIndex.load(directory / manifest.index_file, embeddings, config, mmap=mmap)
        if faiss_kind(dense.index) != manifest.kind:
            raise MarginError(
                f"{directory / manifest.index_file} is a {faiss_kind(dense.index)} index but "
                f"{MANIFEST} says {manifest.kind}; rebuild the index"
            )
    return LoadedIndex(directory, manifest, store, dense, bm25)


def _check_files(manifest: Manifest, directory: Path, verify: bool | None) -> None:
    """The recorded files exist with their sizes and (``verify``; None: if small) checksums."""
    if manifest.files is None:  # written before file checksums: the other checks only
        return
    size = _checksums.total_bytes(manifest.files)
    contents = size <= VERIFY_ON_OPEN_BYTES if verify is None else verify
    if verify is None and not contents:
        log.info(
            "%s: %.1f GB, too large to hash on every open; `margin index verify --index %s` "
            "checks every file", directory, size / 1e9, directory,
        )
    problems = _checksums.problems(directory, manifest.files, contents)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MarginError(
            f"{problems[0]}{more}; `margin index verify --index {directory}` lists every "
            "problem; rebuild the index (or restore the files)"
        )


def verify_index(directory: str | Path, encoder: bool = True) -> list[str]:
    """Check everything about an index directory; one line per problem, [] when sound.

    Every file against the manifest's sha256 and size, the passage text against its checksum
    chain (recomputed from the text), counts, dimensions, the FAISS kind and, with ``encoder``,
    that the passage encoder recorded in the manifest still loads with the same weights
    (fingerprint). This is ``margin index verify``: it reads every byte of the index.
    """
    directory = Path(directory)
    try:
        manifest = Manifest.read(directory)
    except MarginError as exc:
        return [str(exc)]
    if manifest.files is None:
        problems = [
            f"{directory / MANIFEST} records no file checksums (written by an older margin); "
            "rebuild the index to make its files verifiable"
        ]
    else:
        problems = _checksums.problems(directory, manifest.files, contents=True)
    try:
        open_index(directory, verify=False).store.verify()
    except MarginError as exc:
        problems.append(str(exc))
    if encoder and manifest.encoder is not None:
        problems.extend(_encoder_problems(manifest))
    return problems


def _encoder_problems(manifest: Manifest) -> list[str]:
    """Does the passage encoder recorded in the manifest still load with the same weights?"""
    from margin.retrieval.encoders import load_encoder_from_spec

    built = manifest.encoder
    assert built is not None
    try:
        encoder = load_encoder_from_spec(built["spec"])
    except MarginError as exc:
        return [f"the index's encoder {_describe(built['spec'])} does not load: {exc}"]
    if encoder.fingerprint != built["fingerprint"] or encoder.dim != int(built["dim"]):
        return [
            f"the index's encoder {_describe(built['spec'])} now has other weights (sha256 "
            f"{encoder.fingerprint[:12]}, {encoder.dim}-d) than the index was built with "
            f"({built['fingerprint'][:12]}, {built['dim']}-d); restore them or rebuild the index"
        ]
    return []


def ensure_encoder_matches(manifest: Manifest, encoder: Encoder) -> None:
    """Refuse an encoder that does not fit the index: MarginError naming both encoders.

    A passage encoder (the default) must be the very one the index was built with: same weights
    fingerprint, same dimension (Sec. 2.4: the document encoder stays frozen). A question encoder
    (``encoder.spec["role"] == "question"``: DPR's other tower, or one being fine-tuned, whose
    weights change by design) is checked on the dimension only.
    """
    where = manifest.path or "this index"
    if manifest.encoder is None:
        raise MarginError(
            f"index {where} is a BM25 index; search it with query strings, no encoder needed"
        )
    built = manifest.encoder
    question = isinstance(encoder.spec, dict) and encoder.spec.get("role") == "question"
    same_weights = question or built["fingerprint"] == encoder.fingerprint
    if not same_weights or int(built["dim"]) != encoder.dim:
        raise MarginError(
            f"index {where} was built with encoder {_describe(built['spec'])} "
            f"({built['dim']}-d, sha256 {built['fingerprint'][:12]}); the given encoder is "
            f"{_describe(encoder.spec)} ({encoder.dim}-d, sha256 {encoder.fingerprint[:12]}); "
            "use the index's encoder or rebuild the index with this one"
        )


def ensure_query_encoder_matches(manifest: Manifest, encoder: Encoder) -> None:
    """Refuse a question encoder that was not made for the index's passages (MarginError).

    For an index built with a symmetric encoder (sentence-transformers, plain HF: the same model
    embeds questions and passages), the question encoder must have the index's weights: same
    sha256 fingerprint. A DPR context-encoder index needs a DPR question encoder (the other tower,
    whose weights differ by design). A question encoder trained against a passage encoder
    (``margin train-retriever``: its directory records the pair, encoders.PAIRING_FILE) is
    accepted by exactly the indexes built with that passage encoder, while its weights are still
    the trained ones. Callers that mean to search with other weights (a question encoder being
    fine-tuned) skip this check (``--allow-encoder-mismatch``).
    """
    built = manifest.encoder
    if built is None:
        return ensure_encoder_matches(manifest, encoder)  # BM25: the same refusal
    spec = encoder.spec if isinstance(encoder.spec, dict) else {}
    paired = getattr(encoder, "trained_for", None)
    if paired and paired["question_fingerprint"] == encoder.fingerprint:
        wrong = None if paired["passage_fingerprint"] == built["fingerprint"] else (
            f"was trained against another passage encoder (sha256 "
            f"{paired['passage_fingerprint'][:12]})")
    elif built["spec"].get("kind") == "dpr":
        wrong = "is not a DPR question encoder" if spec.get("kind") != "dpr" else None
    else:
        wrong = "has other weights" if encoder.fingerprint != built["fingerprint"] else None
    if int(built["dim"]) != encoder.dim:
        wrong = "has another dimension"
    if wrong:
        raise MarginError(
            f"index {manifest.path or 'this index'} was built with encoder "
            f"{_describe(built['spec'])} ({built['dim']}-d, sha256 {built['fingerprint'][:12]}); "
            f"the question encoder {_describe(spec)} {wrong} ({encoder.dim}-d, sha256 "
            f"{encoder.fingerprint[:12]}); use the index's encoder, rebuild the index, or pass "
            "--allow-encoder-mismatch to search anyway"
        )


def _describe(spec: dict[str, Any]) -> str:
    return str(spec.get("name") or json.dumps(spec, sort_keys=True))
