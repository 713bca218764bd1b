"""Chunking by hand, every corpus reader, and every bad input they must refuse in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import margin.assets
from margin.errors import MarginError
from margin.retrieval.passages import (
    MAX_CHARS,
    Passage,
    chunk_words,
    document_id,
    read_corpus,
    split_document,
)


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


# ----------------------------------------------------------------------------- chunking


def test_chunk_words_by_hand():
    assert chunk_words("a  b\n\tc d e", max_words=2) == ["a b", "c d", "e"]
    assert chunk_words("a b c d", max_words=2) == ["a b", "c d"]  # exact multiple: no empty tail
    assert chunk_words("   \n ") == []
    assert chunk_words("") == []


def test_chunk_words_paper_default_is_disjoint_100_word_chunks():
    chunks = chunk_words(words(250))
    assert [len(c.split()) for c in chunks] == [100, 100, 50]
    assert chunks[1].split()[0] == "w100" and chunks[2].split()[-1] == "w249"
    assert " ".join(chunks) == words(250)  # disjoint and complete


def test_chunk_words_bounds_characters_for_text_without_spaces():
    # Chinese, a URL or a base64 blob has no spaces: one "word", once kept whole as one passage
    text = "汉字" * 1300  # 2600 characters, no space
    chunks = chunk_words(text)
    assert [len(c) for c in chunks] == [MAX_CHARS, MAX_CHARS, 2600 - 2 * MAX_CHARS]
    assert "".join(chunks) == text  # disjoint and complete


def test_chunk_words_cuts_at_spaces_and_inside_a_word_only_when_it_is_too_long():
    assert chunk_words("aaa bbb ccc", max_chars=7) == ["aaa bbb", "ccc"]
    assert chunk_words("aaa bbb ccc", max_chars=8) == ["aaa bbb", "ccc"]  # never "aaa bbb c"
    # a word over the bound is cut into bound-sized pieces; its tail goes on with what follows
    assert chunk_words("x abcdefghij y z", max_chars=4) == ["x", "abcd", "efgh", "ij y", "z"]
    assert chunk_words("a b c d e", max_words=2, max_chars=100) == ["a b", "c d", "e"]
    with pytest.raises(ValueError, match="max_chars"):
        chunk_words("a", max_chars=0)


def test_chunk_words_on_ordinary_text_is_the_100_word_chunker():
    """The character bound never binds on 100 words of ordinary text: chunks are as before."""
    text = " ".join(["The quick brown fox jumps over the lazy dog near riverbanks."] * 40)
    old = text.split()
    assert chunk_words(text) == [" ".join(old[i : i + 100]) for i in range(0, len(old), 100)]


@pytest.mark.slow
def test_default_corpus_chunks_are_unchanged_by_the_character_bound():
    """Every passage of the default corpus is what the words-only chunker made (index unchanged)."""
    import json as _json

    data = _json.loads(margin.assets.DEFAULT_CORPUS.path().read_text(encoding="utf-8"))
    for doc in data.values():
        w = str(doc.get("extract") or "").split()
        old = [" ".join(w[i : i + 100]) for i in range(0, len(w), 100)]
        assert chunk_words(str(doc.get("extract") or "")) == old


def test_a_huge_passage_without_spaces_is_stored_in_bounded_passages(tmp_path):
    path = tmp_path / "c.jsonl"
    blob = "QUJD" * 50_000  # 200k characters of base64, no space
    path.write_text(json.dumps({"id": "b", "title": "Blob", "text": blob}) + "\n", "utf-8")
    passages = list(read_corpus(path))
    assert max(len(p.text) for p in passages) == MAX_CHARS
    assert "".join(p.text for p in passages) == blob
    assert passages[0].id == "b-1" and len(passages) == 200


def test_split_document_keeps_id_and_suffixes_only_on_split():
    (one,) = split_document("T", "short text", id="doc7", source="s")
    assert one == Passage("doc7", "T", "short text", "s")
    many = split_document("T", words(150), id="doc7")
    assert [p.id for p in many] == ["doc7-1", "doc7-2"]
    assert [len(p.text.split()) for p in many] == [100, 50]
    assert all(p.title == "T" for p in many)


def test_split_document_without_id_uses_a_stable_content_hash():
    (p,) = split_document("Title", "some text")
    assert p.id == document_id("Title", "some text")
    assert p.id.startswith("h") and len(p.id) == 17
    assert split_document("Title", "some text")[0].id == p.id  # stable
    assert split_document("Other", "some text")[0].id != p.id  # depends on the title too
    assert [q.id for q in split_document("Title", words(101))] == [
        document_id("Title", words(101)) + "-1",
        document_id("Title", words(101)) + "-2",
    ]


# ----------------------------------------------------------------------------- JSONL


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reader(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps({"title": "A", "text": "alpha  beta", "id": "a1", "source": "src"}),
            "",  # blank lines are skipped
            json.dumps({"title": "B", "text": words(120), "id": 5}),
            json.dumps({"title": "C", "text": "gamma"}),
        ],
    )
    passages = list(read_corpus(path))
    assert passages[0] == Passage("a1", "A", "alpha beta", "src")
    assert [p.id for p in passages[1:3]] == ["5-1", "5-2"]  # numeric ids become strings
    assert passages[3].id == document_id("C", "gamma") and passages[3].source == ""
    assert len(passages) == 4


def test_readers_are_lazy(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"title": "A", "text": "x"}), "{bad"])
    stream = read_corpus(path)
    assert next(stream).text == "x"  # the bad second line is not read yet
    with pytest.raises(MarginError):
        next(stream)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"title": "A", "text": "x"}', '{"title": "B", "text": }'],
            r"c\.jsonl:2: not valid JSON",
        ),
        (['{"title": "A"}'], r'c\.jsonl:1: field "text" is missing'),
        (['{"text": "x"}'], r'c\.jsonl:1: field "title" is missing'),
        (['{"title": 3, "text": "x"}'], r'c\.jsonl:1: field "title" is not a string'),
        (['["A", "x"]'], r"c\.jsonl:1: expected a JSON object"),
        (['{"title": "A", "text": "   "}', ""], r"c\.jsonl: the corpus has no passages"),
    ],
)
def test_jsonl_bad_input(tmp_path, lines, message):
    path = write_lines(tmp_path / "c.jsonl", lines)
    with pytest.raises(MarginError, match=message) as info:
        list(read_corpus(path))
    assert "\n" not in str(info.value)


def test_jsonl_error_says_how_to_fix(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", ["{nope"])
    with pytest.raises(MarginError, match="fix that line or remove it"):
        list(read_corpus(path))


def test_non_utf8_reports_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"title": "A", "text": "ok"}\n{"title": "B", "text": "caf\xe9"}\n')
    with pytest.raises(MarginError, match=r"c\.jsonl:2: not UTF-8 .*re-encode"):
        list(read_corpus(path))


def test_missing_file_fails_before_iteration(tmp_path):
    with pytest.raises(MarginError, match="no such file"):
        read_corpus(tmp_path / "missing.jsonl")


def test_unknown_suffix(tmp_path):
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(MarginError, match=r"unknown corpus format '\.csv'"):
        read_corpus(tmp_path / "c.csv")


# ----------------------------------------------------------------------------- DPR TSV


def test_dpr_tsv_reader_keeps_passages_as_they_are(tmp_path):
    path = tmp_path / "psgs_w100.tsv"
    path.write_text(
        "id\ttext\ttitle\n"
        '1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
        f"2\t{words(120)}\tLong\n",  # not re-chunked: DPR passages are already chunks
        encoding="utf-8",
    )
    passages = list(read_corpus(path))
    assert passages[0] == Passage("1", "Aaron", 'Aaron ( or ; "Ahärôn") is a prophet', "")
    assert passages[1].id == "2" and passages[1].text == words(120)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text\tid\ttitle\n1\tx\tT\n", r"psgs\.tsv:1: a DPR passage file starts with the header"),
        ("", r"psgs\.tsv:1: a DPR passage file starts with the header"),
        ("id\ttext\ttitle\n1\tx\tT\n2\tonly two\n", r"psgs\.tsv:3: expected 3 tab-separated"),
        ("id\ttext\ttitle\n", r"psgs\.tsv: the corpus has no passages"),
    ],
)
def test_dpr_tsv_bad_input(tmp_path, content, message):
    path = tmp_path / "psgs.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MarginError, match=message):
        list(read_corpus(path))


def test_dpr_tsv_field_over_128_kib_is_read_and_bounded(tmp_path):
    """csv's default field limit (128 KiB) once gave a raw _csv.Error traceback."""
    path = tmp_path / "psgs.tsv"
    big = "x" * 200_000
    path.write_text(f"id\ttext\ttitle\n1\tshort\tT\n2\t{big}\tBig\n", encoding="utf-8")
    passages = list(read_corpus(path))
    assert passages[0] == Passage("1", "T", "short", "")  # ordinary rows are kept as they are
    assert [p.id for p in passages[1:3]] == ["2-1", "2-2"]
    assert max(len(p.text) for p in passages) == MAX_CHARS
    assert "".join(p.text for p in passages[1:]) == big


def test_dpr_tsv_field_over_the_limit_is_one_line_with_file_and_line(tmp_path, monkeypatch):
    import csv

    import margin.retrieval.passages

    monkeypatch.setattr(margin.retrieval.passages, "CSV_FIELD_LIMIT", 1000)
    before = csv.field_size_limit(1000)  # the limit is process-wide: restore it after
    try:
        path = tmp_path / "psgs.tsv"
        path.write_text(f"id\ttext\ttitle\n1\tok\tT\n2\t{'y' * 1001}\tT\n", encoding="utf-8")
        with pytest.raises(MarginError, match=r"psgs\.tsv:3: a field is over 1000 characters"):
            list(read_corpus(path))
    finally:
        csv.field_size_limit(before)


def test_dpr_tsv_non_utf8(tmp_path):
    path = tmp_path / "psgs.tsv"
    path.write_bytes(b"id\ttext\ttitle\n1\tx\tT\n2\t\xff\tT\n")
    with pytest.raises(MarginError, match=r"psgs\.tsv:3: not UTF-8"):
        list(read_corpus(path))


# ----------------------------------------------------------------------------- Parquet


def test_parquet_reader_reads_by_batches(tmp_path):
    path = tmp_path / "c.parquet"
    table = pa.table(
        {
            "title": ["A", "B", "C"],
            "text": ["one two", words(101), "three"],
            "id": ["a", None, "c"],
            "source": ["s1", None, "s3"],
        }
    )
    pq.write_table(table, path, row_group_size=1)
    passages = list(read_corpus(path))
    assert passages[0] == Passage("a", "A", "one two", "s1")
    assert [p.id for p in passages[1:3]] == [
        document_id("B", words(101)) + "-1",
        document_id("B", words(101)) + "-2",
    ]
    assert passages[3] == Passage("c", "C", "three", "s3")


def test_parquet_bad_input(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"title": ["A"], "body": ["x"]}), path)
    with pytest.raises(MarginError, match=r"no 'text' column"):
        list(read_corpus(path))
    pq.write_table(pa.table({"title": ["A", None], "text": ["x", "y"]}), path)
    with pytest.raises(MarginError, match=r'c\.parquet: row 2: field "title" is missing'):
        list(read_corpus(path))
    path.write_bytes(b"not parquet at all")
    with pytest.raises(MarginError, match="not a readable Parquet file"):
        list(read_corpus(path))


# ----------------------------------------------------------------------------- default corpus


class FakeAsset:
    def __init__(self, path: Path):
        self._path = path

    def path(self) -> Path:
        return self._path


def test_default_reader_attributes_wikipedia(tmp_path, monkeypatch):
    data = {
        "Mona Lisa": {"title": "Mona Lisa", "extract": "A portrait  by Leonardo.", "topic": "Arts"},
        "Zebra": {"title": "Zebra", "extract": words(130)},
        "Empty": {"title": "Empty", "extract": ""},
    }
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(margin.assets, "DEFAULT_CORPUS", FakeAsset(path))
    passages = list(read_corpus("default"))
    assert [p.title for p in passages] == ["Mona Lisa", "Zebra", "Zebra"]  # file order
    assert passages[0].text == "A portrait by Leonardo."
    assert passages[0].source == "https://en.wikipedia.org/wiki/Mona_Lisa (CC BY-SA 4.0)"
    assert passages[1].id.endswith("-1") and passages[2].id.endswith("-2")


@pytest.mark.slow
def test_real_default_corpus():
    passages = list(read_corpus("default"))
    assert len(passages) > 10_033  # every article gives >= 1 passage, long ones several
    assert len({p.id for p in passages}) == len(passages)
    assert max(len(p.text.split()) for p in passages) == 100
    assert all(p.source.startswith("https://en.wikipedia.org/wiki/") for p in passages)
