"""What the ``margin`` commands share: option types and the checks of what a user gave.

Apart from margin.cli so that its command groups in other modules (margin.cli_index,
margin.cli_retriever) can use them without importing margin.cli, which registers them.
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from margin.devices import DEVICE_HELP
from margin.errors import MarginError

KINDS = ("flat", "hnsw", "ivfpq", "hnswsq", "bm25")
Device = Annotated[str, typer.Option(help="Where the networks run: " + DEVICE_HELP)]
ChunkWords = Annotated[int, typer.Option(help="Most words in a passage (the paper's: 100).")]
ChunkOverlap = Annotated[int, typer.Option(help="Words a passage repeats from the one before.")]
Glob = Annotated[str | None, typer.Option(
    help="For a folder corpus: which files, e.g. '*.md' (default: .txt .md .html .htm .pdf).")]
Verbose = Annotated[bool, typer.Option("--verbose", help="List the files skipped.")]
ModelIndex = Annotated[str, typer.Option(
    help="Index directory, 'default', or 'auto': the index the model carries, else 'default'.")]


def check_at_least(name: str, value: int | None, least: int = 1) -> None:
    """Refuse a number the user gave below ``least``; None (the option unset) passes."""
    if value is not None and value < least:
        raise MarginError(f"{name} must be at least {least}, got {value}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse a value that is not one of ``choices``, naming them."""
    if value not in choices:
        raise MarginError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")


def check_passage_cache_mb(mb: float | None) -> None:
    """Refuse a passage KV cache size that is negative, nan or infinite (None: the default)."""
    if mb is not None and not 0 <= mb < math.inf:  # inf overflowed int() after the model loaded
        raise MarginError(f"--passage-cache-mb is {mb}; give 0 (off) or a number of MiB")
