"""Index refresh: a changed passage encoder re-encodes the index into a new one (issue 26).

A refresh must give exactly the index a fresh build of the same passages with the new encoder
gives (same passages, vectors and search results), survive a kill -9, refuse what it must not
overwrite, and, in the background, hand the trainer a complete index once, between steps.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from helpers import KEYWORDS, KeywordEncoder, TableEncoder, clustered, kill_after_shards, one_thread
from margin.cli import main
from margin.errors import MarginError
from margin.retrieval.build import build_index
from margin.retrieval.encoders import load_encoder
from margin.retrieval.index import IndexConfig
from margin.retrieval.manifest import work_dir
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.refresh import BackgroundRefresh, refresh_index, refreshed_config

TESTS = Path(__file__).parent


class Table(TableEncoder):
    """Hand-set vectors per passage id, with a fingerprint of those vectors (two tables, two
    encoders, as two sets of weights would be)."""

    def __init__(self, table: dict[str, np.ndarray]):
        super().__init__(table)
        data = b"".join(table[k].tobytes() for k in sorted(table))
        self.fingerprint = hashlib.sha256(data).hexdigest()


def table_world(n: int = 2000, dim: int = 16) -> tuple[list[Passage], Table, Table]:
    """n passages (with titles and sources) and two encoders with unrelated clustered vectors."""
    passages = [Passage(f"p{i}", f"Title {i % 7}", f"text {i}", f"src{i % 3}") for i in range(n)]
    old, new = clustered(n, dim, seed=1), clustered(n, dim, seed=2)  # (n, dim) each
    return (
        passages,
        Table({p.id: v for p, v in zip(passages, old, strict=True)}),
        Table({p.id: v for p, v in zip(passages, new, strict=True)}),
    )


def many_keyword_docs(n: int) -> list[Passage]:
    """n passages mentioning the keywords in a varying mix (so results are not all ties)."""
    return [
        Passage(f"d{i}", f"Doc {i}", " ".join(KEYWORDS[(i * j) % 8] for j in range(1, 2 + i % 5)))
        for i in range(n)
    ]


def assert_same_index(a: Path, b: Path, queries: np.ndarray) -> None:
    """Two index directories hold the same passages, vectors, settings and search results."""
    x, y = open_index(a), open_index(b)
    for field in ("kind", "passages", "corpus_checksum", "shards", "index_params", "encoder"):
        assert getattr(x.manifest, field) == getattr(y.manifest, field), field
    assert x.store.get(range(len(x.store))) == y.store.get(range(len(y.store)))
    for ex, ey in zip(x.dense.embeddings.shards, y.dense.embeddings.shards, strict=True):
        np.testing.assert_array_equal(ex, ey)
    rx, ry = x.search(queries, k=10), y.search(queries, k=10)
    np.testing.assert_array_equal(rx.rows, ry.rows)
    np.testing.assert_array_equal(rx.scores, ry.scores)


# ----------------------------------------------------------------------------- refresh_index


@pytest.mark.parametrize(
    "config",
    [
        IndexConfig(kind="flat"),
        IndexConfig(kind="hnsw", hnsw_m=8, ef_construction=40),
        IndexConfig(kind="ivfpq", nlist=8, pq_m=4, rerank=3),
        IndexConfig(kind="hnswsq", hnsw_m=8, sq_bits=4),
    ],
    ids=lambda c: c.kind,
)
def test_refresh_equals_a_fresh_build_with_the_new_encoder(config, tmp_path):
    passages, old, new = table_world()
    build_index(passages, old, tmp_path / "old", config=config, shard_size=700, progress=False)

    manifest = refresh_index(tmp_path / "old", new, tmp_path / "new", progress=False)
    assert new.passages_encoded == 2000  # every passage, once
    assert manifest.encoder["fingerprint"] == new.fingerprint != old.fingerprint
    assert [s.rows for s in manifest.shards] == [700, 700, 600]  # the old shard size

    build_index(passages, Table(new.table), tmp_path / "ref", config=config, shard_size=700,
                progress=False)  # fmt: skip
    queries = clustered(20, 16, seed=3)  # (20, 16)
    assert_same_index(tmp_path / "new", tmp_path / "ref", queries)
    refreshed = open_index(tmp_path / "new")
    assert refreshed.store.get([5])[0] == Passage("p5", "Title 5", "text 5", "src2")
    np.testing.assert_array_equal(refreshed.dense.vectors(np.array([5])), new.table["p5"][None])
    assert open_index(tmp_path / "old").manifest.encoder["fingerprint"] == old.fingerprint


def test_refresh_keeps_settings_and_rederives_pq_m_for_another_dimension(tmp_path):
    passages, old, _ = table_world(400)
    config = IndexConfig(kind="ivfpq", nlist=4, pq_m=8, nprobe=2, rerank=2, seed=7)
    manifest = build_index(passages, old, tmp_path / "old", config=config, progress=False)
    kept = refreshed_config(manifest, dim=16)
    assert asdict(kept) == manifest.index_params  # every setting, resolved, as recorded
    other = refreshed_config(manifest, dim=12)  # 8 does not divide 12: derive it again
    assert other.pq_m is None and other.resolved(400, 12).pq_m == 3
    assert (other.nlist, other.nprobe, other.rerank, other.seed) == (4, 2, 2, 7)


def test_refresh_refuses_what_it_must_not_touch(tmp_path, caplog):
    passages, old, new = table_world(50)
    build_index(passages, old, tmp_path / "old", shard_size=20, progress=False)
    build_index(passages, None, tmp_path / "bm25", kind="bm25", progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    refusals = {
        tmp_path / "old": "is the index being refreshed",
        tmp_path / "old" / "inside": "is the index being refreshed",
        tmp_path / "notes": "is not a margin index",
        tmp_path / "bm25": "already holds another index",
    }
    for out, message in refusals.items():
        with pytest.raises(MarginError, match=message):
            refresh_index(tmp_path / "old", new, out, progress=False)
    with pytest.raises(MarginError, match="BM25 index: it has no passage encoder"):
        refresh_index(tmp_path / "bm25", new, tmp_path / "x", progress=False)
    assert new.passages_encoded == 0
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm25", "notes", "old"]  # no leftovers

    first = refresh_index(tmp_path / "old", new, tmp_path / "new", progress=False)
    again = Table(new.table)
    with caplog.at_level("INFO", logger="margin"):
        assert refresh_index(tmp_path / "old", again, tmp_path / "new", progress=False) == first
    assert again.passages_encoded == 0 and "already holds this refresh" in caplog.text


CRASH_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from helpers import KeywordEncoder
from margin.retrieval.refresh import refresh_index

class SlowEncoder(KeywordEncoder):
    def encode_passages(self, passages, batch_size=64, progress=False):
        time.sleep(0.25)
        return super().encode_passages(passages, batch_size, progress)

refresh_index(sys.argv[2], SlowEncoder(keywords=("paris", "rome", "river")), sys.argv[3],
              progress=False)
print("finished")
"""


def test_refresh_resumes_after_sigkill(tmp_path):
    """Kill a refresh at an arbitrary moment; running it again gives the fresh build's index."""
    passages = many_keyword_docs(60)
    build_index(passages, KeywordEncoder(), tmp_path / "old", shard_size=5, progress=False)
    out, work = tmp_path / "new", work_dir(tmp_path / "new")
    kill_after_shards(CRASH_SCRIPT, [str(TESTS), str(tmp_path / "old"), str(out)], work)
    assert not out.exists()
    with pytest.raises(MarginError, match="interrupted"):
        open_index(out)

    resumed = KeywordEncoder(keywords=("paris", "rome", "river"))
    refresh_index(tmp_path / "old", resumed, out, progress=False)
    assert 0 < resumed.passages_encoded <= 60 - 3 * 5  # the finished shards were kept
    fresh = KeywordEncoder(keywords=("paris", "rome", "river"))
    build_index(passages, fresh, tmp_path / "ref", shard_size=5, progress=False)
    assert_same_index(out, tmp_path / "ref", fresh.encode_queries(["paris", "rome river"]))


# ----------------------------------------------------------------------------- real encoders


@pytest.fixture(scope="module")
def world(tmp_path_factory, st_model):
    """A tiny BERT index of 2,000 passages (shards of 200) and a changed copy of its encoder
    saved with Encoder.save, as a trainer's snapshot would be."""
    import torch

    root = tmp_path_factory.mktemp("refresh")
    passages = many_keyword_docs(2000)
    with one_thread():
        build_index(passages, load_encoder(st_model, role="passage"), root / "index",
                    shard_size=200, progress=False)  # fmt: skip
        changed = load_encoder(st_model, role="passage")
        torch.manual_seed(1)
        with torch.no_grad():
            for weight in changed.module.parameters():
                weight.add_(0.05 * torch.randn_like(weight))
        changed.save(root / "encoder-step1")
    return root, passages


def vectors_of(directory: Path, encoder_dir: Path, passages: list[Passage], rows: list[int]):
    """Row vectors of ``directory`` and of a fresh encoding with ``encoder_dir``."""
    with one_thread():
        encoder = load_encoder(encoder_dir, role="passage")
        stored = open_index(directory).dense.vectors(np.array(rows))  # (n, dim)
        fresh = encoder.encode_passages([passages[r] for r in rows])  # (n, dim)
    return stored, fresh


def test_cli_refresh_and_its_one_line_refusals(world, tmp_path, capsys):
    root, passages = world
    with one_thread():
        code = main(["index", "refresh", "--index", str(root / "index"), "--encoder",
                     str(root / "encoder-step1"), "--out", str(tmp_path / "new")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and f"re-encoded 2000 passages (flat) into {tmp_path / 'new'}" in out
    stored, fresh = vectors_of(tmp_path / "new", root / "encoder-step1", passages, [0, 999, 1999])
    np.testing.assert_allclose(stored, fresh, atol=1e-6)
    build_index(passages, None, tmp_path / "bm25", kind="bm25", progress=False)
    for argv, message in [
        (["--index", str(tmp_path / "bm25"), "--out", str(tmp_path / "x")], "needs no refresh"),
        (["--index", str(tmp_path / "new"), "--out", str(tmp_path / "new")], "being refreshed"),
    ]:
        code = main(["index", "refresh", "--encoder", str(root / "encoder-step1"), *argv])
        _, err = capsys.readouterr()
        assert code != 0 and message in err
        assert err.count("\n") == 1 and "Traceback" not in err


def wait_until(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def train_loop(refresh: BackgroundRefresh, index: Path, label, steps_after_swap: int = 3):
    """A fake training loop: batches within a step use the current index; ``poll`` and the swap
    happen only between steps. Returns, per step, the labels of the vectors its batches read."""
    current = open_index(index)
    used: list[set[str]] = []
    swapped_at = None
    while swapped_at is None or len(used) < swapped_at + steps_after_swap:
        batches = set()
        for row in range(0, 2000, 500):  # four batches, each reading a stored passage vector
            batches.add(label(current.dense.vectors(np.array([row]))[0], row))
            time.sleep(0.01)
        used.append(batches)
        new = refresh.poll()  # between optimizer steps
        if new is not None:
            assert swapped_at is None, "poll returned a finished index twice"
            current, swapped_at = open_index(new), len(used)
        assert len(used) < 20_000, "the refresh never finished"
    return used, swapped_at


@pytest.mark.slow
def test_background_refresh_swaps_between_steps_only(world, tmp_path):
    root, passages = world
    rows = list(range(0, 2000, 500))
    old, new = vectors_of(root / "index", root / "encoder-step1", passages, rows)
    assert not np.allclose(old, new, atol=1e-3)  # the two encoders are told apart

    def label(vector: np.ndarray, row: int) -> str:
        i = rows.index(row)
        return "old" if np.allclose(vector, old[i], atol=1e-5) else (
            "new" if np.allclose(vector, new[i], atol=1e-5) else "other")  # fmt: skip

    with BackgroundRefresh(root / "index", tmp_path / "work") as refresh:
        assert refresh.poll() is None and not refresh.running  # idle
        assert refresh.start(root / "encoder-step1", step=1)
        assert not refresh.start(root / "encoder-step1", step=2)  # one at a time
        assert refresh.running
        used, swapped_at = train_loop(refresh, root / "index", label)
        assert not refresh.running and refresh.poll() is None  # returned once
    assert all(len(step) == 1 for step in used)  # no step mixed vectors of two encoders
    assert [next(iter(s)) for s in used] == ["old"] * swapped_at + ["new"] * (
        len(used) - swapped_at
    )
    new_index = tmp_path / "work" / "index-step1"
    assert refresh.index == new_index  # the next start re-encodes the new index
    assert (tmp_path / "work" / "index-step1.log").is_file()
    with one_thread():
        build_index(passages, load_encoder(root / "encoder-step1", role="passage"),
                    tmp_path / "ref", shard_size=200, progress=False)  # fmt: skip
        a, b = open_index(new_index), open_index(tmp_path / "ref")
    assert a.manifest.encoder == b.manifest.encoder
    assert a.manifest.corpus_checksum == b.manifest.corpus_checksum
    np.testing.assert_allclose(a.dense.vectors(np.arange(2000)), b.dense.vectors(np.arange(2000)),
                               atol=1e-6)  # fmt: skip
    queries = b.dense.vectors(np.array([3, 1500]))  # (2, dim)
    np.testing.assert_array_equal(a.search(queries, 5).rows, b.search(queries, 5).rows)


@pytest.mark.slow
def test_a_failed_background_refresh_is_one_line_and_leaves_nothing(world, tmp_path):
    root, _ = world
    refresh = BackgroundRefresh(root / "index", tmp_path / "work")
    assert refresh.start(tmp_path / "no-such-encoder", step=7)
    wait_until(lambda: not refresh.running)
    with pytest.raises(MarginError) as failure:
        refresh.poll()
    message = str(failure.value)
    assert "no such model directory" in message and "index-step7.log" in message
    assert "\n" not in message
    assert refresh.poll() is None and refresh.index == root / "index"  # nothing swapped
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["index-step7.log"]
    assert refresh.start(root / "encoder-step1", step=8)  # it may try again
    refresh.close()


@pytest.mark.slow
def test_close_kills_a_running_refresh_and_removes_its_partial_index(world, tmp_path):
    root, _ = world
    refresh = BackgroundRefresh(root / "index", tmp_path / "work")
    assert refresh.start(root / "encoder-step1", step=3)
    building = work_dir(tmp_path / "work" / "index-step3")
    wait_until(lambda: any((building / "embeddings").glob("shard-*.npy")) or not refresh.running)
    assert refresh.running, "the refresh finished before it could be stopped"
    process = refresh._process
    refresh.close()
    assert process is not None and process.poll() is not None  # it is gone
    assert not refresh.running and refresh.poll() is None
    assert not building.exists() and not (tmp_path / "work" / "index-step3").exists()
