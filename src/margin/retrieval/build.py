"""Writing an index directory: build (resumable) and append; :mod:`margin.retrieval.reader`
opens (validated) and verifies one.

Encoding 21M passages takes hours (Sec. 3), so a build must survive being killed. The corpus is
streamed in shards of ``shard_size`` passages; each shard's passages (Arrow) and embeddings
(``.npy``) are written atomically into a work directory ``.<name>.building/`` next to the target,
together with the build plan. Run the same build again and finished shards whose content still
matches the corpus are kept; the result is the same index an uninterrupted build gives. Only when
everything is written does the manifest appear, and the work directory is renamed to its final
name, so a directory never looks like a valid index before it is one::

    DIR/manifest.json            written last: what the index is, see Manifest
    DIR/passages/shard-*.arrow   the passage text (store.PassageStore)
    DIR/embeddings/shard-*.npy   float32 (n_shard, dim) passage vectors d(z) (dense kinds)
    DIR/index.faiss | DIR/bm25/  the search structure (index.DenseIndex | bm25.BM25Index)

The encoder is frozen with the index (Sec. 2.4: "we keep the document encoder fixed"); the
manifest records its fingerprint so a query encoder from another model is refused.

>>> build_index("corpus.jsonl", encoder, "wiki-index", kind="hnsw")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from margin._io import atomic_path, check_out_dir, write_json_atomic
from margin.errors import MarginError
from margin.retrieval import _checksums
from margin.retrieval.bm25 import BM25Config, BM25Index
from margin.retrieval.index import DenseIndex, Embeddings, IndexConfig
from margin.retrieval.manifest import (
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    Encoder,
    Manifest,
    ShardInfo,
    config_of,
    work_dir,
)
from margin.retrieval.passages import Passage, read_corpus
from margin.retrieval.reader import ensure_encoder_matches, open_index
from margin.retrieval.store import (
    EMPTY_CHECKSUM,
    PassageStore,
    chain_checksum,
    shard_name,
    write_shard,
)

PLAN = "plan.json"  # the build plan inside a work directory
DEFAULT_SHARD_SIZE = 100_000  # passages per shard: the unit of resumption and of appending
ENCODE_CHUNK = 2048  # passages per encode call: the progress bar's step (sorting by length within)

log = logging.getLogger("margin")


# ----------------------------------------------------------------------------- build


def build_index(
    corpus: str | Path | Iterable[Passage],
    encoder: Encoder | None,
    out: str | Path,
    kind: str | None = None,
    config: IndexConfig | BM25Config | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int = 64,
    source: str | Path | None = None,
    document_folders: dict[str, dict[str, Any]] | None = None,
) -> Manifest:
    """Build an index directory ``out`` from ``corpus``; resume an interrupted build of it.

    corpus: a path for :func:`margin.retrieval.passages.read_corpus` (or ``"default"``), or
    passages.
    encoder: encodes passages for dense kinds; None for ``kind="bm25"``.
    kind: "flat", "hnsw", "ivfpq" or "bm25"; defaults to ``config``'s kind, else "flat".
    source: the folder or file that ``corpus``, given as passages, was read from (the CLI reads
        it first, with its chunking): recorded as the manifest's ``corpus``.
    document_folders: how the folders of documents among the corpus were read, recorded for
        ``margin index sync`` (:func:`margin.retrieval.sync.reading_record`).
    """
    out, config, work = prepare_build(
        corpus, encoder, out, kind, config, shard_size, overwrite, source, document_folders
    )
    try:
        passages = read_corpus(corpus) if isinstance(corpus, str | Path) else iter(corpus)
        shards = _write_shards(
            work, passages, encoder, 0, EMPTY_CHECKSUM, shard_size, batch_size, progress, True
        )
        return finish_build(work, out, shards, config, encoder, shard_size)
    except BaseException:
        discard_if_unstarted(work)
        raise


def prepare_build(
    corpus: str | Path | Iterable[Passage],
    encoder: Encoder | None,
    out: str | Path,
    kind: str | None,
    config: IndexConfig | BM25Config | None,
    shard_size: int,
    overwrite: bool,
    source: str | Path | None = None,
    document_folders: dict[str, dict[str, Any]] | None = None,
) -> tuple[Path, IndexConfig | BM25Config, Path]:
    """Check a build request and create (or resume) its work directory: (out, config, work).

    Shared by :func:`build_index` and the Ray build (margin.retrieval.distributed): the same plan,
    so either
    can resume a build the other started.
    """
    out = Path(out)
    config = _resolve_config(kind, config)
    kind = _kind_of(config)
    if kind != "bm25" and encoder is None:
        raise MarginError(f"a '{kind}' index needs an encoder; pass one (or use kind='bm25')")
    if shard_size < 1:
        raise MarginError(f"shard_size must be >= 1, got {shard_size}")
    check_out_dir(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise MarginError(
            f"{out} is not a margin index (no {MANIFEST}) and not empty: it is never overwritten; "
            "pick another path or empty it"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MarginError(
            f"{out} already exists (an index); replace it with --overwrite (overwrite=True) or "
            "pick another path"
        )
    work = work_dir(out)
    plan = {
        "corpus": _corpus_source(corpus if source is None else source),
        "encoder": None if encoder is None else encoder.fingerprint,
        "kind": kind,
        "config": asdict(config),
        "shard_size": shard_size,
        "format_version": FORMAT_VERSION,
        "document_folders": document_folders,
    }
    _prepare_work_dir(work, plan, dense=encoder is not None)
    return out, config, work


def finish_build(
    work: Path,
    out: Path,
    shards: list[ShardInfo],
    config: IndexConfig | BM25Config,
    encoder: Encoder | None,
    shard_size: int,
) -> Manifest:
    """Once every shard is in ``work``: build the search structure, write the manifest last,
    and rename the work directory to ``out``."""
    for stale in _numbered_files(work, first=len(shards)):  # left by a longer earlier corpus
        stale.unlink()
    if not shards:
        raise MarginError("the corpus has no passages; nothing to index")

    store = PassageStore.open(work / "passages", [f"{s.name}.arrow" for s in shards])
    check_unique_ids(store)
    dim = None if encoder is None else encoder.dim
    index_file, params = build_search(work, store, shards, config, dim, generation=0)
    plan = json.loads((work / PLAN).read_text(encoding="utf-8"))
    corpus = plan["corpus"]
    now = _now()
    kind = _kind_of(config)
    manifest = Manifest(
        kind=kind,
        passages=len(store),
        corpus_checksum=store.checksum(),
        shards=shards,
        index_params=params,
        index_file=index_file,
        encoder=_encoder_record(encoder),
        shard_size=shard_size,
        created_at=now,
        updated_at=now,
        margin_version=_margin_version(),
        corpus=None if corpus == "<passages>" else corpus,
        document_folders=plan.get("document_folders"),
    )
    manifest = replace(manifest, files=_checksums.record(work, manifest.own_files()))
    write_json_atomic(work / MANIFEST, manifest.to_json())
    os.remove(work / PLAN)
    _move_into_place(work, out)
    return replace(manifest, path=out)


def discard_if_unstarted(work: Path) -> None:
    """After a failed build: remove its work directory if no shard was finished (nothing to
    resume), so a typo in a path leaves no ``.OUT.building/`` behind."""
    last_written = "embeddings" if (work / "embeddings").is_dir() else "passages"
    if not any((work / last_written).glob("shard-*")):
        _remove(work)


def iter_shards(
    passages: Iterator[Passage], shard_size: int, first: int = 0, checksum: str = EMPTY_CHECKSUM
) -> Iterator[tuple[int, list[Passage], str, str]]:
    """Cut a passage stream into shards: (number, passages, checksum before, checksum after).

    Only one shard's passages are in memory at a time: this is what bounds ingestion memory.
    """
    for number in itertools.count(first):
        batch = list(itertools.islice(passages, shard_size))
        if not batch:
            return
        after = chain_checksum(batch, checksum)
        yield number, batch, checksum, after
        checksum = after


def shard_paths(work: Path, number: int) -> tuple[Path, Path]:
    """The passage and embedding files of shard ``number`` in an index (or work) directory."""
    name = shard_name(number, "")
    return work / "passages" / f"{name}.arrow", work / "embeddings" / f"{name}.npy"


def _write_shards(
    work: Path,
    passages: Iterator[Passage],
    encoder: Encoder | None,
    first: int,
    checksum: str,
    shard_size: int,
    batch_size: int,
    progress: bool,
    resume: bool,
) -> list[ShardInfo]:
    """Stream passages into shards ``first``, ``first + 1``, ...; keep finished ones if resuming."""
    from tqdm import tqdm

    shards: list[ShardInfo] = []
    kept = 0
    with tqdm(desc="indexing", unit=" passages", disable=not progress, dynamic_ncols=True) as bar:
        for number, batch, before, after in iter_shards(passages, shard_size, first, checksum):
            arrow, npy = shard_paths(work, number)
            if resume and shard_done(arrow, npy if encoder else None, before, after, len(batch)):
                kept += 1
                bar.update(len(batch))
            else:
                npy.unlink(missing_ok=True)  # its passages are about to change
                write_shard(arrow, batch, before)
                if encoder is None:
                    bar.update(len(batch))
                else:  # the bar moves as chunks are encoded, not once per (100k) shard
                    save_npy(npy, encode_shard(encoder, batch, batch_size, bar.update))
            shards.append(ShardInfo(shard_name(number, ""), len(batch), after))
    if kept:
        log.info("reused %d finished shard(s) from the interrupted build in %s", kept, work)
    return shards


def shard_done(arrow: Path, npy: Path | None, before: str, after: str, rows: int) -> bool:
    """Is this shard already written, for exactly these passages (and their embeddings)?"""
    try:
        store = PassageStore.open(arrow.parent, [arrow.name], start=before)
        if store.checksum() != after or len(store) != rows:
            return False
        return npy is None or len(np.load(npy, mmap_mode="r", allow_pickle=False)) == rows
    except (MarginError, OSError, ValueError, EOFError):
        return False


def encode_shard(
    encoder: Encoder,
    batch: Sequence[Passage],
    batch_size: int,
    done: Callable[[int], object] = lambda n: None,
) -> np.ndarray:
    """Encode a shard in chunks of ENCODE_CHUNK passages, reporting each chunk to ``done``."""
    parts = []
    for start in range(0, len(batch), ENCODE_CHUNK):
        chunk = batch[start : start + ENCODE_CHUNK]
        parts.append(encoder.encode_passages(chunk, batch_size=batch_size, progress=False))
        done(len(chunk))
    vectors = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)  # (n, dim)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(batch), encoder.dim):
        raise MarginError(
            f"the encoder returned vectors of shape {vectors.shape} for {len(batch)} passages, "
            f"expected ({len(batch)}, {encoder.dim}); check the encoder's dim"
        )
    return vectors


def build_search(
    work: Path,
    store: PassageStore,
    shards: list[ShardInfo],
    config: IndexConfig | BM25Config,
    dim: int | None,
    generation: int,
    previous: DenseIndex | None = None,
) -> tuple[str, dict[str, Any]]:
    """Build (or extend ``previous``) and save the search structure over ``shards`` (their
    ``dim``-wide embeddings; None for BM25); return (file, params)."""
    suffix = "" if generation == 0 else f"-{generation}"
    if isinstance(config, BM25Config):
        name = f"bm25{suffix}"
        BM25Index.build(store, config).save(work / name)
        return name, asdict(config)
    assert dim is not None
    embeddings = Embeddings.open([work / "embeddings" / f"{s.name}.npy" for s in shards], dim)
    if previous is None:
        dense = DenseIndex.build(embeddings, config)
    else:
        dense = previous
        dense.add(embeddings)
    name = f"index{suffix}.faiss"
    dense.save(work / name)
    return name, asdict(dense.config)


# ----------------------------------------------------------------------------- add


def add_to_index(
    directory: str | Path,
    corpus: str | Path | Iterable[Passage],
    encoder: Encoder | None = None,
    progress: bool = True,
    batch_size: int = 64,
    document_folders: dict[str, dict[str, Any]] | None = None,
) -> Manifest:
    """Append passages as new shard(s) without re-encoding the old ones; return the new manifest.

    New files are written first and the manifest is swapped last, so a crash leaves the old
    index valid. Dense kinds add the new vectors to the existing FAISS index (IVF-PQ keeps its
    trained quantisers); BM25 is rebuilt over all passages (cheap). Ids must stay unique.
    document_folders: as :func:`build_index`'s, merged into the recorded ones.
    """
    directory = Path(directory)
    loaded = open_index(directory, mmap=True)
    old = loaded.manifest
    if old.kind != "bm25":
        if encoder is None:
            raise MarginError(f"{directory} is a dense index; pass its encoder to add passages")
        ensure_encoder_matches(old, encoder)
    else:
        encoder = None
    remove_unreferenced(directory, old)

    passages = read_corpus(corpus) if isinstance(corpus, str | Path) else iter(corpus)
    checked = _refuse_known_ids(passages, loaded.store, directory)
    new = _write_shards(
        directory,
        checked,
        encoder,
        next_shard_number(old),
        old.corpus_checksum,
        old.shard_size,
        batch_size,
        progress,
        resume=False,
    )
    if not new:
        raise MarginError("no passages to add")
    shards = [*old.shards, *new]
    store = PassageStore.open(directory / "passages", [f"{s.name}.arrow" for s in shards])
    check_unique_ids(store)
    generation = old.generation + 1
    if old.kind == "bm25":
        config = config_of(old)
        previous = None
    else:
        config = config_of(old)
        assert loaded.dense is not None
        previous = DenseIndex.load(
            directory / old.index_file, loaded.dense.embeddings, config, mmap=False
        )
    dim = None if encoder is None else encoder.dim
    index_file, params = build_search(directory, store, shards, config, dim, generation, previous)
    folders = {**(old.document_folders or {}), **(document_folders or {})} or None
    return commit(directory, old, store, shards, index_file, params, folders)


def commit(
    directory: Path,
    old: Manifest,
    store: PassageStore,
    shards: list[ShardInfo],
    index_file: str,
    params: dict[str, Any],
    document_folders: dict[str, dict[str, Any]] | None,
) -> Manifest:
    """Make the files written beside an index's (by :func:`add_to_index` or a sync) its next
    generation: the new manifest is written last, atomically, and is the moment the index
    changes (a crash before it leaves the old index whole); then the files it no longer names
    are removed. A shard file is never rewritten under its name, so the checksums recorded for
    the shards both manifests name carry over; the new files are hashed."""
    manifest = replace(
        old,
        passages=len(store),
        corpus_checksum=store.checksum(),
        shards=shards,
        index_params=params,
        index_file=index_file,
        updated_at=_now(),
        generation=old.generation + 1,
        margin_version=_margin_version(),
        document_folders=document_folders,
    )
    both = set(old.own_files()[:-1]) & set(manifest.own_files()[:-1])
    kept = {k: v for k, v in (old.files or {}).items() if k in both}
    new_files = [f for f in manifest.own_files() if f not in kept]
    manifest = replace(manifest, files={**kept, **_checksums.record(directory, new_files)})
    write_json_atomic(directory / MANIFEST, manifest.to_json())
    remove_unreferenced(directory, manifest)
    return manifest


def _refuse_known_ids(
    passages: Iterable[Passage], store: PassageStore, directory: Path
) -> Iterator[Passage]:
    """Pass passages through, shard-sized chunk by chunk, refusing ids the store already has."""
    iterator = iter(passages)
    while chunk := list(itertools.islice(iterator, 10_000)):
        rows = store.row_of([p.id for p in chunk])
        if (rows >= 0).any():
            clash = chunk[int(np.argmax(rows >= 0))].id
            raise MarginError(
                f"passage id '{clash}' is already in the index {directory}; give the new "
                "documents other ids (or leave the ids out)"
            )
        yield from chunk


# ----------------------------------------------------------------------------- helpers


def _resolve_config(kind: str | None, config: IndexConfig | BM25Config | None):
    if kind is not None and kind not in KINDS:
        raise MarginError(f"unknown index kind '{kind}'; use one of {', '.join(KINDS)}")
    if config is None:
        kind = kind or "flat"
        return BM25Config() if kind == "bm25" else IndexConfig(kind=kind)
    if kind is not None and kind != _kind_of(config):
        raise MarginError(
            f"kind='{kind}' but the config is for '{_kind_of(config)}'; pass one or make them agree"
        )
    if _kind_of(config) not in KINDS:
        raise MarginError(f"unknown index kind '{_kind_of(config)}'; use one of {', '.join(KINDS)}")
    return config


def _kind_of(config: IndexConfig | BM25Config) -> str:
    return "bm25" if isinstance(config, BM25Config) else config.kind


def _corpus_source(corpus: str | Path | Iterable[Passage]) -> str:
    """How the plan names the corpus: "default", its absolute path, or "<passages>"."""
    if str(corpus) == "default":
        return "default"
    if isinstance(corpus, str | Path):
        return str(Path(corpus).expanduser().resolve())
    return "<passages>"


def _prepare_work_dir(work: Path, plan: dict[str, Any], dense: bool) -> None:
    """Create the work directory, or keep an earlier one built to the same plan."""
    if work.exists():
        try:
            earlier = json.loads((work / PLAN).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if earlier == plan:
            log.warning("resuming the interrupted build in %s", work)
        else:
            changed = [k for k in plan if earlier is None or earlier.get(k) != plan[k]]
            log.warning(
                "discarding the unfinished build in %s: it was for another %s; starting afresh",
                work,
                "/".join(changed) or "plan",
            )
            shutil.rmtree(work)
    for sub in ("passages", "embeddings") if dense else ("passages",):
        (work / sub).mkdir(parents=True, exist_ok=True)
        for tmp in (work / sub).glob(".*.tmp"):  # half-written files of a killed build
            _remove(tmp)
    write_json_atomic(work / PLAN, plan)


def _numbered_files(directory: Path, first: int) -> list[Path]:
    """Shard files numbered ``first`` or more in passages/ and embeddings/."""
    found = []
    for sub in ("passages", "embeddings"):
        for path in (directory / sub).glob("shard-*"):
            number = path.name.split(".")[0].removeprefix("shard-")
            if number.isdigit() and int(number) >= first:
                found.append(path)
    return found


def next_shard_number(manifest: Manifest) -> int:
    """The number of the next new shard of an index: one past the highest it names (after a
    sync rewrote shards, the names are not 0, 1, 2, ... any more)."""
    numbers = [int(s.name.removeprefix("shard-")) for s in manifest.shards]
    return max(numbers, default=-1) + 1


def remove_unreferenced(directory: Path, manifest: Manifest) -> None:
    """Delete the shard and search-structure files of an index directory that its manifest does
    not name: left by an add or a sync that crashed before its manifest swap, or replaced by one
    that finished. (A server that still has them open keeps reading them until it lets go.)"""
    named = set(manifest.own_files())
    found = [*_numbered_files(directory, first=0), *directory.glob("index*.faiss"),
             *directory.glob("bm25*")]
    for path in found:
        if path.relative_to(directory).as_posix() not in named:
            _remove(path)


def check_unique_ids(store: PassageStore) -> None:
    duplicate = store.duplicate_id()
    if duplicate is not None:
        raise MarginError(
            f"passage id '{duplicate}' occurs more than once in the corpus; make the ids "
            "unique (documents without an id get a hash of title and text: drop duplicates)"
        )


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished work directory to ``out`` (replacing an old index if allowed)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        _remove(old)
        os.replace(out, old)
        os.replace(work, out)
        _remove(old)
    else:
        os.replace(work, out)


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically (through a file object, so numpy does not append '.npy')."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())


def _encoder_record(encoder: Encoder | None) -> dict[str, Any] | None:
    if encoder is None:
        return None
    return {"spec": encoder.spec, "fingerprint": encoder.fingerprint, "dim": int(encoder.dim)}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _margin_version() -> str:
    import margin

    return margin.__version__
