"""Sparse retrieval: BM25 over the passage store, the paper's word-overlap baseline (Table 6).

RAG's ablations swap the dense retriever for BM25 (Sec. 4.6, Table 6: better on FEVER, worse
elsewhere). This wraps ``bm25s``: each passage is indexed as ``title + " " + text``, lower-cased,
split on word characters, English stop words removed. It answers the same way as the dense index
(query strings in, :class:`SearchResult` out) and is saved with bm25s's own format (JSON params
and vocabulary, ``.npy`` sparse matrices), loaded memory-mapped. Never pickled.

Scoring is bm25s's (Lucene variant by default):
score(q, d) = Σ_{t ∈ q} IDF(t) · tf(t,d)·(k1 + 1) / (tf(t,d) + k1·(1 − b + b·|d| / avgdl)).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from margin._io import atomic_path
from margin.errors import MarginError
from margin.retrieval.index import SearchResult, _check_k
from margin.retrieval.store import PassageStore

_READ_ROWS = 10_000  # passages tokenised per batch while indexing


@dataclass(frozen=True)
class BM25Config:
    """BM25 parameters (bm25s names)."""

    k1: float = 1.5  # term-frequency saturation
    b: float = 0.75  # document-length normalisation
    method: str = "lucene"  # bm25s variant: "robertson", "lucene", "atire", "bm25l", "bm25+"
    stopwords: str = "en"  # stop-word list removed from passages and queries ("" for none)


class BM25Index:
    """BM25 over a :class:`PassageStore`; rows are the store's global rows.

    >>> bm25 = BM25Index.build(store)  # doctest: +SKIP
    >>> bm25.search(["who painted the mona lisa"], k=5).rows  # (1, 5)  # doctest: +SKIP
    """

    def __init__(self, retriever, config: BM25Config):
        self.retriever = retriever  # a bm25s.BM25
        self.config = config  # how it was built

    @classmethod
    def build(cls, store: PassageStore, config: BM25Config | None = None) -> BM25Index:
        """Tokenise every passage (title + text), batch by batch, and build the BM25 matrix."""
        import bm25s
        from bm25s.tokenization import Tokenizer

        config = config or BM25Config()
        if len(store) == 0:
            raise MarginError("cannot build a BM25 index over no passages")
        tokenizer = Tokenizer(stopwords=config.stopwords or None)
        token_ids: list[list[int]] = []
        for start in range(0, len(store), _READ_ROWS):
            rows = range(start, min(len(store), start + _READ_ROWS))
            texts = [f"{p.title} {p.text}" for p in store.get(rows)]
            token_ids.extend(tokenizer.streaming_tokenize(texts, update_vocab=True))
        retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        with _quiet():
            retriever.index((token_ids, tokenizer.get_vocab_dict()), show_progress=False)
        return cls(retriever, config)

    def __len__(self) -> int:
        return int(self.retriever.scores["num_docs"])

    def search(self, queries: Sequence[str], k: int) -> SearchResult:
        """Top-k passages by BM25 score for each query string -> (n, k) scores and rows."""
        import bm25s

        if isinstance(queries, str):
            raise MarginError("search takes a list of query strings, not one string; wrap it")
        _check_k(k, len(self))
        tokens = bm25s.tokenize(
            list(queries),
            stopwords=self.config.stopwords or None,
            return_ids=False,
            show_progress=False,
        )
        with _quiet():
            rows, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return SearchResult(np.asarray(scores, np.float32), np.asarray(rows, np.int64))

    def save(self, path: str | Path) -> None:
        """Write the index to the directory ``path`` atomically (bm25s's format, no pickle)."""
        import json

        with atomic_path(Path(path)) as tmp:
            with _quiet():
                self.retriever.save(str(tmp), show_progress=False)
            (tmp / "margin-bm25.json").write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> BM25Index:
        """Read an index written by :meth:`save`; ``mmap=True`` memory-maps its arrays."""
        import json

        import bm25s

        path = Path(path)
        if not (path / "margin-bm25.json").is_file():
            raise MarginError(f"{path} is not a saved BM25 index (or is incomplete); rebuild it")
        try:
            config = BM25Config(**json.loads((path / "margin-bm25.json").read_text()))
            with _quiet():
                retriever = bm25s.BM25.load(str(path), mmap=mmap, show_progress=False)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise MarginError(
                f"{path} is corrupt or truncated ({exc}); rebuild the index"
            ) from None
        return cls(retriever, config)


@contextlib.contextmanager
def _quiet():
    """Silence bm25s's logging and stray prints around a call."""
    logger = logging.getLogger("bm25s")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
