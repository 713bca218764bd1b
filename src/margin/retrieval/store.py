"""The passage store: the text behind the index, on disk, memory-mapped, appendable.

RAG's memory is 21M passages (Sec. 3), about 13 GB of text. A pickled list would have to be read
whole into RAM before the first question; here the passages live in uncompressed Arrow IPC files
that are memory-mapped, so opening a store reads only the file footers and ``get`` touches only
the pages of the rows it returns.

A store is a directory of shards ``shard-00000.arrow``, ``shard-00001.arrow``, ... (columns id,
title, text, source). New passages are appended as new shards, never by rewriting old ones. Each
shard is written atomically and carries, in its schema metadata, its row count and the corpus
checksum *after* its last passage (a sha256 hash chain over the passages, see
:func:`chain_checksum`). The checksum of the whole store is therefore the last shard's value: free
to read, cheap to extend, and independent of how the passages were split into shards.

Passages read from a folder of documents (:mod:`margin.retrieval.documents`) carry their file
(:class:`~margin.retrieval.passages.SourceFile`); a shard of them also records, under the schema
metadata key ``margin.documents``, each such file's path, size, modification time, sha256 and
rows in the shard (:func:`documents_record`), which :meth:`PassageStore.files` reads back (what
a sync compares the folder with) and :meth:`PassageStore.get` puts back on each passage, so
passages copied from one store into another keep their files. The columns are unchanged, so
stores written before (no such key: no files) and readers written before (they ignore the key)
keep working.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from margin._io import atomic_path
from margin.errors import MarginError
from margin.retrieval.passages import Passage, SourceFile

SCHEMA = pa.schema([(name, pa.string()) for name in ("id", "title", "text", "source")])
EMPTY_CHECKSUM = hashlib.sha256(b"margin passages v1").hexdigest()  # checksum of no passages
_BATCH_ROWS = 8192  # rows per Arrow record batch inside a shard
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.arrow$")
DOCUMENTS_KEY = "margin.documents"  # shard metadata: the files of a document folder it holds
DOCUMENTS_VERSION = 1  # of that record's layout


def shard_name(index: int, suffix: str = ".arrow") -> str:
    """File name of shard ``index``: ``shard-00000.arrow``."""
    return f"shard-{index:05d}{suffix}"


def chain_checksum(passages: Iterable[Passage], start: str = EMPTY_CHECKSUM) -> str:
    """Extend the corpus checksum over ``passages``, one passage at a time.

    c <- sha256(c || len(id) || id || len(title) || title || len(text) || text), lengths as
    8-byte little-endian byte counts of the UTF-8 fields. Covers id, title and text (not
    source). Chaining per passage makes the result depend on the passages and their order only,
    not on the shard boundaries.
    """
    state = bytes.fromhex(start)
    for p in passages:
        h = hashlib.sha256(state)
        for field in (p.id, p.title, p.text):
            data = field.encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        state = h.digest()
    return state.hex()


def write_shard(path: Path, passages: Sequence[Passage], checksum_before: str) -> str:
    """Write ``passages`` as one Arrow IPC shard, atomically; return the checksum after them."""
    checksum = chain_checksum(passages, checksum_before)
    metadata = {
        "margin.rows": str(len(passages)),
        "margin.checksum_before": checksum_before,
        "margin.checksum": checksum,
    }
    documents = documents_record(passages)
    if documents is not None:
        metadata[DOCUMENTS_KEY] = json.dumps(documents, ensure_ascii=False)
    schema = SCHEMA.with_metadata(metadata)
    with atomic_path(Path(path)) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, schema) as writer:
            for i in range(0, len(passages), _BATCH_ROWS):
                rows = passages[i : i + _BATCH_ROWS]
                columns = [
                    pa.array([getattr(p, f) for p in rows], pa.string()) for f in SCHEMA.names
                ]
                writer.write_batch(pa.record_batch(columns, schema=schema))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return checksum


def documents_record(passages: Sequence[Passage]) -> dict | None:
    """The files the passages were read from, for a shard's ``margin.documents`` metadata:
    ``{"version": 1, "folders": {folder: [{"path", "size", "mtime_ns", "sha256", "first",
    "passages"}]}}``, a file's passages being rows ``first ..< first + passages`` of the shard;
    None when no passage comes from a document folder."""
    runs: dict[SourceFile, list[int]] = {}  # file -> [first row, passages]
    for row, p in enumerate(passages):
        if p.file is None:
            continue
        run = runs.setdefault(p.file, [row, 0])
        if run[0] + run[1] != row:
            raise MarginError(
                f"the passages of {p.file.path} are not consecutive; give each file's passages "
                "one after another"
            )
        run[1] += 1
    if not runs:
        return None
    folders: dict[str, list[dict]] = {}
    for file, (first, n) in runs.items():
        folders.setdefault(file.folder, []).append(
            {"path": file.path, "size": file.size, "mtime_ns": file.mtime_ns,
             "sha256": file.sha256, "first": first, "passages": n}
        )
    return {"version": DOCUMENTS_VERSION, "folders": folders}


class PassageStore:
    """Read-only view of a directory of passage shards, memory-mapped.

    >>> store = PassageStore.open("index/passages")  # doctest: +SKIP
    >>> store.get([0, 41])[1].title  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Path,
        shards: list[str],
        tables: list[pa.Table],
        checksums: list[str],
        documents: list[str | None] | None = None,
    ):
        self.root = root  # directory holding the shard files
        self.shards = shards  # shard file names, in row order
        self._tables = tables  # one zero-copy, memory-mapped table per shard
        self._checksums = checksums  # corpus checksum after each shard
        self._documents = documents or [None] * len(shards)  # each shard's margin.documents JSON
        self._files: dict[int, list[tuple[SourceFile, int, int]]] = {}  # parsed, by shard
        sizes = [t.num_rows for t in tables]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # (n_shards + 1,)
        self._id_hashes: np.ndarray | None = None  # sorted 64-bit id hashes, built on first lookup
        self._id_rows: np.ndarray | None = None  # row of each sorted hash

    @classmethod
    def open(
        cls, root: str | Path, shards: Sequence[str] | None = None, start: str = EMPTY_CHECKSUM
    ) -> PassageStore:
        """Open the store in ``root``: the given shard files, or every ``shard-*.arrow`` there.

        ``start`` is the checksum the first shard continues from (to open a tail of a store).
        """
        root = Path(root)
        if shards is None:
            if not root.is_dir():
                raise MarginError(f"{root}: no such passage store; build the index first")
            shards = sorted(p.name for p in root.iterdir() if _SHARD_RE.match(p.name))
        tables, checksums, documents = [], [], []
        previous = start
        for name in shards:
            table, metadata = _open_shard(root / name)
            before, after = metadata.get("margin.checksum_before"), metadata["margin.checksum"]
            if before is not None and before != previous:
                raise MarginError(
                    f"{root / name}: shard out of order or from another store; rebuild the index"
                )
            tables.append(table)
            checksums.append(after)
            documents.append(metadata.get(DOCUMENTS_KEY))
            previous = after
        return cls(root, list(shards), tables, checksums, documents)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def shard_rows(self) -> list[int]:
        """Number of passages in each shard, in order."""
        return [t.num_rows for t in self._tables]

    def shard_checksums(self) -> list[str]:
        """The corpus checksum after each shard, from the shards' metadata, in order."""
        return list(self._checksums)

    def checksum(self) -> str:
        """The corpus checksum (see :func:`chain_checksum`), read from the last shard's metadata."""
        return self._checksums[-1] if self._checksums else EMPTY_CHECKSUM

    def files(self) -> list[tuple[SourceFile, int]]:
        """The files of document folders the passages were read from, each with its number of
        passages in the store, in row order (empty for a store of records, or one written before
        files were recorded). A file whose passages span shards is listed once."""
        counts: dict[SourceFile, int] = {}
        for shard in range(len(self.shards)):
            for file, _, n in self._shard_files(shard):
                counts[file] = counts.get(file, 0) + n
        return list(counts.items())

    def file_runs(self) -> list[tuple[SourceFile, int, int]]:
        """(file, first global row, passages) of each run of a file's passages, in row order: a
        file whose passages span shards has one run per shard. What a sync or a removal reads
        to find a file's rows."""
        return [
            (file, int(self._offsets[shard]) + first, n)
            for shard in range(len(self.shards))
            for file, first, n in self._shard_files(shard)
        ]

    def rows_where(self, column: str, value: str, prefix: bool = False) -> np.ndarray:
        """Global rows, ascending, whose ``column`` ("id", "title", "text" or "source") equals
        ``value`` (``prefix``: starts with it). Reads that column of every shard."""
        import pyarrow.compute as pc

        test = pc.starts_with if prefix else pc.equal
        found = [
            np.flatnonzero(test(table.column(column), value).to_numpy()) + self._offsets[shard]
            for shard, table in enumerate(self._tables)
        ]
        return np.concatenate([np.zeros(0, np.int64), *found]).astype(np.int64)

    def _shard_files(self, shard: int) -> list[tuple[SourceFile, int, int]]:
        """(file, first local row, passages) of each file recorded in a shard, by first row."""
        if shard not in self._files:
            raw, runs = self._documents[shard], []
            try:
                record = json.loads(raw) if raw is not None else {"version": DOCUMENTS_VERSION}
                if record["version"] != DOCUMENTS_VERSION:
                    raise ValueError(f"version {record['version']} is not supported")
                for folder, files in record.get("folders", {}).items():
                    for f in files:
                        file = SourceFile(folder, f["path"], f["size"], f["mtime_ns"], f["sha256"])
                        runs.append((file, int(f["first"]), int(f["passages"])))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise MarginError(
                    f"{self.root / self.shards[shard]}: its record of document files is corrupt "
                    f"({exc}); rebuild the index"
                ) from None
            self._files[shard] = sorted(runs, key=lambda run: run[1])
        return self._files[shard]

    def _with_files(self, shard: int, local: np.ndarray, passages: list[Passage]) -> list[Passage]:
        """``passages`` (rows ``local`` of ``shard``) with the files they were read from."""
        runs = self._shard_files(shard)
        if not runs:
            return passages
        firsts = np.array([first for _, first, _ in runs])  # (n_files,)
        which = np.searchsorted(firsts, local, side="right") - 1  # (n,) the run a row may be in
        out = []
        for row, w, p in zip(local, which, passages, strict=True):
            file, first, n = runs[w] if w >= 0 else (None, 0, 0)
            out.append(Passage(p.id, p.title, p.text, p.source, file) if row < first + n else p)
        return out

    def verify(self) -> str:
        """Recompute the checksum from the text itself (reads every passage); return it."""
        checksum = EMPTY_CHECKSUM
        for name, table, stored in zip(self.shards, self._tables, self._checksums, strict=True):
            checksum = chain_checksum(_passages(table, self.root / name), checksum)
            if checksum != stored:
                raise MarginError(
                    f"{self.root / name}: content does not match its checksum; rebuild the index"
                )
        return checksum

    def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        """Passages at global row numbers ``rows`` (across shards), in the order given; those
        read from a document folder carry their file (so copying passages keeps the record)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # (n,)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            bad = rows[(rows < 0) | (rows >= len(self))][0]
            raise MarginError(f"row {bad} is out of range for a store of {len(self)} passages")
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1  # (n,)
        out: list[Passage | None] = [None] * rows.size
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            local = rows[where] - self._offsets[s]  # (m,)
            table = self._tables[s].take(pa.array(local))
            passages = self._with_files(s, local, _passages(table, self.root / self.shards[s]))
            for i, passage in zip(where, passages, strict=True):
                out[i] = passage
        return out  # type: ignore[return-value]

    def ids(self) -> pa.ChunkedArray:
        """All passage ids in row order, zero-copy (memory-mapped)."""
        chunks = [c for t in self._tables for c in t.column("id").chunks]
        return pa.chunked_array(chunks, pa.string())

    def row_of(self, ids: Sequence[str]) -> np.ndarray:
        """Global row of each id, ``-1`` where the store has no such id. ``(len(ids),)`` int64.

        The first call hashes every id (a few seconds per million passages); later calls are
        binary searches.
        """
        hashes, rows = self._lookup()
        out = np.full(len(ids), -1, dtype=np.int64)
        if not len(ids):
            return out
        query = _hash_ids(ids)  # (n,)
        lo = np.searchsorted(hashes, query, side="left")
        hi = np.searchsorted(hashes, query, side="right")
        for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
            candidates = rows[a:b]
            if len(candidates):
                found = [
                    r
                    for r, p in zip(candidates, self.get(candidates), strict=True)
                    if p.id == ids[i]
                ]
                out[i] = found[0] if found else -1
        return out

    def duplicate_id(self) -> str | None:
        """An id that occurs twice in the store, or None if all ids are unique."""
        hashes, rows = self._lookup()
        same = np.nonzero(hashes[1:] == hashes[:-1])[0]
        for i in same:  # equal 64-bit hashes: compare the ids themselves
            a, b = self.get([rows[i], rows[i + 1]])
            if a.id == b.id:
                return a.id
        return None

    def _lookup(self) -> tuple[np.ndarray, np.ndarray]:
        if self._id_hashes is None:
            hashes = np.concatenate(
                [_hash_ids(t.column("id").to_pylist()) for t in self._tables]
                or [np.zeros(0, np.uint64)]
            )  # (n,)
            order = np.argsort(hashes, kind="stable")
            self._id_hashes, self._id_rows = hashes[order], order.astype(np.int64)
        assert self._id_rows is not None
        return self._id_hashes, self._id_rows


def _open_shard(path: Path) -> tuple[pa.Table, dict[str, str]]:
    """Memory-map one shard: (zero-copy table, its schema metadata: the checksum after it under
    ``margin.checksum``, the one before it under ``margin.checksum_before`` if recorded)."""
    if not path.is_file():
        raise MarginError(f"{path} is missing; rebuild the index (or restore the file)")
    try:
        reader = ipc.open_file(pa.memory_map(str(path), "r"))
        table = reader.read_all()
    except (pa.ArrowException, OSError) as exc:
        raise MarginError(f"{path} is corrupt or truncated ({exc}); rebuild the index") from None
    metadata = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
    if table.schema.remove_metadata() != SCHEMA or "margin.checksum" not in metadata:
        raise MarginError(f"{path} is not a margin passage shard; rebuild the index")
    if int(metadata.get("margin.rows", -1)) != table.num_rows:
        raise MarginError(f"{path} is truncated ({table.num_rows} rows); rebuild the index")
    return table, metadata


def _passages(table: pa.Table, path: Path) -> list[Passage]:
    """The rows of ``table`` (read from shard ``path``) as passages; corrupt text is one error."""
    try:
        columns = [table.column(name).to_pylist() for name in SCHEMA.names]
    except (UnicodeDecodeError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0][:120]
        raise MarginError(
            f"{path}: passage text is corrupt ({reason}); check the whole index with "
            f"`margin index verify --index {path.parent.parent}` and rebuild it"
        ) from None
    return [Passage(*fields) for fields in zip(*columns, strict=True)]


def _hash_ids(ids: Iterable[str]) -> np.ndarray:
    """64-bit blake2b of each id, as uint64. Collisions are resolved by comparing the ids."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
            for i in ids
        ],
        dtype=np.uint64,
    )
