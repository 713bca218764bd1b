"""Keeping an index in step with its folder: ``margin index sync`` and ``margin index remove``.

A folder of documents changes after it is indexed (:mod:`margin.retrieval.documents`). The passage
store records each file's path, size, modification time and sha256 (its ``margin.documents``
metadata), so :func:`compare_folder` can tell, without encoding anything, which files of the
folder are new, which changed and which were deleted: a file whose size and modification time
are the recorded ones is unchanged and is not even read; otherwise its content hash decides (a
file only touched is unchanged). :func:`sync_index` then removes the passages of changed and
deleted files and encodes the passages of changed and new files, and only those
(:func:`margin.retrieval.update.update_index`: crash-safe, resumable, one new generation whose
manifest, and so its version, a running ``margin serve`` can be pointed at).

:func:`remove_document` removes one document's passages, by its source or by a passage id.

The folder is read again with the glob and chunking the index recorded for it at build time
(``Manifest.document_folders``) unless others are given: a changed chunking applies to the files
read again only; rebuild to re-chunk them all.

>>> report = sync_index("notes-index", "~/notes")  # doctest: +SKIP
>>> report.summary()  # doctest: +SKIP
'synced notes-index with /home/me/notes: 1 added, 1 changed, 1 removed, 40 unchanged files; ...'
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from margin.errors import MarginError
from margin.retrieval.documents import SkippedFile, read_files, require_readers, walk
from margin.retrieval.manifest import Encoder, Manifest
from margin.retrieval.passages import Chunking, SourceFile
from margin.retrieval.reader import open_index
from margin.retrieval.store import PassageStore
from margin.retrieval.update import update_index


@dataclass(frozen=True)
class FolderChanges:
    """How a folder differs from what an index holds of it (paths relative to the folder)."""

    added: list[str]  # in the folder, not in the index
    changed: list[str]  # in both, with other content
    removed: list[str]  # in the index, gone from the folder (or no longer matching the glob)
    unchanged: int  # files in both with the same content
    drop: np.ndarray  # (m,) rows of the passages of changed and removed files
    refiled: dict[SourceFile, SourceFile] = field(default_factory=dict)  # touched files: the
    # old record -> the same content's record with its new modification time

    @property
    def any(self) -> bool:
        return bool(self.added or self.changed or self.removed)


@dataclass(frozen=True)
class SyncReport:
    """What a sync did."""

    index: Path  # the index directory
    folder: str  # the folder, resolved
    changes: FolderChanges  # files added, changed, removed, unchanged
    encoded: int  # passages encoded (those of the added and changed files)
    removed: int  # passages removed (those of the changed and removed files)
    skipped: list[SkippedFile]  # added or changed files that gave no passages
    manifest: Manifest  # the index now

    def summary(self) -> str:
        """The one line ``margin index sync`` prints."""
        c = self.changes
        return (
            f"synced {self.index} with {self.folder}: {len(c.added)} added, {len(c.changed)} "
            f"changed, {len(c.removed)} removed, {c.unchanged} unchanged files; "
            f"{self.encoded} passages encoded, {self.removed} removed "
            f"({self.manifest.passages} passages)"
        )


def reading_record(
    corpus: str | Path, chunking: Chunking, glob: str | None
) -> dict[str, dict[str, Any]] | None:
    """How ``index build``/``add`` read a folder corpus, for the manifest's
    ``document_folders`` (what a sync reads it with again); None for a corpus file."""
    if str(corpus) == "default" or not Path(corpus).expanduser().is_dir():
        return None
    folder = str(Path(corpus).expanduser().resolve())
    return {folder: {"glob": glob, "chunk_words": chunking.words,
                     "chunk_overlap": chunking.overlap}}


def sync_index(
    index: str | Path,
    corpus: str | Path | None = None,
    encoder: Encoder | None = None,
    *,
    chunk_words: int | None = None,
    chunk_overlap: int | None = None,
    glob: str | None = None,
    progress: bool = True,
    batch_size: int = 64,
    device: str = "cpu",
) -> SyncReport:
    """Bring the index ``index`` in step with the folder ``corpus`` (default: the one folder it
    was built from): add new files, re-encode changed ones, remove deleted ones.

    encoder: the index's passage encoder; None loads it from the manifest (on ``device``) when
        there is something to encode.
    chunk_words, chunk_overlap, glob: default to those recorded for the folder at build time.
    """
    loaded = open_index(index, mmap=True)
    manifest, store = loaded.manifest, loaded.store
    root = _folder(Path(index), store, corpus)
    folder = str(root.resolve())
    recorded = (manifest.document_folders or {}).get(folder, {})
    glob = glob if glob is not None else recorded.get("glob")
    default = Chunking()
    chunking = Chunking(
        chunk_words if chunk_words is not None else recorded.get("chunk_words", default.words),
        chunk_overlap if chunk_overlap is not None else recorded.get(
            "chunk_overlap", default.overlap),
    )
    changes = compare_folder(store, root, glob)
    if not changes.any:
        return SyncReport(Path(index), folder, changes, 0, 0, [], manifest)
    if encoder is None and manifest.encoder is not None and (changes.added or changes.changed):
        from margin.devices import resolve_device
        from margin.retrieval.encoders import load_encoder_from_spec

        encoder = load_encoder_from_spec(manifest.encoder["spec"], device=str(resolve_device(
            device)))
    skipped: list[SkippedFile] = []
    counted = _Counted(read_files(root, sorted(changes.added + changes.changed), chunking,
                                  skipped))
    folders = {**(manifest.document_folders or {}), folder: {
        "glob": glob, "chunk_words": chunking.words, "chunk_overlap": chunking.overlap}}
    new = update_index(
        loaded, changes.drop, counted, encoder, refiled=changes.refiled,
        document_folders=folders, progress=progress, batch_size=batch_size,
    )
    return SyncReport(Path(index), folder, changes, counted.n, len(changes.drop), skipped, new)


def compare_folder(store: PassageStore, root: Path, glob: str | None = None) -> FolderChanges:
    """Compare the files of ``root`` (as ``walk`` selects them) with the store's records of
    that folder: size and modification time first, the sha256 of the content when they differ."""
    folder = str(root.resolve())
    runs: dict[str, list[tuple[SourceFile, int, int]]] = {}  # path -> (file, first row, rows)
    for file, first, n in store.file_runs():
        if file.folder == folder:
            runs.setdefault(file.path, []).append((file, first, n))
    present = walk(root, glob)
    added, changed, unchanged, refiled = [], [], 0, {}
    for relative in present:
        if relative not in runs:
            added.append(relative)
            continue
        file = runs[relative][0][0]
        try:
            stat = (root / relative).stat()
            if (stat.st_size, stat.st_mtime_ns) == (file.size, file.mtime_ns):
                unchanged += 1
                continue
            with open(root / relative, "rb") as f:
                same = hashlib.file_digest(f, "sha256").hexdigest() == file.sha256
        except OSError:
            same = False  # read again: reported as skipped if it cannot be read
        if same:
            unchanged += 1
            refiled[file] = replace(file, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        else:
            changed.append(relative)
    removed = sorted(set(runs) - set(present))
    drop = [np.arange(first, first + n) for path in (*changed, *removed)
            for _, first, n in runs[path]]
    rows = np.concatenate([np.zeros(0, np.int64), *drop]).astype(np.int64)
    return FolderChanges(added, changed, removed, unchanged, rows, refiled)


def remove_document(
    index: str | Path,
    source: str | None = None,
    id: str | None = None,
    *,
    progress: bool = True,
) -> tuple[int, Manifest]:
    """Remove one document's passages from an index: (passages removed, the index's manifest).

    source: the document's path relative to its folder (as search results show it; a PDF's
        pages too), or its absolute path; for a corpus of records, its ``source`` field.
    id: a passage id (that one passage), or a corpus document id whose passages are ``ID-1``,
        ``ID-2``, ... (a document split into passages).
    """
    if (source is None) == (id is None):
        raise MarginError("give the document to remove: --source PATH or --id ID (one of them)")
    loaded = open_index(index, mmap=True)
    store = loaded.store
    if source is not None:
        rows = _rows_of_source(store, source)
        if not rows.size:
            raise MarginError(
                f"no passage of {index} comes from {source!r}; give the path as search results "
                "show it (relative to the indexed folder), or the file's absolute path"
            )
    else:
        assert id is not None
        rows = _rows_of_id(store, id)
        if not rows.size:
            raise MarginError(f"no passage of {index} has the id {id!r} (nor {id}-1, {id}-2, ...)")
    manifest = update_index(loaded, rows, progress=progress)
    return len(rows), manifest


def _folder(index: Path, store: PassageStore, corpus: str | Path | None) -> Path:
    """The folder to sync with: ``corpus``, checked against the folders the index holds."""
    folders = sorted({file.folder for file, _ in store.files()})
    if not folders:
        raise MarginError(
            f"{index} was not built from a folder of documents (its passages record no files); "
            "sync works on indexes built with `margin index build --corpus FOLDER`"
        )
    if corpus is None and len(folders) > 1:
        raise MarginError(
            f"{index} holds documents of {len(folders)} folders ({', '.join(folders)}); "
            "name the one to sync with --corpus"
        )
    root = Path(folders[0] if corpus is None else corpus).expanduser()
    if not root.is_dir():
        raise MarginError(f"{root}: no such folder; check the corpus path")
    if str(root.resolve()) not in folders:
        raise MarginError(
            f"{index} holds no documents of {root.resolve()} (its folders: {', '.join(folders)}); "
            "sync it with the folder it was built from, or add this one with `margin index add`"
        )
    require_readers()
    return root


def _rows_of_source(store: PassageStore, source: str) -> np.ndarray:
    """Rows of the document ``source``: its file's passages (by relative or absolute path),
    else the passages whose ``source`` field is ``source``."""
    absolute = Path(source).expanduser()
    runs = [
        np.arange(first, first + n)
        for file, first, n in store.file_runs()
        if file.path == source or (absolute.is_absolute()
                                   and Path(file.folder, file.path) == absolute.resolve())
    ]
    found = np.concatenate([store.rows_where("source", source), *runs])
    return np.unique(found).astype(np.int64)


def _rows_of_id(store: PassageStore, id: str) -> np.ndarray:
    """The row of passage ``id``, or the rows of document ``id``'s passages ``id-1``, ..."""
    rows = store.row_of([id])
    if rows[0] >= 0:
        return rows
    candidates = store.rows_where("id", f"{id}-", prefix=True)
    pattern = re.compile(re.escape(id) + r"-\d+")
    return np.array([row for row, p in zip(candidates, store.get(candidates), strict=True)
                     if pattern.fullmatch(p.id)], dtype=np.int64)


class _Counted:
    """An iterable that counts what passes through it (the passages a sync encodes)."""

    def __init__(self, iterable):
        self._iterable = iterable
        self.n = 0

    def __iter__(self):
        for item in self._iterable:
            self.n += 1
            yield item
