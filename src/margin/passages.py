"""Passages: the unit of RAG's non-parametric memory (Sec. 3: disjoint 100-word chunks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Passage:
    """One retrievable chunk of a document. ``source`` carries attribution (CC BY-SA text)."""

    id: str  # stable string id; a corpus id is kept, suffixed -1, -2, ... only when a document splits
    title: str  # title of the document the passage comes from
    text: str  # at most 100 words
    source: str = ""  # where the text comes from (URL or corpus name and licence)
