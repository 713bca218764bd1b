"""Ray index builds: equal to a local build, resumable, surviving a killed worker; bounded memory.

One local Ray cluster (2 CPUs, no dashboard; tests/conftest.py) serves the whole test session.
Its workers import this module and tests/helpers.py (for the encoders), so the tests directory goes
on their PYTHONPATH.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_BERT, KeywordEncoder, bert_tokenizer
from margin.errors import MarginError
from margin.retrieval.build import build_index
from margin.retrieval.distributed import RayConfig, build_index_ray
from margin.retrieval.reader import open_index

TESTS = Path(__file__).parent
WORDS = ["paris", "france", "berlin", "germany", "rome", "italy", "river", "mountain"]


def write_corpus(path: Path, n: int) -> Path:
    """n one-passage documents with distinct keyword mixes (ids d0, d1, ...)."""
    lines = []
    for i in range(n):
        text = " ".join(WORDS[(i * j + i // 8) % 8] for j in range(1, 2 + i % 6))
        lines.append(json.dumps({"id": f"d{i}", "title": f"Doc {i}", "text": text}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_same_index(a: Path, b: Path) -> None:
    """Same passages, checksums and shards; vectors within float tolerance; same search results."""
    x, y = open_index(a), open_index(b)
    assert x.manifest.corpus_checksum == y.manifest.corpus_checksum
    assert x.manifest.shards == y.manifest.shards
    assert x.manifest.encoder == y.manifest.encoder and x.manifest.kind == y.manifest.kind
    assert x.store.ids().to_pylist() == y.store.ids().to_pylist()
    for ex, ey in zip(x.dense.embeddings.shards, y.dense.embeddings.shards, strict=True):
        np.testing.assert_allclose(ex, ey, atol=1e-6)
    queries = KeywordEncoder().encode_queries(["paris", "river mountain", "germany italy", "rome"])
    rx, ry = x.search(queries, k=10), y.search(queries, k=10)
    np.testing.assert_array_equal(rx.rows, ry.rows)
    np.testing.assert_allclose(rx.scores, ry.scores, atol=1e-6)


class KillOnceEncoder(KeywordEncoder):
    """Kills its own worker process (SIGKILL) on the shard holding ``victim``, the first time."""

    def __init__(self, marker: str, victim: str):
        super().__init__()
        self.marker, self.victim = Path(marker), victim

    def encode_passages(self, passages, batch_size=64, progress=False):
        if any(p.id == self.victim for p in passages) and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_passages(passages, batch_size, progress)


# ----------------------------------------------------------------------------- equal to local


def test_ray_build_equals_local_build(ray_cluster, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 45)
    manifest = build_index_ray(
        corpus, KeywordEncoder(), tmp_path / "ray", shard_size=5, progress=False,
        ray_config=RayConfig(workers=2), encoder_factory=KeywordEncoder,
    )
    assert manifest.passages == 45 and len(manifest.shards) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "ray"]  # no work dir left
    build_index(corpus, KeywordEncoder(), tmp_path / "local", shard_size=5, progress=False)
    assert_same_index(tmp_path / "ray", tmp_path / "local")


def test_a_worker_with_other_weights_is_refused():
    """What each Ray actor runs, called here directly: its encoder must be the driver's."""
    from margin.retrieval.distributed import _EncoderWorker
    from margin.retrieval.passages import Passage

    driver = KeywordEncoder()
    other = functools.partial(KeywordEncoder, keywords=("paris", "rome", "river", "alps", "a",
                                                        "b", "c", "d"))
    worker = _EncoderWorker(other, driver.fingerprint, driver.dim)
    with pytest.raises(MarginError, match="a Ray worker loaded encoder .* not the driver's"):
        worker.encode([Passage("p", "Paris", "paris")], 64)
    same = _EncoderWorker(KeywordEncoder, driver.fingerprint, driver.dim)
    batch = [Passage("p", "Paris", "paris river"), Passage("q", "Alps", "mountain")]
    np.testing.assert_array_equal(same.encode(batch, 64), driver.encode_passages(batch))


def test_ray_build_refuses_bm25(tmp_path):
    with pytest.raises(MarginError, match="BM25 index needs no encoding"):
        build_index_ray(tmp_path / "c.jsonl", KeywordEncoder(), tmp_path / "idx", kind="bm25")


# ----------------------------------------------------------------------------- killed workers


def test_killed_worker_is_restarted_and_the_build_completes(ray_cluster, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 40)
    marker = tmp_path / "killed"
    factory = functools.partial(KillOnceEncoder, str(marker), "d22")  # in shard 4 of 8
    build_index_ray(
        corpus, KeywordEncoder(), tmp_path / "ray", shard_size=5, progress=False,
        ray_config=RayConfig(workers=1, max_restarts=2), encoder_factory=factory,
    )
    assert marker.exists()  # a worker really was killed mid-build
    build_index(corpus, KeywordEncoder(), tmp_path / "local", shard_size=5, progress=False)
    assert_same_index(tmp_path / "ray", tmp_path / "local")


@pytest.mark.slow
def test_killed_worker_without_restarts_then_resume(ray_cluster, tmp_path):
    """No restarts allowed: the build stops with a one-line error; the rerun keeps the finished
    shards (same files, untouched) and completes the same index as a local build."""
    corpus = write_corpus(tmp_path / "c.jsonl", 40)
    marker = tmp_path / "killed"
    factory = functools.partial(KillOnceEncoder, str(marker), "d37")  # in the last shard
    out, work = tmp_path / "ray", tmp_path / ".ray.building"
    with pytest.raises(MarginError, match="worker died while encoding .* run the same build"):
        build_index_ray(
            corpus, KeywordEncoder(), out, shard_size=5, progress=False,
            ray_config=RayConfig(workers=1, max_restarts=0, in_flight=1),
            encoder_factory=factory,
        )
    assert marker.exists() and not out.exists()
    with pytest.raises(MarginError, match="interrupted"):
        open_index(out)
    finished = {p.name: p.stat().st_ino for p in (work / "embeddings").glob("shard-*.npy")}
    assert len(finished) == 7  # one worker, one shard at a time: shards 0-6 were done
    build_index_ray(
        corpus, KeywordEncoder(), out, shard_size=5, progress=False,
        ray_config=RayConfig(workers=1), encoder_factory=factory,
    )
    for name, inode in finished.items():  # kept, not re-encoded and rewritten
        assert (out / "embeddings" / name).stat().st_ino == inode
    build_index(corpus, KeywordEncoder(), tmp_path / "local", shard_size=5, progress=False)
    assert_same_index(out, tmp_path / "local")


@pytest.mark.slow
def test_local_build_resumes_a_ray_build(ray_cluster, tmp_path):
    """The plan is the same: an interrupted Ray build can be finished by a local one."""
    corpus = write_corpus(tmp_path / "c.jsonl", 30)
    factory = functools.partial(KillOnceEncoder, str(tmp_path / "killed"), "d27")
    with pytest.raises(MarginError, match="worker died"):
        build_index_ray(
            corpus, KeywordEncoder(), tmp_path / "idx", shard_size=5, progress=False,
            ray_config=RayConfig(workers=1, max_restarts=0, in_flight=1),
            encoder_factory=factory,
        )
    resumed = KeywordEncoder()
    build_index(corpus, resumed, tmp_path / "idx", shard_size=5, progress=False)
    assert resumed.passages_encoded == 5  # only the shard the dead worker held
    build_index(corpus, KeywordEncoder(), tmp_path / "ref", shard_size=5, progress=False)
    assert_same_index(tmp_path / "idx", tmp_path / "ref")


# ----------------------------------------------------------------------------- real encoder


@pytest.mark.slow
def test_cli_ray_build_with_a_transformer_encoder(ray_cluster, tmp_path, capsys):
    """`margin index build --ray`: each actor loads the encoder from its spec (a tiny BERT saved
    here); the index equals a local build up to float rounding."""
    import torch
    from transformers import BertConfig, BertModel

    from margin.cli import main
    from margin.retrieval.encoders import load_encoder

    torch.manual_seed(0)
    model_dir = tmp_path / "bert"
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(model_dir)
    bert_tokenizer().save_pretrained(model_dir)
    corpus = write_corpus(tmp_path / "c.jsonl", 24)
    code = main([
        "index", "build", "--out", str(tmp_path / "ray"), "--corpus", str(corpus),
        "--encoder", str(model_dir), "--shard-size", "8", "--ray", "--ray-workers", "2",
    ])
    assert code == 0 and "indexed 24 passages (flat)" in capsys.readouterr().out
    encoder = load_encoder(model_dir, role="passage")
    build_index(corpus, encoder, tmp_path / "local", shard_size=8, progress=False)
    x, y = open_index(tmp_path / "ray"), open_index(tmp_path / "local")
    assert x.manifest.encoder == y.manifest.encoder
    assert x.store.ids().to_pylist() == y.store.ids().to_pylist()
    a, b = np.concatenate(x.dense.embeddings.shards), np.concatenate(y.dense.embeddings.shards)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    queries = encoder.encode_queries(["paris france", "the river", "who painted"])
    np.testing.assert_array_equal(x.search(queries, k=5).rows, y.search(queries, k=5).rows)


# ----------------------------------------------------------------------------- memory


RSS_SCRIPT = """
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from margin.retrieval.build import build_index

class FastEncoder:  # 64-d vectors from the passage number: no model, all the cost is ingestion
    dim, fingerprint, spec = 64, "f" * 64, {"kind": "fake", "name": "fast"}
    def encode_passages(self, passages, batch_size=64, progress=False):
        rows = np.array([int(p.id[1:]) for p in passages], dtype=np.float32)[:, None]
        return np.cos(rows * np.arange(1, 65, dtype=np.float32))
    encode_queries = None

build_index(sys.argv[2], FastEncoder(), sys.argv[3], shard_size=2000, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
"""


def peak_rss_mib(tmp_path: Path, docs: int) -> float:
    corpus = tmp_path / f"c{docs}.jsonl"
    filler = " ".join(["word"] * 95)
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(docs):
            f.write(json.dumps({"id": f"d{i}", "title": f"T{i}", "text": f"{filler} {i}"}) + "\n")
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(TESTS), str(corpus), str(tmp_path / f"i{docs}")],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.split()[-1]) / 1024



@pytest.mark.slow
def test_streaming_ingestion_memory_is_bounded(tmp_path):
    """Peak RSS of a build barely moves when the corpus grows 5x (10k -> 50k passages, +24 MB of
    text): passages stream through one 2,000-passage shard at a time. What does grow is the
    flat index itself (64 floats per passage, +10 MB here) and the id table (~50 B/passage)."""
    small, large = peak_rss_mib(tmp_path, 10_000), peak_rss_mib(tmp_path, 50_000)
    text_growth = 40_000 * 500 / 2**20  # ~19 MiB more text
    index_growth = 40_000 * 64 * 4 / 2**20  # ~10 MiB more FAISS flat vectors
    assert large - small < index_growth + 0.5 * text_growth, (small, large)


def test_a_ray_build_that_fails_before_its_first_shard_leaves_nothing(ray_cluster, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a",\n')
    with pytest.raises(MarginError, match="bad.jsonl:1"):
        build_index_ray(bad, KeywordEncoder(), tmp_path / "idx", ray_config=RayConfig(workers=1),
                        encoder_factory=KeywordEncoder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
