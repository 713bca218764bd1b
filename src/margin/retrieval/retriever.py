"""The retriever p_eta(z|x) of RAG (Sec. 2.2): a question encoder over an index of passages.

Retrieval is maximum inner product search outside autograd. The hits' stored passage vectors come
back with them so that a RAG model can recompute the document scores d(z)ᵀq(x) in torch and the
question encoder still receives gradient (Sec. 2.4). A BM25 index (the paper's Table 6 ablation)
is searched with the question strings instead, through the same interface.

    >>> retriever = Retriever.load("default")                      # doctest: +SKIP
    >>> hits = retriever.retrieve(["Who painted the Mona Lisa?"], k=5)  # doctest: +SKIP
    >>> hits.passages[0][0].title                                  # doctest: +SKIP
    'Mona Lisa'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from margin.assets import margin_home
from margin.devices import resolve_device
from margin.errors import MarginError
from margin.retrieval.build import build_index
from margin.retrieval.encoders import Encoder, load_encoder, load_encoder_from_spec
from margin.retrieval.passages import Passage
from margin.retrieval.reader import (
    LoadedIndex,
    ensure_encoder_matches,
    ensure_query_encoder_matches,
    open_index,
)

DEFAULT_INDEX_NAME = "default-minilm-flat"  # cache folder of the default index under $MARGIN_HOME
DEFAULT_BM25_NAME = "default-bm25"  # cache folder of the default corpus's BM25 index, beside it


@dataclass
class Retrieved:
    """Top-k passages for a batch of questions, best first."""

    passages: list[list[Passage]]  # (n_questions, k)
    scores: np.ndarray  # (n_questions, k) float32 inner products (BM25 scores for BM25)
    rows: np.ndarray  # (n_questions, k) int64 rows in the index's passage store
    vectors: np.ndarray | None  # (n_questions, k, dim) stored passage vectors; None for BM25


class RetrieverProtocol(Protocol):
    """What a RAG model asks of its retriever.

    :class:`Retriever` (an index opened in this process) and
    :class:`margin.retrieval.sharded.RemoteRetriever` (a shared Ray actor's) are both one, so
    either can be given to :class:`margin.rag.RAG` or :meth:`margin.rag.RAG.with_retriever`.
    """

    encoder: Any  # the question encoder that embeds questions for search (None: BM25)

    @property
    def kind(self) -> str:
        """The index kind: flat, hnsw, ivfpq or bm25 ("dense" for a remote one)."""
        ...

    @property
    def index_encoder(self) -> dict | None:
        """The manifest's record of the index's passage encoder (None: BM25)."""
        ...

    def __len__(self) -> int: ...

    def retrieve(
        self, questions: Sequence[str], k: int = 5, with_vectors: bool = False
    ) -> Retrieved:
        """Top-k passages for each question string."""
        ...

    def retrieve_by_vector(
        self, query_vectors: np.ndarray, k: int = 5, with_vectors: bool = False
    ) -> Retrieved:
        """Top-k passages for question vectors (n, dim) already computed."""
        ...


def default_index_dir() -> Path:
    """Where the default index (default corpus, default encoder, exact search) is cached."""
    return margin_home() / "indexes" / DEFAULT_INDEX_NAME


def ensure_default_index(progress: bool = True, device: str = "cpu") -> Path:
    """Build the default index on first use (resuming an interrupted build) and return its path;
    ``device`` encodes the passages (a GPU takes seconds)."""
    out = default_index_dir()
    if not (out / "manifest.json").exists():
        encoder = load_encoder("default", role="passage", device=device)
        build_index("default", encoder, out, kind="flat", progress=progress)
    return out


def ensure_default_bm25_index(progress: bool = True) -> Path:
    """Build a BM25 index of the default corpus on first use (seconds) and return its path.

    The paper's retriever ablation (Table 6) swaps the dense retriever for BM25 over the same
    passages; this is that index for the default corpus, cached next to the dense one.
    """
    out = margin_home() / "indexes" / DEFAULT_BM25_NAME
    if not (out / "manifest.json").exists():
        build_index("default", None, out, kind="bm25", progress=progress)
    return out


def resolve_index(index: str | Path, progress: bool = True, device: str = "cpu") -> Path:
    """``"default"`` means the cached default index (built if missing, its passages encoded on
    ``device``); anything else is a path."""
    if str(index) == "default":
        return ensure_default_index(progress=progress, device=device)
    return Path(index)


class Retriever:
    """Question encoder + index + passage store -> top-k passages with scores, batched."""

    def __init__(self, index: LoadedIndex, encoder: Encoder | None = None, check: bool = True):
        self.index = index
        self.encoder = encoder
        if index.dense is not None:
            if encoder is None:
                raise MarginError(f"{index.path} is a dense index; give a question encoder")
            if check and _symmetric(index):
                ensure_encoder_matches(index.manifest, encoder)
            elif encoder.dim != int(index.manifest.encoder["dim"]):  # type: ignore[index]
                raise MarginError(
                    f"the question encoder gives {encoder.dim}-d vectors but index {index.path} "
                    f"holds {index.manifest.encoder['dim']}-d ones; "  # type: ignore[index]
                    "use the question encoder that goes with the index's passage encoder"
                )

    @classmethod
    def load(
        cls,
        index: str | Path = "default",
        query_encoder: str | Path | Encoder | None = None,
        progress: bool = True,
        device: str = "cpu",
        allow_encoder_mismatch: bool = False,
    ) -> Retriever:
        """Open an index and the question encoder that goes with it.

        index: a directory, or ``"default"`` (built and cached on first use).
        query_encoder: an Encoder, a model name/directory, or None to reuse the index's own
            encoder (right for sentence-transformers and plain HF encoders, which embed questions
            and passages alike; a DPR context-encoder index needs its DPR question encoder named).
        device: where a question encoder loaded here runs (margin.devices; the index stays in
            FAISS on the CPU). A given Encoder stays where it is.
        allow_encoder_mismatch: search even with a question encoder that was not made for the
            index (other weights than its passage encoder; see ensure_query_encoder_matches).
        """
        device = str(resolve_device(device))
        loaded = open_index(resolve_index(index, progress=progress, device=device))
        if loaded.dense is None:
            return cls(loaded, None)
        if isinstance(query_encoder, Encoder):
            encoder = query_encoder
        elif query_encoder is not None:
            encoder = load_encoder(query_encoder, role="question", device=device)
        elif not _symmetric(loaded):
            raise MarginError(
                f"index {loaded.path} was built with a DPR context encoder; name its question "
                "encoder (e.g. --query-encoder facebook/dpr-question_encoder-single-nq-base)"
            )
        else:  # the index's own model: its weights may have been replaced since the build
            spec = dict(loaded.manifest.encoder["spec"])  # type: ignore[index]
            spec["role"] = "question"
            encoder = load_encoder_from_spec(spec, device=device)
        if not allow_encoder_mismatch:
            ensure_query_encoder_matches(loaded.manifest, encoder)
        return cls(loaded, encoder)

    @property
    def kind(self) -> str:
        """The index kind: flat, hnsw, ivfpq or bm25."""
        return self.index.manifest.kind

    @property
    def index_encoder(self) -> dict | None:
        """The manifest's record of the passage encoder the index was built with (None: BM25)."""
        return self.index.manifest.encoder

    def __len__(self) -> int:
        return self.index.manifest.passages

    def retrieve(
        self, questions: Sequence[str], k: int = 5, with_vectors: bool = False
    ) -> Retrieved:
        """Top-k passages for each question. ``with_vectors`` also returns the hits' vectors."""
        questions = check_questions(questions)
        if self.index.dense is None:
            return self._collect(self.index.search(questions, self._check_k(k)), False)
        assert self.encoder is not None
        return self.retrieve_by_vector(self.encoder.encode_queries(questions), k, with_vectors)

    def retrieve_by_vector(
        self, query_vectors: np.ndarray, k: int = 5, with_vectors: bool = False
    ) -> Retrieved:
        """Top-k passages for question vectors already computed (e.g. in a RAG forward pass)."""
        if self.index.dense is None:
            raise MarginError(f"{self.index.path} is a BM25 index: retrieve with question strings")
        query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)  # (n, dim)
        return self._collect(self.index.search(query_vectors, self._check_k(k)), with_vectors)

    def _collect(self, result, with_vectors: bool) -> Retrieved:
        rows = result.rows  # (n, k)
        if (rows < 0).any():
            raise MarginError(
                f"the index found fewer passages than asked for; lower k "
                f"(the index holds {len(self)})"
            )
        vectors = None
        if with_vectors and self.index.dense is not None:
            vectors = self.index.dense.vectors(rows)  # (n, k, dim)
        return Retrieved(self.index.passages(result), result.scores, rows, vectors)

    def _check_k(self, k: int) -> int:
        if k < 1:
            raise MarginError(f"k must be at least 1, got {k}")
        if k > len(self):
            raise MarginError(f"k={k} is larger than the index ({len(self)} passages); lower k")
        return k


def _symmetric(index: LoadedIndex) -> bool:
    """Whether the index's encoder also embeds questions (anything but a DPR context encoder)."""
    encoder = index.manifest.encoder or {}
    return encoder.get("spec", {}).get("kind") != "dpr"


def check_questions(questions: Sequence[str]) -> list[str]:
    """A list of non-blank question strings, or one clear error."""
    if isinstance(questions, str):
        raise MarginError("give a list of questions, not a single string")
    questions = list(questions)
    if not questions:
        raise MarginError("no questions given; pass at least one")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise MarginError(f"question {i + 1} is empty; give a non-blank question")
    return questions
