"""The passage store: round trip, memory mapping, checksums, id lookup, damaged shards."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from margin.errors import MarginError
from margin.retrieval.passages import Passage
from margin.retrieval.store import (
    EMPTY_CHECKSUM,
    SCHEMA,
    PassageStore,
    chain_checksum,
    shard_name,
    write_shard,
)

PASSAGES = [
    Passage(f"p{i}", f"Title {i % 3}", f"text number {i} " * 5, f"src{i}") for i in range(25)
]


def write_store(root, passages, shard_size):
    checksum = EMPTY_CHECKSUM
    for number, start in enumerate(range(0, len(passages), shard_size)):
        checksum = write_shard(
            root / shard_name(number), passages[start : start + shard_size], checksum
        )
    return checksum


def test_round_trip_across_shards(tmp_path):
    checksum = write_store(tmp_path, PASSAGES, shard_size=10)
    store = PassageStore.open(tmp_path)
    assert len(store) == 25
    assert store.shards == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert store.shard_rows() == [10, 10, 5]
    assert store.get([24, 0, 10, 9, 10]) == [PASSAGES[i] for i in (24, 0, 10, 9, 10)]
    assert store.get(range(25)) == PASSAGES
    assert store.get([]) == []
    assert store.ids().to_pylist() == [p.id for p in PASSAGES]
    assert store.checksum() == checksum == chain_checksum(PASSAGES)
    with pytest.raises(MarginError, match="row 25 is out of range"):
        store.get([3, 25])


def test_open_reads_no_text_into_memory(tmp_path):
    big = [Passage(str(i), "T", "word " * 100) for i in range(20_000)]  # ~10 MB of text
    write_store(tmp_path, big, shard_size=10_000)
    before = pa.total_allocated_bytes()
    store = PassageStore.open(tmp_path)
    assert pa.total_allocated_bytes() - before < 64 * 1024  # buffers point into the mapped files
    text = store._tables[0].column("text").chunks[0]
    assert text.buffers()[2].is_cpu and not text.buffers()[2].is_mutable  # read-only mapping
    assert store.get([19_999])[0] == big[-1]


def test_checksum_does_not_depend_on_sharding(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert write_store(a, PASSAGES, 7) == write_store(b, PASSAGES, 25)
    assert PassageStore.open(a).checksum() == PassageStore.open(b).checksum()
    changed = [*PASSAGES[:-1], Passage("p24", "Title 0", "edited", "src24")]
    assert chain_checksum(changed) != chain_checksum(PASSAGES)
    moved = [PASSAGES[1], PASSAGES[0], *PASSAGES[2:]]
    assert chain_checksum(moved) != chain_checksum(PASSAGES)
    other_source = [Passage(p.id, p.title, p.text, "elsewhere") for p in PASSAGES]
    assert chain_checksum(other_source) == chain_checksum(PASSAGES)  # source is attribution only


def test_checksum_is_unambiguous_about_field_boundaries():
    assert chain_checksum([Passage("a", "bc", "d")]) != chain_checksum([Passage("ab", "c", "d")])


def test_verify_recomputes_from_the_text(tmp_path):
    write_store(tmp_path, PASSAGES, 10)
    store = PassageStore.open(tmp_path)
    assert store.verify() == store.checksum()
    # Forge shard 1: other text under the genuine shard's metadata.
    path = tmp_path / shard_name(1)
    schema = SCHEMA.with_metadata(pa.ipc.open_file(pa.memory_map(str(path))).schema.metadata)
    forged = pa.table(
        {
            f: [getattr(p, f) if f != "text" else "forged" for p in PASSAGES[10:20]]
            for f in SCHEMA.names
        },
        schema=schema,
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(forged)
    reopened = PassageStore.open(tmp_path)
    assert reopened.checksum() == store.checksum()  # metadata is cheap and trusting...
    with pytest.raises(MarginError, match="shard-00001.arrow: content does not match"):
        reopened.verify()  # ...verify is not


def test_row_of_and_duplicates(tmp_path):
    write_store(tmp_path, PASSAGES, 10)
    store = PassageStore.open(tmp_path)
    assert store.row_of(["p13", "nope", "p0", "p24"]).tolist() == [13, -1, 0, 24]
    assert store.row_of([]).tolist() == []
    assert store.duplicate_id() is None
    dup = tmp_path / "dup"
    write_store(dup, [*PASSAGES[:5], Passage("p2", "x", "y")], 3)
    assert PassageStore.open(dup).duplicate_id() == "p2"


def test_missing_truncated_and_reordered_shards(tmp_path):
    write_store(tmp_path, PASSAGES, 10)
    with pytest.raises(MarginError, match=r"shard-00007\.arrow is missing; rebuild"):
        PassageStore.open(tmp_path, ["shard-00000.arrow", "shard-00007.arrow"])
    with pytest.raises(MarginError, match="shard out of order"):
        PassageStore.open(tmp_path, ["shard-00001.arrow", "shard-00000.arrow"])
    path = tmp_path / shard_name(2)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(MarginError, match=r"shard-00002\.arrow is corrupt or truncated"):
        PassageStore.open(tmp_path)


def test_write_is_atomic(tmp_path):
    class Boom(Exception):
        pass

    class Exploding(list):
        def __getitem__(self, item):
            raise Boom

    write_store(tmp_path, PASSAGES[:5], 5)
    with pytest.raises(Boom):
        write_shard(tmp_path / shard_name(0), Exploding(PASSAGES), EMPTY_CHECKSUM)
    assert PassageStore.open(tmp_path).get(range(5)) == PASSAGES[:5]  # old shard intact
    assert sorted(os.listdir(tmp_path)) == ["shard-00000.arrow"]  # no temporary left behind
