"""margin: Retrieval-Augmented Generation (Lewis et al., 2020), faithful to the paper.

The names below are the public surface; the CLI is built on them.

    >>> import margin
    >>> rag = margin.RAG.load(model="default", index="default")       # doctest: +SKIP
    >>> rag.ask(["Who wrote Romeo and Juliet?"], k=5, mode="token")   # doctest: +SKIP
"""

from margin.bm25 import BM25Index
from margin.build import build_index, open_index
from margin.decoding import DecodeConfig
from margin.encoders import Encoder, load_encoder
from margin.errors import MarginError
from margin.index import DenseIndex, IndexConfig
from margin.passages import Passage, read_corpus
from margin.rag import RAG, Answer, Provenance
from margin.retriever import Retrieved, Retriever
from margin.store import PassageStore

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
