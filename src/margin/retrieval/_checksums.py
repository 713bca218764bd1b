"""File checksums of an index directory: recorded in its manifest at build time, checked on open.

A byte flipped inside ``index.faiss``, an embeddings shard or a passage shard changes neither a
file's size nor, often, its structure: only a checksum of its bytes notices it. :func:`record`
hashes the files an index is made of (sha256 and size); :func:`problems` compares them with the
disk: sizes always (free), contents when asked (about 2 s per GB on a 2-core CPU; the costs are
measured in docs/retrieval.md). Paths are relative to the index directory and must stay inside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from margin.errors import MarginError


def inside(directory: Path, relative: str, source: Path) -> Path:
    """``directory / relative``, refused (naming ``source``) unless it resolves inside it."""
    path = directory / relative
    root = directory.resolve()
    resolved = path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise MarginError(
            f"{source} names {relative!r}, outside the index directory; rebuild the index"
        )
    return path


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record(directory: Path, relatives: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of the given files (a directory: every file in
    it), for the manifest."""
    files: dict[str, dict[str, Any]] = {}
    for relative in relatives:
        path = directory / relative
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                name = file.relative_to(directory).as_posix()
                files[name] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return files


def total_bytes(files: dict[str, dict[str, Any]]) -> int:
    """What hashing every recorded file reads."""
    return sum(int(f["bytes"]) for f in files.values())


def problems(directory: Path, files: dict[str, dict[str, Any]], contents: bool) -> list[str]:
    """One line per recorded file that is missing, of another size or (``contents``) whose
    sha256 differs. Empty when everything matches."""
    found = []
    for relative, want in files.items():
        path = directory / relative
        if not path.is_file():
            found.append(f"{path} is missing")
        elif (size := path.stat().st_size) != int(want["bytes"]):
            found.append(f"{path} has {size} bytes, manifest.json says {want['bytes']}")
        elif contents and sha256_file(path) != want["sha256"]:
            found.append(f"{path} does not match its sha256 in manifest.json (corrupt or changed)")
    return found
