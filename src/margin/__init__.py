"""margin: Retrieval-Augmented Generation (Lewis et al., 2020), faithful to the paper.

The names below are the public surface; the CLI is built on them.

    >>> import margin
    >>> rag = margin.RAG.load(model="default", index="default")       # doctest: +SKIP
    >>> rag.ask(["Who wrote Romeo and Juliet?"], k=5, mode="token")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from margin.errors import MarginError
    from margin.generation.decoding import DecodeConfig
    from margin.rag import RAG, Answer, Provenance
    from margin.retrieval.bm25 import BM25Index
    from margin.retrieval.build import build_index
    from margin.retrieval.encoders import Encoder, load_encoder
    from margin.retrieval.index import DenseIndex, IndexConfig
    from margin.retrieval.passages import Passage, read_corpus
    from margin.retrieval.reader import open_index
    from margin.retrieval.retriever import Retrieved, Retriever
    from margin.retrieval.store import PassageStore

# Each public name and the module that defines it. They load on first use (PEP 562), so
# ``import margin`` and ``margin --help`` do not pay for torch, faiss and transformers.
_EXPORTS = {
    "BM25Index": "margin.retrieval.bm25",
    "build_index": "margin.retrieval.build",
    "open_index": "margin.retrieval.reader",
    "DecodeConfig": "margin.generation.decoding",
    "Encoder": "margin.retrieval.encoders",
    "load_encoder": "margin.retrieval.encoders",
    "MarginError": "margin.errors",
    "DenseIndex": "margin.retrieval.index",
    "IndexConfig": "margin.retrieval.index",
    "Passage": "margin.retrieval.passages",
    "read_corpus": "margin.retrieval.passages",
    "RAG": "margin.rag",
    "Answer": "margin.rag",
    "Provenance": "margin.rag",
    "Retrieved": "margin.retrieval.retriever",
    "Retriever": "margin.retrieval.retriever",
    "PassageStore": "margin.retrieval.store",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'margin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = [
    "RAG",
    "Answer",
    "BM25Index",
    "DecodeConfig",
    "DenseIndex",
    "Encoder",
    "IndexConfig",
    "MarginError",
    "Passage",
    "PassageStore",
    "Provenance",
    "Retrieved",
    "Retriever",
    "__version__",
    "build_index",
    "load_encoder",
    "open_index",
    "read_corpus",
]
