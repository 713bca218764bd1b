"""``manifest.json``: what an index directory is, shared by its writer and its reader.

An index directory (layout in :mod:`margin.retrieval.build`) is trusted only through its manifest:
the kind, the passage count and corpus checksum, the shards in row order, the search structure's
file and parameters, the encoder it was built with (Sec. 2.4: the document encoder stays frozen)
and every file's size and sha256. :mod:`margin.retrieval.build` writes it last;
:mod:`margin.retrieval.reader` reads it first. Both import it (and ``Encoder``, what an index
needs from an encoder) from here, so the reader does not depend on the writer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from margin.errors import MarginError
from margin.retrieval import _checksums
from margin.retrieval.bm25 import BM25Config
from margin.retrieval.index import DENSE_KINDS, IndexConfig
from margin.retrieval.passages import Passage

FORMAT = "margin-index"  # manifest "format" marker
FORMAT_VERSION = 1  # bumped when the directory layout changes incompatibly
MANIFEST = "manifest.json"
KINDS = (*DENSE_KINDS, "bm25")


class Encoder(Protocol):
    """What the index needs from a passage/question encoder (margin.retrieval.encoders provides
    them)."""

    dim: int  # embedding dimension
    fingerprint: str  # sha256 hex of the weights; recorded in the manifest
    spec: dict  # JSON-able recipe to reload the encoder, e.g. {"kind": ..., "name": ...}

    def encode_passages(
        self, passages: Sequence[Passage], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray: ...  # (n, dim) float32

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray: ...  # (n, dim) float32


@dataclass(frozen=True)
class ShardInfo:
    """One shard: files ``passages/<name>.arrow`` and (dense) ``embeddings/<name>.npy``."""

    name: str  # "shard-00000"
    rows: int  # passages in the shard
    checksum: str  # corpus checksum after the shard's last passage (store.chain_checksum)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: everything needed to trust and reload an index directory."""

    kind: str  # "flat", "hnsw", "ivfpq" or "bm25"
    passages: int  # number of passages (rows)
    corpus_checksum: str  # sha256 chain over (id, title, text) of every passage, in row order
    shards: list[ShardInfo]  # shard files in row order
    index_params: dict[str, Any]  # resolved IndexConfig or BM25Config fields
    index_file: str  # the FAISS file or BM25 directory, relative to the index directory
    encoder: dict[str, Any] | None  # {"spec", "fingerprint", "dim"}; None for BM25
    shard_size: int  # passages per shard when built
    created_at: str  # ISO 8601 UTC
    updated_at: str  # ISO 8601 UTC, last add_to_index
    margin_version: str  # margin version that wrote it
    generation: int = 0  # bumped by each add_to_index or sync (names the new index file)
    files: dict[str, dict[str, Any]] | None = None  # path -> {"bytes", "sha256"}; None: older
    corpus: str | None = None  # built from: a folder/file's absolute path, "default"; None: unknown
    document_folders: dict[str, dict[str, Any]] | None = None  # folder -> how it was read:
    # {"glob", "chunk_words", "chunk_overlap"}, what `margin index sync` reads it with again
    metric: str = "ip"  # inner product, as MIPS in the paper
    format: str = FORMAT  # marker
    format_version: int = FORMAT_VERSION  # layout version
    path: Path | None = field(default=None, compare=False)  # directory it was read from

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read and check ``directory/manifest.json``; MarginError if missing or corrupt."""
        path = directory / MANIFEST
        if not path.is_file():
            building = work_dir(directory)
            hint = (
                f"a build was interrupted ({building.name} exists); run the same build again "
                "to resume it"
                if building.exists()
                else "build the index first"
            )
            raise MarginError(f"{directory} is not a margin index (no {MANIFEST}); {hint}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {data.get('format_version')} is not supported")
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            manifest = cls(**data, path=directory)
            if manifest.kind not in KINDS or manifest.passages != sum(
                s.rows for s in manifest.shards
            ):
                raise ValueError("kind or passage count inconsistent")
            if (manifest.kind == "bm25") != (manifest.encoder is None):
                raise ValueError(f"kind {manifest.kind} does not fit encoder {manifest.encoder}")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            raise MarginError(f"{path} is corrupt ({exc}); rebuild the index") from None
        for relative in [*manifest.own_files(), *(manifest.files or {})]:
            _checksums.inside(directory, relative, path)
        recorded = set(manifest.files or {})
        missing = set(manifest.own_files()) - recorded - {n.split("/")[0] for n in recorded}
        if manifest.files is not None and missing:
            raise MarginError(f"{path} is corrupt (no checksum of {sorted(missing)[0]}); "
                              "rebuild the index")
        return manifest

    def own_files(self) -> list[str]:
        """The index's files and directories, relative to it: shards, then the search structure."""
        subs = ("passages", "embeddings") if self.kind != "bm25" else ("passages",)
        suffix = {"passages": ".arrow", "embeddings": ".npy"}
        return [
            *(f"{sub}/{s.name}{suffix[sub]}" for sub in subs for s in self.shards),
            self.index_file,
        ]


def config_of(manifest: Manifest) -> IndexConfig | BM25Config:
    """The index config recorded in a manifest."""
    try:
        if manifest.kind == "bm25":
            return BM25Config(**manifest.index_params)
        return IndexConfig(**manifest.index_params)
    except TypeError as exc:
        raise MarginError(f"{MANIFEST} has bad index_params ({exc}); rebuild the index") from None


def work_dir(out: Path) -> Path:
    """The work directory ``.<name>.building/`` an unfinished build of ``out`` lives in."""
    return out.with_name(f".{out.name}.building")
