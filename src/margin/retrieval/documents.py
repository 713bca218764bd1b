"""Your own documents: a folder of text, Markdown, HTML and PDF files as RAG passages.

RAG's memory is any collection of documents split into passages (Sec. 3: "disjoint 100-word
chunks"); this module makes one out of a folder as it is. :func:`read_folder` walks the folder
(hidden files and folders skipped, files in sorted order, so the passages and their ids are the
same on every run), reads each file with a well-kept library and chunks its text with
:func:`margin.retrieval.passages.chunk_text`, preferring paragraph and sentence ends:

  ``.txt``            UTF-8 text; blank lines are paragraph ends
  ``.md``             markdown-it-py's tokens: headings, paragraphs, list items, code blocks
  ``.html``/``.htm``  Beautiful Soup; scripts, styles, navigation, headers, footers and asides
                      are dropped (they are on every page and answer nothing)
  ``.pdf``            pypdf's text, page by page; a passage never spans two pages

Each passage's title is the document's (HTML ``<title>``, the first Markdown heading, the PDF's
metadata title, else the file name), its ``source`` the file's path relative to the folder (with
``#page=N`` for a PDF), and its id that path and the passage's position in the file,
``guide/intro.md:3``: stable while the file is unchanged. Each passage also carries its file
(:class:`~margin.retrieval.passages.SourceFile`: path, size, mtime, sha256), which the passage
store records so a sync can tell which files changed.

A file that cannot be read (encrypted, corrupt, not UTF-8, no text) never stops a build: it is
skipped and appended to the caller's ``skipped`` list with the reason.

The readers are the optional ``docs`` extra (``pip install 'margin[docs]'``).

>>> passages = list(read_folder("~/notes"))  # doctest: +SKIP
>>> passages[0].id, passages[0].source  # doctest: +SKIP
('guide/intro.md:1', 'guide/intro.md')
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from margin.errors import MarginError
from margin.retrieval.passages import Chunking, Passage, SourceFile, chunk_text

SUPPORTED = (".txt", ".md", ".html", ".htm", ".pdf")  # the suffixes read by default
INSTALL = "pip install 'margin[docs]'"  # the extra holding the readers
DROPPED_HTML = ("script", "style", "noscript", "template", "nav", "aside", "form", "svg", "iframe")
HTML_BLOCKS = (
    "p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr",
    "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "figcaption", "br", "hr",
)  # elements whose ends are paragraph ends


@dataclass(frozen=True)
class SkippedFile:
    """A file of the folder that gave no passages, and why."""

    path: str  # relative to the folder
    reason: str  # e.g. "empty", "encrypted (needs a password)"


@dataclass(frozen=True)
class Document:
    """One file's text as read: its title and its parts (one per PDF page, else one)."""

    title: str  # the document's title
    parts: list[tuple[str, str]]  # (source, text) in reading order


class Unreadable(Exception):
    """A file the folder reader skips; the message is the reason."""


def read_folder(
    root: str | Path,
    chunking: Chunking | None = None,
    glob: str | None = None,
    skipped: list[SkippedFile] | None = None,
) -> Iterator[Passage]:
    """Passages of every supported file under ``root``, lazily, files in sorted path order.

    glob: a shell pattern (``fnmatch``) matched against each file's path relative to ``root``
    and against its name, ``*`` crossing folders: ``"*.md"`` is every Markdown file, anywhere;
    default: every file of a supported type.
    skipped: where files that give no passages are appended, with the reason.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MarginError(f"{root}: no such folder; check the corpus path")
    require_readers()
    files = walk(root, glob)
    return _passages(root, files, chunking or Chunking(), skipped)


def walk(root: Path, glob: str | None = None) -> list[str]:
    """Relative paths ('/'-separated) of the files under ``root`` to read, sorted; hidden files
    and folders (a name starting with '.') are left out."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # prunes the walk
        for name in names:
            if name.startswith("."):
                continue
            relative = Path(folder, name).relative_to(root).as_posix()
            if glob is None:
                chosen = Path(name).suffix.lower() in SUPPORTED
            else:
                chosen = fnmatch.fnmatchcase(relative, glob) or fnmatch.fnmatchcase(name, glob)
            if chosen:
                found.append(relative)
    return sorted(found)


def _passages(
    root: Path, files: list[str], chunking: Chunking, skipped: list[SkippedFile] | None
) -> Iterator[Passage]:
    count, bad = 0, []
    for passage in read_files(root, files, chunking, bad):
        count += 1
        yield passage
    if skipped is not None:
        skipped.extend(bad)
    if count == 0:
        why = f"; {len(bad)} skipped, e.g. {bad[0].path}: {bad[0].reason}" if bad else ""
        raise MarginError(
            f"{root}: no passages in {len(files)} file(s){why} "
            f"(read: {', '.join(SUPPORTED)}; --glob selects among the files)"
        )


def read_files(
    root: Path, files: list[str], chunking: Chunking, skipped: list[SkippedFile]
) -> Iterator[Passage]:
    """Passages of the given files of ``root`` (relative paths), file by file, each carrying
    its file's record; a file that gives none is appended to ``skipped`` with the reason."""
    from tqdm import tqdm

    folder = str(root.resolve())
    for relative in tqdm(files, desc="reading", unit=" files", leave=False, dynamic_ncols=True):
        path = root / relative
        try:
            stat = path.stat()
            data = path.read_bytes()
            file = SourceFile(
                folder, relative, len(data), stat.st_mtime_ns, hashlib.sha256(data).hexdigest()
            )
            passages = document_passages(read_document(data, relative), relative, chunking, file)
        except (Unreadable, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            skipped.append(SkippedFile(relative, reason))
            continue
        yield from passages


def document_passages(
    document: Document, relative: str, chunking: Chunking, file: SourceFile | None = None
) -> list[Passage]:
    """Chunk a document's parts; ids ``relative:1``, ``relative:2``, ... across its parts."""
    passages: list[Passage] = []
    for source, text in document.parts:
        for chunk in chunk_text(text, chunking, boundaries=True):
            id = f"{relative}:{len(passages) + 1}"
            passages.append(Passage(id, document.title, chunk, source, file))
    if not passages:
        raise Unreadable("no text")
    return passages


def read_document(data: bytes, relative: str) -> Document:
    """Read one file's bytes by its suffix; :class:`Unreadable` if it cannot be read."""
    suffix = Path(relative).suffix.lower()
    name = Path(relative).name
    if not data.strip():
        raise Unreadable("empty")
    if suffix == ".pdf":
        return read_pdf(data, relative, name)
    if suffix in (".html", ".htm"):
        return read_html(data, relative, name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start})") from None
    if suffix == ".md":
        return read_markdown(text, relative, name)
    if suffix == ".txt":
        return Document(name, [(relative, text)])
    raise Unreadable(f"unsupported type '{suffix}' (supported: {', '.join(SUPPORTED)})")


def read_markdown(text: str, source: str, name: str) -> Document:
    """Markdown by its structure (markdown-it-py, CommonMark): each block (heading, paragraph,
    list item, code block) is a paragraph; the first heading is the title. Raw HTML is dropped."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(text)
    title, blocks = None, []
    for i, token in enumerate(tokens):
        if token.type == "inline":
            block = _inline_text(token)
            if title is None and i > 0 and tokens[i - 1].type == "heading_open":
                title = block.strip()
            blocks.append(block)
        elif token.type in ("fence", "code_block"):
            blocks.append(token.content)
    return Document(title or name, [(source, "\n\n".join(blocks))])


def _inline_text(token) -> str:
    """The plain text of a markdown-it inline token: emphasis and link marks dropped, link
    text, code spans and image descriptions kept."""
    pieces = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            pieces.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            pieces.append("\n")
        elif child.type == "image":
            pieces.append(child.content)
    return "".join(pieces)


def read_html(data: bytes, source: str, name: str) -> Document:
    """HTML with Beautiful Soup (Python's own parser; the encoding from the page or guessed):
    the ``<title>`` is the title; scripts, styles, navigation, forms, asides, and headers and
    footers outside an article, are dropped; block elements end paragraphs."""
    from bs4 import BeautifulSoup

    with warnings.catch_warnings():  # bs4 warns on markup that looks like a file name or XML
        warnings.simplefilter("ignore")
        soup = BeautifulSoup(data, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup.find_all(["head", *DROPPED_HTML]):
        tag.decompose()
    for tag in soup.find_all(["header", "footer"]):
        if tag.find_parent(["article", "main"]) is None:  # page chrome, not an article's own
            tag.decompose()
    for tag in soup.find_all(attrs={"role": ["navigation", "banner", "contentinfo"]}):
        tag.decompose()
    for tag in soup.find_all(HTML_BLOCKS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    return Document(title or name, [(source, soup.get_text())])


def read_pdf(data: bytes, source: str, name: str) -> Document:
    """A PDF with pypdf, one part per page (source ``path#page=N``); the metadata title is the
    title. An encrypted PDF is read if its user password is empty, else skipped."""
    import pypdf
    from pypdf.errors import DependencyError

    pypdf_log = logging.getLogger("pypdf")
    level = pypdf_log.level
    pypdf_log.setLevel(logging.ERROR)  # it logs every repairable oddity; the skip says enough
    try:
        with warnings.catch_warnings():  # and warns on some
            warnings.simplefilter("ignore")
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise Unreadable("encrypted (needs a password)")
            title = str((reader.metadata or {}).get("/Title") or "").strip()
            pages = [(f"{source}#page={n}", page.extract_text() or "")
                     for n, page in enumerate(reader.pages, start=1)]
    except DependencyError:
        raise Unreadable("encrypted with AES (pip install cryptography to read it)") from None
    except Unreadable:
        raise
    except Exception as exc:  # a damaged PDF can fail anywhere in pypdf; it must not stop a build
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
        raise Unreadable(f"not a readable PDF ({first})") from None
    finally:
        pypdf_log.setLevel(level)
    return Document(title or name, pages)


def require_readers() -> None:
    """Fail with the install command when the ``docs`` extra is missing."""
    try:
        import bs4  # noqa: F401
        import markdown_it  # noqa: F401
        import pypdf  # noqa: F401
    except ImportError as exc:
        raise MarginError(f"reading a folder of documents needs {exc.name}: {INSTALL}") from None


def skipped_report(skipped: list[SkippedFile], verbose: bool = False) -> list[str]:
    """What ``margin index build``/``add`` print about skipped files: one summary line, then
    with ``verbose`` one line per file."""
    if not skipped:
        return []
    hint = "" if verbose else " (--verbose lists them)"
    plural = "s" if len(skipped) > 1 else ""
    lines = [f"skipped {len(skipped)} file{plural} that gave no text{hint}"]
    return lines + ([f"  {s.path}: {s.reason}" for s in skipped] if verbose else [])
