"""Task examples: the questions, claims and prompts that RAG is trained and evaluated on.

The paper's tasks (Sec. 3) come in a handful of file formats. This module reads all of them into
one record, :class:`Example`, so training (``margin train``) and evaluation (``margin eval``) share
one reader and one set of error messages:

- ``dpr-tsv``: ``question<TAB>python-list-of-answers`` (DPR's open-domain QA files). Some lines
  wrap the list in CSV quotes (``"[""a"", ""b""]"``); those are unquoted first.
- ``dpr-jsonl``: ``{"question": ..., "answer"|"answers": [...]}`` per line.
- ``kilt``: ``{"id", "input", "output": [{"answer": ..., "provenance": [{"title": ...}]}]}``.
- ``jsonl``: generic ``{"input": ..., "target"|"targets": ...}`` (generation, e.g. Jeopardy).
- ``auto``: picked from the suffix (``.tsv``) or the keys of the first record.

Answers written as regular expressions (CuratedTrec's convention) are kept as text; the record's
``regex`` flag says how to match them. FEVER is read from KILT files whose answers are labels
("SUPPORTS"/"REFUTES", "NOT ENOUGH INFO" for the 3-way task).

Every reader raises a one-line :class:`MarginError` naming ``file:line`` and the fix, and reads
nothing lazily: a malformed line is reported before any work starts. An input over
``MAX_INPUT_CHARS`` characters is such a line: refused rather than cut, because a cut question
is another question (its score, or what training learns from it, would not be the data set's);
``skip_bad_lines`` drops it. Inputs under the bound but too long for the generator are cut, with
a warning, by :class:`margin.rag.RAG` (``MAX_QUESTION_WORDS``, ``MAX_QUESTION_CHARS``).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from margin.errors import MarginError

FORMATS = ("auto", "dpr-tsv", "dpr-jsonl", "kilt", "jsonl")
TASKS = ("qa", "generation", "fever")
FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
MAX_INPUT_CHARS = 10_000  # a longer input is no question but a misformatted line: refused


@dataclass(frozen=True)
class Example:
    """One input with its gold outputs (the first is the training target)."""

    id: str  # the record's own id, else "<file name>:<line>"
    input: str  # question, claim or prompt
    answers: tuple[str, ...]  # gold answers / targets / FEVER label; never empty
    provenance: tuple[str, ...] = ()  # gold Wikipedia titles (KILT), for R-precision
    regex: bool = False  # answers are regular expressions (CuratedTrec)

    @property
    def target(self) -> str:
        """The training target: the first gold answer."""
        return self.answers[0]


def read_examples(
    path: str | Path,
    format: str = "auto",
    task: str = "qa",
    limit: int | None = None,
    skip_bad_lines: bool = False,
    regex: bool = False,
) -> list[Example]:
    """Read up to ``limit`` examples of ``task`` from ``path``.

    With ``skip_bad_lines`` malformed lines are dropped (their count is in
    :func:`read_examples_counted`); otherwise the first one raises a :class:`MarginError`.
    """
    return read_examples_counted(path, format, task, limit, skip_bad_lines, regex)[0]


def read_examples_counted(
    path: str | Path,
    format: str = "auto",
    task: str = "qa",
    limit: int | None = None,
    skip_bad_lines: bool = False,
    regex: bool = False,
) -> tuple[list[Example], int]:
    """Like :func:`read_examples`, and also the number of malformed lines skipped."""
    path = Path(path)
    if format not in FORMATS:
        raise MarginError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if task not in TASKS:
        raise MarginError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if not path.is_file():
        raise MarginError(f"{path}: no such file; give the path to a data file")
    if limit is not None and limit < 1:
        raise MarginError(f"limit must be at least 1, got {limit}")
    fmt = detect_format(path) if format == "auto" else format
    examples: list[Example] = []
    skipped = 0
    for lineno, line in _lines(path):
        if limit is not None and len(examples) >= limit:
            break
        try:
            ex = _parse(fmt, line, f"{path.name}:{lineno}", regex)
            _check_task(ex, task)
            _check_length(ex)
        except _BadLine as bad:
            if not skip_bad_lines:
                raise MarginError(f"{path}:{lineno}: {bad}") from None
            skipped += 1
            continue
        examples.append(ex)
    if not examples:
        raise MarginError(f"{path}: no examples found; the file is empty or every line is bad")
    return examples, skipped


def detect_format(path: Path) -> str:
    """The format of ``path``: ``dpr-tsv`` by suffix, else from the first record's keys."""
    if path.suffix.lower() in (".tsv", ".csv", ".txt"):
        return "dpr-tsv"
    for lineno, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if "\t" in line:
                return "dpr-tsv"
            raise MarginError(
                f"{path}:{lineno}: cannot tell the format (neither JSON nor TAB-separated); "
                f"pass --format, one of {', '.join(FORMATS[1:])}"
            ) from None
        if not isinstance(record, dict):
            break
        if "output" in record and "input" in record:
            return "kilt"
        if "question" in record:
            return "dpr-jsonl"
        if "input" in record:
            return "jsonl"
        break
    else:  # not one line to read
        raise MarginError(f"{path}: no examples found; the file is empty (or only blank lines)")
    raise MarginError(
        f"{path}: cannot tell the format from the first record; "
        f"pass --format, one of {', '.join(FORMATS[1:])}"
    )


class _BadLine(ValueError):
    """A malformed line; the caller adds file:line."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for the non-blank lines of a UTF-8 file."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError:
        raise MarginError(_not_utf8(path)) from None


def _not_utf8(path: Path) -> str:
    """The one-line error for a file that is not UTF-8, naming its first bad line and byte.

    The text reader decodes in blocks, so its error has no line: the file is read again, by
    lines (a newline byte is never inside a UTF-8 sequence, so each line decodes on its own).
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); re-encode the file as UTF-8"
                )
    return f"{path}: not UTF-8 text; re-encode the file as UTF-8"


def _parse(fmt: str, line: str, where: str, regex: bool) -> Example:
    if fmt == "dpr-tsv":
        return _parse_dpr_tsv(line, where, regex)
    record = _json_record(line)
    if fmt == "dpr-jsonl":
        question = _text_field(record, "question")
        answers = _answer_list(record.get("answers", record.get("answer")), "answer")
        return Example(str(record.get("id", where)), question, answers, regex=regex)
    if fmt == "kilt":
        outputs = record.get("output")
        if not isinstance(outputs, list) or not outputs:
            raise _BadLine("no 'output' list; a KILT record needs output: [{\"answer\": ...}]")
        answers = tuple(
            str(o["answer"]).strip() for o in outputs
            if isinstance(o, dict) and str(o.get("answer", "")).strip()
        )
        if not answers:
            raise _BadLine("no answer in 'output'; give at least one {\"answer\": ...}")
        titles = tuple(
            dict.fromkeys(
                str(p["title"]) for o in outputs if isinstance(o, dict)
                for p in o.get("provenance") or [] if isinstance(p, dict) and p.get("title")
            )
        )
        return Example(str(record.get("id", where)), _text_field(record, "input"), answers, titles)
    targets = record.get("targets", record.get("target"))
    answers = _answer_list(targets, "target")
    return Example(str(record.get("id", where)), _text_field(record, "input"), answers)


def _parse_dpr_tsv(line: str, where: str, regex: bool) -> Example:
    question, sep, answers_field = line.partition("\t")
    if not sep or not question.strip():
        raise _BadLine("expected 'question<TAB>[answers]'; separate the question with a TAB")
    field = answers_field.strip()
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        field = field[1:-1].replace('""', '"')  # CSV-quoted list
    try:
        value = ast.literal_eval(field)
    except (ValueError, SyntaxError):
        raise _BadLine(
            f"answers {_clip(field)} are not a Python list of strings; write them like ['a', 'b']"
        ) from None
    return Example(where, question.strip(), _answer_list(value, "answer"), regex=regex)


def _json_record(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"not valid JSON ({exc.msg}); fix that line or remove it") from None
    if not isinstance(record, dict):
        raise _BadLine("expected a JSON object per line")
    return record


def _text_field(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _BadLine(f"missing or empty {key!r}; every line needs a non-empty {key!r} string")
    return value.strip()


def _answer_list(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise _BadLine(f"no {name}s; give a non-empty list of {name} strings")
    answers = tuple(str(a).strip() for a in value if str(a).strip())
    if not answers:
        raise _BadLine(f"no {name}s; give a non-empty list of {name} strings")
    return answers


def _check_task(ex: Example, task: str) -> None:
    """FEVER files carry labels, QA files answers: refuse a file read as the other task."""
    labels = all(a.upper() in FEVER_LABELS for a in ex.answers)
    if task == "fever" and not labels:
        raise _BadLine(
            f"answer {_clip(ex.answers[0])} is not a FEVER label ({', '.join(FEVER_LABELS)}); "
            "is this a QA file? use --task qa"
        )
    if task != "fever" and labels:
        raise _BadLine(f"answers are FEVER labels ({ex.answers[0]}); use --task fever")


def _check_length(ex: Example) -> None:
    if len(ex.input) > MAX_INPUT_CHARS:
        raise _BadLine(
            f"the input is {len(ex.input)} characters, over {MAX_INPUT_CHARS}: not a question "
            f"(a misformatted line?); shorten it or remove that line"
        )


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
