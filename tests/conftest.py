"""Shared fixtures: a keyword encoder whose vectors and search results can be worked out by hand."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

import faiss
import numpy as np
import pytest

from margin.retrieval.passages import Passage

# One dimension per keyword. A text's vector counts its keywords and is L2-normalised, so the
# inner product of a one-keyword query with a passage is that keyword's share of the passage.
KEYWORDS = ("paris", "france", "berlin", "germany", "rome", "italy", "river", "mountain")


class KeywordEncoder:
    """Deterministic fake of margin's Encoder protocol: normalised keyword counts."""

    def __init__(self, keywords: Sequence[str] = KEYWORDS, role: str = "passage"):
        self.keywords = list(keywords)
        self.dim = len(self.keywords)
        self.spec = {"kind": "keyword", "name": "keyword-" + "-".join(self.keywords), "role": role}
        self.fingerprint = hashlib.sha256(json.dumps(self.keywords).encode()).hexdigest()
        self.passages_encoded = 0  # how many passages encode_passages has seen (resume tests)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (n, dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                if word in self.keywords:
                    out[i, self.keywords.index(word)] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)

    def encode_passages(
        self, passages: Sequence[Passage], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        self.passages_encoded += len(passages)
        return self.embed([f"{p.title} {p.text}" for p in passages])

    def encode_queries(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        return self.embed(list(texts))


# A tiny corpus: the keyword in each title is the hand-obvious answer to a one-word query.
DOCS = [
    {"title": "Paris", "text": "Paris is the capital of France and sits on a river."},
    {"title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"title": "Rome", "text": "Rome is the capital of Italy, near a mountain."},
    {"title": "Alps", "text": "A mountain range."},
    {"title": "Seine", "text": "The Seine is a river in France."},
    {"title": "Rhine", "text": "The Rhine is a river in Germany."},
]


@pytest.fixture
def keyword_encoder() -> KeywordEncoder:
    return KeywordEncoder()


@pytest.fixture
def corpus_jsonl(tmp_path):
    """DOCS as a JSONL corpus (no ids: each passage id is a hash of title and text)."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """One thread for torch and FAISS: tiny models gain nothing from intra-op threads, and
    OpenMP threads spin badly on a busy 2-core machine (30x slower seen here)."""
    import torch

    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before[0])
    torch.set_num_threads(before[1])


def clustered(n: int, dim: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (realistic for ANN recall; uniform noise is not)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # (n, dim)


@pytest.fixture(scope="module")
def bart():
    """The tiny random BART of tests/test_generator.py behind margin's seq2seq generator."""
    from margin.generation.seq2seq import Seq2SeqFormat, Seq2SeqGenerator
    from test_generator import tiny_bart

    model, tok = tiny_bart()
    return Seq2SeqGenerator(model, tok, Seq2SeqFormat(max_combined_length=64))


@pytest.fixture(scope="module")
def llama():
    """The tiny random Llama of tests/test_generator.py behind margin's causal generator."""
    from margin.generation.causal import CausalGenerator
    from test_generator import tiny_llama

    model, tok = tiny_llama()
    return CausalGenerator(model, tok)
