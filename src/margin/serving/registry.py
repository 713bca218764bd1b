"""The index registry: several loaded indexes over one model, and which one is active.

The paper's index hot-swapping (Sec. 4.5) replaces the non-parametric memory and the model's
knowledge changes with no retraining. In the service the registry holds each loaded index as an
``IndexEntry`` (a view of the served model with that index as its retriever, the generator and
question encoder shared) and switching the active one is a single reference swap: a request reads
``registry.active`` once, when it arrives, and carries that entry to its end. Every entry is named
by its id and version (a hash of its manifest), which every response repeats.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from margin.errors import MarginError
from margin.rag import RAG
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever, resolve_index
from margin.serving.http_errors import ApiError

INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # registered index ids


@dataclass(frozen=True, eq=False)
class IndexEntry:
    """One loaded index and the model view that answers over it (compared by identity)."""

    id: str  # the name it is registered under
    version: str  # sha256 of its manifest (16 hex digits): changes whenever the index does
    path: Path  # its directory
    manifest: dict[str, Any]  # its manifest.json
    rag: RAG  # the served model with this index as its retriever (generator shared)

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "version": self.version}


def manifest_version(manifest: dict[str, Any]) -> str:
    """The version of an index: a hash of its manifest (corpus checksum, files, generation)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def open_entry(rag: RAG, name: str, directory: Path, fingerprint: str | None) -> IndexEntry:
    """Load ``directory`` as an index for ``rag``'s question encoder.

    ``fingerprint``: the passage encoder every served index must share (the one the model's
    question encoder was trained against); an index built with another is refused.
    """
    loaded = open_index(directory)
    if loaded.dense is None:
        retriever = Retriever(loaded, None)
    else:
        built = loaded.manifest.encoder["fingerprint"]  # type: ignore[index]
        if fingerprint is not None and built != fingerprint:
            raise MarginError(
                f"index {directory} was built with passage encoder sha256 {built[:12]}, the "
                f"served model needs {fingerprint[:12]}; build it with the model's encoder"
            )
        retriever = Retriever(loaded, rag.question_encoder, check=fingerprint is None)
    return _entry(rag, name, retriever)


def _entry(rag: RAG, name: str, retriever: Retriever) -> IndexEntry:
    view = rag.with_retriever(retriever)  # shares the generator, question encoder and settings
    manifest = retriever.index.manifest.to_json()
    return IndexEntry(name, manifest_version(manifest), retriever.index.path, manifest, view)


class IndexRegistry:
    """Registered indexes and which one is active; switching is one reference swap."""

    def __init__(self) -> None:
        self._entries: dict[str, IndexEntry] = {}
        self._active: IndexEntry | None = None
        self._lock = threading.Lock()

    def add(self, entry: IndexEntry) -> None:
        with self._lock:
            if entry.id in self._entries:
                raise ApiError(409, f"index {entry.id!r} is already registered", "name")
            self._entries[entry.id] = entry
            if self._active is None:
                self._active = entry

    @property
    def active(self) -> IndexEntry:
        entry = self._active  # one read: a request keeps this entry to its end
        assert entry is not None, "the registry is empty"
        return entry

    def switch(self, name: str) -> IndexEntry:
        with self._lock:
            if name not in self._entries:
                raise ApiError(404, f"unknown index {name!r}; see GET /v1/indexes", "index")
            self._active = self._entries[name]
            return self._active

    def entries(self) -> list[IndexEntry]:
        with self._lock:
            return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def start_registry(rag: RAG, indexes: Mapping[str, str | Path] | None) -> IndexRegistry:
    registry = IndexRegistry()
    if not indexes:
        if rag.retriever is None:
            raise MarginError("the model has no index; give indexes to serve (--index DIR)")
        registry.add(_entry(rag, "default", rag.retriever))
        return registry
    fingerprint = encoder_fingerprint(rag)
    own = rag.retriever.index.path.resolve() if rag.retriever is not None else None
    for name, directory in indexes.items():
        if not INDEX_NAME.match(name):
            raise MarginError(f"index name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        path = resolve_index(directory)
        if own is not None and path.resolve() == own:
            registry.add(_entry(rag, name, rag.retriever))  # type: ignore[arg-type]
        else:
            registry.add(open_entry(rag, name, path, fingerprint))
    return registry


def encoder_fingerprint(rag: RAG) -> str | None:
    """The passage encoder the model's indexes must be built with, if known."""
    if rag.retriever is not None and rag.retriever.index.manifest.encoder:
        return rag.retriever.index.manifest.encoder["fingerprint"]
    return rag.config.index_encoder_fingerprint
