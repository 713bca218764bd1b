"""Changing an index in place: passages removed and passages added, as one new generation.

``margin index sync`` and ``margin index remove`` (:mod:`margin.retrieval.sync`) come down to
:func:`update_index`: drop some rows of an index, append some passages. Passage ids do not change;
rows do, the way a list's do when items are deleted: the store stays one run of rows 0 ..< n with
no holes, so everything that reads rows (search, the stored vectors, provenance) works unchanged.

The shards before the first one that loses a passage are kept as they are, files and all. From
that shard on, the passages that stay and then the new ones are written as NEW shards (numbered
past the highest the index has, ``shard_size`` passages each), with the staying passages' vectors
copied from their stored embeddings: only the new passages are encoded. A shard cannot just lose
a row in place: each shard's checksum continues the one before it (:func:`~margin.retrieval.store.
chain_checksum`), so every shard after a removal is written again (text and vectors copied).

The search structure, per kind (docs/documents.md has the costs):

  ``flat``, ``ivfpq``   FAISS removes the vectors in place (:meth:`DenseIndex.remove`; IVF-PQ
                        keeps its trained quantisers and codes) and the new ones are added
  ``hnsw``, ``hnswsq``  a graph cannot lose nodes: built again from the stored vectors (never
                        re-encoded); with nothing removed, the new vectors are added to it
  ``bm25``              built again from the passage text (tokenising is cheap)

Crash safety, as ``index add``: nothing the old manifest names is ever written; the new manifest
is written last (:func:`margin.retrieval.build.commit`), and only then are the files it no longer
names removed. A kill before it leaves the old index whole and opening; the shards written so far
stay beside it, and running the same update again keeps every one whose passages (checksum chain)
and vectors (rows) are what it would write, so the rerun encodes only what was not finished.

>>> update_index(open_index("notes"), drop=[4, 5], passages=new, encoder=enc)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from margin.errors import MarginError
from margin.retrieval.build import (
    build_search,
    check_unique_ids,
    commit,
    encode_shard,
    next_shard_number,
    save_npy,
    shard_done,
    shard_paths,
)
from margin.retrieval.index import REMOVABLE_KINDS, DenseIndex, Embeddings, IndexConfig
from margin.retrieval.manifest import Encoder, Manifest, ShardInfo, config_of
from margin.retrieval.passages import Passage, SourceFile
from margin.retrieval.reader import LoadedIndex, ensure_encoder_matches
from margin.retrieval.store import (
    EMPTY_CHECKSUM,
    PassageStore,
    chain_checksum,
    shard_name,
    write_shard,
)

READ_CHUNK = 10_000  # staying passages read from the old store at a time (bounds memory)


def update_index(
    loaded: LoadedIndex,
    drop: Iterable[int] | np.ndarray,
    passages: Iterable[Passage] = (),
    encoder: Encoder | None = None,
    *,
    refiled: Mapping[SourceFile, SourceFile] | None = None,
    document_folders: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    batch_size: int = 64,
) -> Manifest:
    """Remove the passages at rows ``drop`` of an opened index and append ``passages``, as the
    index's next generation; return its manifest (the old one when nothing changed).

    encoder: the index's passage encoder (its fingerprint is checked); needed by a dense index
        only when there are passages to add.
    refiled: new records of files whose content is unchanged (a newer modification time),
        put on their passages where those are written again anyway.
    document_folders: the manifest's record of how folders were read, if it changes.
    """
    directory, old, store = loaded.path, loaded.manifest, loaded.store
    drop = np.unique(np.asarray(list(drop) if not isinstance(drop, np.ndarray) else drop,
                                dtype=np.int64))  # (m,) sorted
    if drop.size and (drop[0] < 0 or drop[-1] >= len(store)):
        raise MarginError(f"row {drop[-1]} is out of range for {directory} ({len(store)} passages)")
    if encoder is not None and old.kind != "bm25":
        ensure_encoder_matches(old, encoder)
    starts = np.cumsum([0, *(s.rows for s in old.shards)])  # (n_shards + 1,) first row of each
    first = int(np.searchsorted(starts, drop[0], side="right")) - 1 if drop.size else len(
        old.shards)
    kept = old.shards[:first]  # untouched: same files
    staying = np.setdiff1d(np.arange(starts[first], len(store)), drop)  # rows copied, in order
    items = itertools.chain(
        _staying(store, staying, refiled or {}),
        ((p, -1) for p in _new(passages, store, drop, directory, old, encoder)),
    )
    written = _write_shards(
        directory, items, loaded.dense.embeddings if loaded.dense else None, encoder,
        next_shard_number(old), kept[-1].checksum if kept else EMPTY_CHECKSUM, old.shard_size,
        batch_size, progress,
    )
    if not drop.size and not written:  # nothing to remove or add
        return old
    shards = [*kept, *written]
    new_store = PassageStore.open(directory / "passages", [f"{s.name}.arrow" for s in shards])
    if len(new_store) == 0:
        raise MarginError(
            f"that would leave {directory} with no passages; delete the index directory instead"
        )
    check_unique_ids(new_store)
    index_file, params = _search_structure(loaded, new_store, shards, drop)
    folders = old.document_folders if document_folders is None else document_folders
    return commit(directory, old, new_store, shards, index_file, params, folders)


def _staying(
    store: PassageStore, rows: np.ndarray, refiled: Mapping[SourceFile, SourceFile]
) -> Iterator[tuple[Passage, int]]:
    """(passage, its old row) of the staying rows, read ``READ_CHUNK`` at a time."""
    for start in range(0, len(rows), READ_CHUNK):
        chunk = rows[start : start + READ_CHUNK]
        for row, p in zip(chunk, store.get(chunk), strict=True):
            if p.file in refiled:
                p = Passage(p.id, p.title, p.text, p.source, refiled[p.file])
            yield p, int(row)


def _new(
    passages: Iterable[Passage],
    store: PassageStore,
    drop: np.ndarray,
    directory: Path,
    old: Manifest,
    encoder: Encoder | None,
) -> Iterator[Passage]:
    """The passages to add, refusing an id that a staying passage has (a removed one's is free:
    a changed file's passages keep their ids) and a dense index without its encoder."""
    iterator = iter(passages)
    while chunk := list(itertools.islice(iterator, READ_CHUNK)):
        if old.kind != "bm25" and encoder is None:
            raise MarginError(f"{directory} is a dense index; pass its encoder to add passages")
        rows = store.row_of([p.id for p in chunk])  # (n,) -1: not in the store
        clash = (rows >= 0) & ~np.isin(rows, drop)
        if clash.any():
            raise MarginError(
                f"passage id '{chunk[int(np.argmax(clash))].id}' is already in the index "
                f"{directory}; give the new documents other ids"
            )
        yield from chunk


def _write_shards(
    directory: Path,
    items: Iterator[tuple[Passage, int]],
    embeddings: Embeddings | None,
    encoder: Encoder | None,
    number: int,
    checksum: str,
    shard_size: int,
    batch_size: int,
    progress: bool,
) -> list[ShardInfo]:
    """Write (passage, old row or -1) items as shards ``number``, ``number + 1``, ...: vectors
    copied for old rows, encoded for new passages; finished shards of an earlier run are kept."""
    from tqdm import tqdm

    shards: list[ShardInfo] = []
    dense = embeddings is not None
    with tqdm(desc="updating", unit=" passages", disable=not progress, dynamic_ncols=True) as bar:
        while batch := list(itertools.islice(items, shard_size)):
            passages = [p for p, _ in batch]
            rows = np.array([row for _, row in batch], dtype=np.int64)  # (n,) -1: new
            after = chain_checksum(passages, checksum)
            arrow, npy = shard_paths(directory, number)
            if shard_done(arrow, npy if dense else None, checksum, after, len(batch)):
                bar.update(len(batch))
            else:
                npy.unlink(missing_ok=True)  # its passages are about to change
                write_shard(arrow, passages, checksum)
                if embeddings is not None:
                    save_npy(npy, _vectors(passages, rows, embeddings, encoder, batch_size, bar))
                bar.update(int((rows >= 0).sum()) if dense else len(batch))
            shards.append(ShardInfo(shard_name(number, ""), len(batch), after))
            number, checksum = number + 1, after
    return shards


def _vectors(
    passages: list[Passage],
    rows: np.ndarray,
    embeddings: Embeddings,
    encoder: Encoder | None,
    batch_size: int,
    bar,
) -> np.ndarray:
    """A shard's vectors: stored ones for old rows, the encoder's for new passages."""
    out = np.empty((len(passages), embeddings.dim), dtype=np.float32)  # (n, dim)
    old = rows >= 0
    if old.any():
        out[old] = embeddings.take(rows[old])
    if not old.all():
        assert encoder is not None  # _new refused a dense index without one
        new = [p for p, is_old in zip(passages, old, strict=True) if not is_old]
        out[~old] = encode_shard(encoder, new, batch_size, bar.update)
    return out


def _search_structure(
    loaded: LoadedIndex, store: PassageStore, shards: list[ShardInfo], drop: np.ndarray
) -> tuple[str, dict[str, Any]]:
    """The next generation's search structure: the old one with the rows removed and the new
    vectors added where FAISS can remove them, else built again from the stored vectors / text."""
    old = loaded.manifest
    config = config_of(old)
    generation = old.generation + 1
    if loaded.dense is None:  # BM25
        return build_search(loaded.path, store, shards, config, None, generation)
    assert isinstance(config, IndexConfig)
    previous = None
    if not drop.size or config.kind in REMOVABLE_KINDS:
        previous = DenseIndex.load(
            loaded.path / old.index_file, loaded.dense.embeddings, config, mmap=False
        )
        if drop.size:
            previous.remove(drop)
    dim = loaded.dense.embeddings.dim
    return build_search(loaded.path, store, shards, config, dim, generation, previous)
