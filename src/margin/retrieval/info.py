"""What an index directory holds (``margin index info``): kind, counts, encoder, sizes, dates,
corpus and whether its files still match their checksums.

Everything comes from what the index already records, read without loading the search structure
or an encoder: the manifest (:mod:`margin.retrieval.manifest`), the passage store's record of the
document files it was read from (:meth:`~margin.retrieval.store.PassageStore.files`), the file
sizes on disk and the manifest's sha256 of every file (:mod:`margin.retrieval._checksums`, the
same check ``margin index verify`` starts with). A damaged index is still described: its
checksums say "failed" and name the files.

What is unknown is None (``--json``: null; printed: "unknown"): an index written by an older
margin records no corpus and, older still, no file checksums.

Documents are the files of the document folders the passages were read from (``index build
--corpus FOLDER``); for an index of records (JSONL, DPR TSV, Parquet), or one mixing records and
files, the distinct passage titles: a Wikipedia article's passages share its title, so for the
paper's corpus that is the number of articles.

The memory figure is an estimate of what a process that opened the index keeps resident: the
search structure (the FAISS file, or BM25's arrays), which every query reads. The passages and
embeddings are memory-mapped (``mapped_bytes``): only the pages of the hits come into memory.

>>> describe_index("notes-index").documents  # doctest: +SKIP
3
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from margin.errors import MarginError
from margin.retrieval import _checksums
from margin.retrieval.manifest import Manifest, work_dir
from margin.retrieval.store import PassageStore

PARTS_FILE = "parts.json"  # written by margin.retrieval.sharded.split_index in DIR/parts-S/


@dataclass(frozen=True)
class IndexInfo:
    """One index directory, described; ``to_json`` is what ``--json`` prints."""

    path: str  # the index directory
    kind: str  # "flat", "hnsw", "ivfpq", "hnswsq" or "bm25"
    parts: list[int]  # S of each current split into parts (DIR/parts-S/); [] when not split
    passages: int  # rows of the passage store
    documents: int | None  # files or distinct titles (documents_counted); None: unreadable
    documents_counted: str | None  # "files" (document folders) or "titles" (records)
    encoder: str | None  # the passage encoder's name or directory; None for BM25
    encoder_fingerprint: str | None  # the first 12 hex digits of its weights' sha256
    dim: int | None  # embedding dimension; None for BM25
    disk_bytes: int  # every file under the directory
    memory_bytes: int  # estimate: the search structure, read on every query
    mapped_bytes: int  # passages and embeddings: memory-mapped, paged in per hit
    created_at: str  # ISO 8601 UTC, the build
    updated_at: str  # ISO 8601 UTC, the last add (or the build)
    corpus: str | None  # what it was built from: a folder, a file or "default"; None unknown
    folders: list[str]  # the document folders its passages were read from (build and adds)
    checksums: str  # "ok", "failed", "skipped" (--no-verify: sizes match), "unknown" (none)
    problems: list[str]  # one line per file that failed
    margin_version: str  # the margin that last wrote the manifest

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def describe_index(directory: str | Path, verify: bool = True) -> IndexInfo:
    """Describe the index ``directory``; MarginError (one line) if it is not an index.

    verify: hash every file against the manifest's sha256 (about 2 s per GB on a 2-core CPU);
        False compares the sizes only (checksums "skipped" when they match).
    """
    directory = Path(directory)
    if not directory.is_dir():
        hint = ("its build was interrupted; run the same build again to resume it"
                if work_dir(directory).exists() else "build the index first")
        raise MarginError(f"{directory}: no such index directory; {hint}")
    manifest = Manifest.read(directory)
    documents, counted, folders = _documents(directory, manifest)
    checksums, problems = _checksum_status(directory, manifest, verify)
    encoder = manifest.encoder
    own = manifest.own_files()
    return IndexInfo(
        path=str(directory),
        kind=manifest.kind,
        parts=_parts(directory, manifest),
        passages=manifest.passages,
        documents=documents,
        documents_counted=counted,
        encoder=None if encoder is None else _name(encoder["spec"]),
        encoder_fingerprint=None if encoder is None else str(encoder["fingerprint"])[:12],
        dim=None if encoder is None else int(encoder["dim"]),
        disk_bytes=_bytes(directory),
        memory_bytes=_bytes(directory / manifest.index_file),
        mapped_bytes=sum(_bytes(directory / f) for f in own[:-1]),
        created_at=manifest.created_at,
        updated_at=manifest.updated_at,
        corpus=manifest.corpus,
        folders=folders,
        checksums=checksums,
        problems=problems,
        margin_version=manifest.margin_version,
    )


def format_info(info: IndexInfo) -> list[str]:
    """The aligned lines ``margin index info`` prints."""
    unknown = "unknown"
    kind = info.kind + (f", split into {' and '.join(map(str, info.parts))} parts"
                        if info.parts else "")
    documents = (unknown if info.documents is None
                 else f"{info.documents} {info.documents_counted}")
    encoder = ("none (BM25)" if info.encoder is None
               else f"{info.encoder} ({info.dim}-d, sha256 {info.encoder_fingerprint})")
    corpus = info.corpus or (unknown + (f" (files from {', '.join(info.folders)})"
                                        if info.folders else ""))
    checksums = {
        "ok": "ok (every file matches its sha256)",
        "skipped": "skipped (--no-verify: sizes match, contents not hashed)",
        "unknown": "unknown (written by an older margin: no checksums recorded)",
        "failed": "failed: " + "; ".join(info.problems),
    }[info.checksums]
    rows = [
        ("index", info.path),
        ("kind", kind),
        ("passages", str(info.passages)),
        ("documents", documents),
        ("encoder", encoder),
        ("disk", _size(info.disk_bytes)),
        ("memory", f"~{_size(info.memory_bytes)} (the search structure; "
                      f"{_size(info.mapped_bytes)} of passages and vectors memory-mapped)"),
        ("built", info.created_at or unknown),
        ("updated", info.updated_at or unknown),
        ("corpus", corpus),
        ("checksums", checksums),
    ]
    width = max(len(name) for name, _ in rows) + 2
    return [f"{name:<{width}}{value}" for name, value in rows]


def _documents(directory: Path, manifest: Manifest) -> tuple[int | None, str | None, list[str]]:
    """(documents, "files" or "titles", folders); (None, None, []) if the shards are unreadable."""
    names = [f"{s.name}.arrow" for s in manifest.shards]
    try:
        files = PassageStore.open(directory / "passages", names).files()
        folders = sorted({file.folder for file, _ in files})
        if files and sum(n for _, n in files) == manifest.passages:
            return len(files), "files", folders
        titles = [_column(directory / "passages" / name, "title") for name in names]
        chunks = [chunk for column in titles for chunk in column.chunks]
        distinct = pc.count_distinct(pa.chunked_array(chunks, pa.string())).as_py()
        return int(distinct), "titles", folders
    except (MarginError, pa.ArrowException, OSError):
        return None, None, []


def _column(path: Path, name: str) -> pa.ChunkedArray:
    """One column of a passage shard, memory-mapped (zero-copy)."""
    return ipc.open_file(pa.memory_map(str(path), "r")).read_all().column(name)


def _checksum_status(directory: Path, manifest: Manifest, verify: bool) -> tuple[str, list[str]]:
    if manifest.files is None:
        return "unknown", []
    problems = _checksums.problems(directory, manifest.files, contents=verify)
    if problems:
        return "failed", problems
    return ("ok" if verify else "skipped"), []


def _parts(directory: Path, manifest: Manifest) -> list[int]:
    """S of each ``parts-S/`` split of this very index (one split before an add is stale)."""
    found = []
    for path in directory.glob(f"parts-*/{PARTS_FILE}"):
        parts = path.parent.name.removeprefix("parts-")
        try:
            current = json.loads(path.read_text(encoding="utf-8")).get("corpus_checksum")
        except (OSError, ValueError, AttributeError):
            continue
        if parts.isdigit() and current == manifest.corpus_checksum:
            found.append(int(parts))
    return sorted(found)


def _name(spec: dict[str, Any]) -> str:
    return str(spec.get("name") or json.dumps(spec, sort_keys=True))


def _bytes(path: Path) -> int:
    """A file's size, or the total of every file under a directory (0 if missing)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _size(n: int) -> str:
    """Bytes in decimal units: ``812 B``, ``1.2 MB``."""
    value, unit = float(n), "B"
    for larger in ("kB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, larger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
