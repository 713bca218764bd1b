"""Shared fixtures: a keyword encoder whose vectors and search results can be worked out by hand,
the tiny random models of tests/helpers.py built once per session or module, and one Ray cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import pytest

from helpers import (
    DOCS,
    TINY_BERT,
    KeywordEncoder,
    bert_tokenizer,
    one_thread,
    tiny_bart,
    tiny_llama,
)

TESTS = Path(__file__).parent


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


@pytest.fixture(scope="module")
def bart():
    """The tiny random BART of tests/helpers.py behind margin's seq2seq generator."""
    from margin.generation.seq2seq import Seq2SeqFormat, Seq2SeqGenerator

    model, tok = tiny_bart()
    return Seq2SeqGenerator(model, tok, Seq2SeqFormat(max_combined_length=64))


@pytest.fixture(scope="module")
def llama():
    """The tiny random Llama of tests/helpers.py behind margin's causal generator."""
    from margin.generation.causal import CausalGenerator

    model, tok = tiny_llama()
    return CausalGenerator(model, tok)


@pytest.fixture(scope="session")
def st_model(tmp_path_factory):
    """A tiny random sentence-transformers model saved to disk (no download)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("cli")
    with one_thread():
        torch.manual_seed(0)
        BertModel(BertConfig(**TINY_BERT)).save_pretrained(root / "hf")
        bert_tokenizer().save_pretrained(root / "hf")
        transformer = Transformer(str(root / "hf"), max_seq_length=48)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(
            str(root / "st")
        )
    return root / "st"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (test_distributed.py, test_sharded.py,
    test_data_parallel.py). Its workers import tests/helpers.py, so tests/ is on their path."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    paths = [str(TESTS), os.environ.get("PYTHONPATH", "")]
    # The machine is shared: Ray's memory monitor would kill our tiny workers for the memory
    # other people's jobs use. (Read by the raylet this ray.init starts.)
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}},
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
