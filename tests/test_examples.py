"""Task example readers: every format, the CSV-quoted DPR lines, and one-line errors."""

import json

import pytest

from margin.errors import MarginError
from margin.evaluation.examples import (
    MAX_INPUT_CHARS,
    detect_format,
    read_examples,
    read_examples_counted,
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_dpr_tsv_plain_and_csv_quoted(tmp_path):
    path = write(
        tmp_path,
        "qa.tsv",
        "who wrote hamlet\t['William Shakespeare', 'Shakespeare']\n"
        "\n"
        'what is 2+2?\t"[""four"", ""4""]"\n',
    )
    a, b = read_examples(path)
    assert (a.id, a.input, a.answers, a.target) == (
        "qa.tsv:1",
        "who wrote hamlet",
        ("William Shakespeare", "Shakespeare"),
        "William Shakespeare",
    )
    assert (b.id, b.answers) == ("qa.tsv:3", ("four", "4"))  # blank line 2 skipped, numbering kept


def test_dpr_jsonl_kilt_and_generic(tmp_path):
    dpr = write(tmp_path, "a.jsonl", json.dumps({"question": "q?", "answers": ["x", ""]}) + "\n")
    kilt = write(
        tmp_path,
        "b.jsonl",
        json.dumps(
            {
                "id": "k1",
                "input": "claim",
                "output": [
                    {"answer": "ans", "provenance": [{"title": "T1"}, {"title": "T1"}]},
                    {"answer": "ans2", "provenance": [{"title": "T2"}]},
                ],
            }
        )
        + "\n",
    )
    gen = write(tmp_path, "c.jsonl", json.dumps({"input": "topic", "target": "a clue"}) + "\n")
    assert [detect_format(p) for p in (dpr, kilt, gen)] == ["dpr-jsonl", "kilt", "jsonl"]
    assert read_examples(dpr)[0].answers == ("x",)
    k = read_examples(kilt)[0]
    assert (k.id, k.answers, k.provenance) == ("k1", ("ans", "ans2"), ("T1", "T2"))
    g = read_examples(gen, task="generation")[0]
    assert (g.input, g.target) == ("topic", "a clue")


def test_fever_labels_and_task_mismatch(tmp_path):
    fever = write(
        tmp_path,
        "f.jsonl",
        json.dumps({"input": "Paris is in France.", "output": [{"answer": "SUPPORTS"}]}) + "\n",
    )
    assert read_examples(fever, task="fever")[0].target == "SUPPORTS"
    with pytest.raises(MarginError, match=r"f.jsonl:1: .*FEVER labels.*--task fever"):
        read_examples(fever, task="qa")
    qa = write(tmp_path, "q.tsv", "q\t['Paris']\n")
    with pytest.raises(MarginError, match=r"q.tsv:1: .*not a FEVER label.*--task qa"):
        read_examples(qa, task="fever")


def test_limit_and_skip_bad_lines(tmp_path):
    path = write(tmp_path, "qa.tsv", "a\t['1']\nno tab here\nb\t[]\nc\t['3']\nd\t['4']\n")
    with pytest.raises(MarginError, match=r"qa.tsv:2: expected 'question<TAB>\[answers\]'"):
        read_examples(path)
    examples, skipped = read_examples_counted(path, skip_bad_lines=True)
    assert [e.input for e in examples] == ["a", "c", "d"] and skipped == 2
    assert [e.input for e in read_examples(path, limit=1)] == ["a"]


@pytest.mark.parametrize(
    ("name", "text", "kwargs", "message"),
    [
        ("e.tsv", "", {}, "no examples found"),
        ("x.tsv", "q\tnot a list\n", {}, r"x.tsv:1: answers 'not a list' are not a Python list"),
        (
            "j.jsonl",
            '{"question": "q", "answers": ["a"]}\n{bad\n',
            {},
            r"j.jsonl:2: not valid JSON",
        ),
        (
            "k.jsonl",
            '{"question": "", "answers": ["a"]}\n',
            {},
            r"k.jsonl:1: missing or empty 'question'",
        ),
        (
            "u.tsv",
            "q\t['a']\n",
            {"format": "csv"},
            "unknown format 'csv'; use one of auto, dpr-tsv",
        ),
        ("v.tsv", "q\t['a']\n", {"task": "summarise"}, "unknown task 'summarise'"),
        ("w.dat", "just words\n", {}, "cannot tell the format"),
    ],
)
def test_bad_input_is_one_line(tmp_path, name, text, kwargs, message):
    path = write(tmp_path, name, text)
    with pytest.raises(MarginError, match=message) as err:
        read_examples(path, **kwargs)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(MarginError, match="no such file"):
        read_examples(tmp_path / "nope.tsv")


@pytest.mark.parametrize("name", ["qa.tsv", "qa.jsonl"])
def test_non_utf8_byte_names_file_and_line(tmp_path, name):
    lines = ["a\t['1']", "b\t['2']", "caf\xe9\t['3']"]
    if name.endswith(".jsonl"):
        lines = [json.dumps({"question": q.split("\t")[0], "answers": ["x"]}) for q in lines]
        lines[2] = lines[2].replace("\\u00e9", "\xe9")
    path = tmp_path / name
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")  # one byte 0xe9 on line 3
    with pytest.raises(MarginError, match=rf"{name}:3: not UTF-8 \(byte 0xe9 at column \d+\)"):
        read_examples(path)


def test_a_huge_question_is_refused_before_anything_runs(tmp_path):
    """A 200k-character input is no question (a misformatted line): refused with file:line,
    or skipped with skip_bad_lines; never cut, which would score or train another question."""
    huge = "x" * 200_000
    path = write(tmp_path, "qa.tsv", f"a\t['1']\n{huge}\t['2']\nc\t['3']\n")
    with pytest.raises(MarginError, match=r"qa.tsv:2: the input is 200000 characters") as err:
        read_examples(path)
    assert "remove that line" in str(err.value) and len(str(err.value)) < 300
    examples, skipped = read_examples_counted(path, skip_bad_lines=True)
    assert [e.input for e in examples] == ["a", "c"] and skipped == 1
    # the longest input still read is MAX_INPUT_CHARS
    ok = write(tmp_path, "ok.tsv", f"{'y' * MAX_INPUT_CHARS}\t['1']\n")
    assert len(read_examples(ok)[0].input) == MAX_INPUT_CHARS
