"""Positives and hard negatives for contrastive retriever training, by distant supervision.

DPR (Karpukhin et al., 2020, Sec. 3.2 and 5.2) trains on (question, positive passage, negative
passages) triples. Without gold passages, a positive is found by distant supervision: a passage
of the index whose text holds a normalised gold answer (DPR's ``has_answer``, the rule
``margin eval`` counts answer recall with: margin.evaluation.metrics), among the top ``depth``
candidates of the current dense retriever and of BM25. A hard negative is a highly ranked
candidate that holds no gold answer: the passages the retriever confuses with the right one (DPR
drew them from BM25; ANCE, Xiong et al. 2021, from the dense retriever itself: margin takes both).

The candidates of one question are its dense and BM25 rankings interleaved (dense 1, BM25 1,
dense 2, BM25 2, ...; a passage already seen is skipped: :func:`interleave`). Its hard negatives
are the first ``hard_negatives`` candidates without an answer (:func:`label`). Its positive is
chosen by one of two rules (``positives``):

- ``"interleaved"`` (the default): the first candidate with an answer. Often the current dense
  retriever's own favourite, which may merely contain the answer string.
- ``"bm25"``: DPR's rule for its distantly supervised sets (Sec. 5.1): the best-ranked BM25
  candidate with an answer (:func:`first_answer`). BM25 needs words of the question in the
  passage, so its answer-bearing top passage is usually about the question. A question whose
  BM25 candidates hold no answer is skipped, even when a dense candidate holds one.

A question without a positive is skipped and counted. Everything is a row of the index's passage
store: an index refreshed with a new passage encoder keeps the rows (margin.retrieval.refresh),
so a mining stays valid across a swap.

    >>> dense = search_rows(index, vectors, depth=100)                  # doctest: +SKIP
    >>> sparse = search_rows(bm25, [e.input for e in examples], depth=100)  # doctest: +SKIP
    >>> mining = mine(examples, dense, index.store, 1, sparse, positives="bm25")  # doctest: +SKIP
    >>> mining.skipped, mining.questions[0].positive                    # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from margin._io import write_json_atomic
from margin.errors import MarginError
from margin.evaluation.examples import Example
from margin.evaluation.metrics import answer_needles, has_answer, padded_normal
from margin.retrieval.reader import LoadedIndex
from margin.retrieval.store import PassageStore

MINING_FORMAT = "margin-mining"
Positives = Literal["interleaved", "bm25"]  # the rule a question's positive is chosen by
POSITIVES: tuple[str, ...] = get_args(Positives)
_CHUNK = 256  # questions whose candidates' texts are read from the store in one go


@dataclass(frozen=True)
class Mined:
    """One training question with its distant supervision (rows of the index's passage store)."""

    example: int  # the question's position in the training examples
    positive: int  # the best-ranked candidate whose text holds a gold answer
    negatives: tuple[int, ...]  # the best-ranked candidates without one (hard negatives)


@dataclass(frozen=True)
class Mining:
    """What :func:`mine` found for a training set."""

    questions: list[Mined]  # the questions with a positive, in the examples' order
    skipped: int  # questions with no positive among their candidates
    depth: int  # candidates taken from each retriever
    sources: tuple[str, ...]  # the retrievers the candidates came from: "dense", "bm25"
    positives: Positives = "interleaved"  # the rule the positives were chosen by (POSITIVES)

    def save(self, path: str | Path) -> None:
        """Write it as JSON, atomically (``OUT/mining-step<N>.json`` of a run)."""
        write_json_atomic(Path(path), {
            "format": MINING_FORMAT, "version": 1, "skipped": self.skipped, "depth": self.depth,
            "sources": list(self.sources), "positives": self.positives,
            "questions": [[m.example, m.positive, list(m.negatives)] for m in self.questions],
        })

    @classmethod
    def load(cls, path: str | Path) -> Mining:
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
            if record.get("format") != MINING_FORMAT:
                raise ValueError(record.get("format"))
            questions = [Mined(int(e), int(p), tuple(int(n) for n in negs))
                         for e, p, negs in record["questions"]]
            positives = record.get("positives", "interleaved")  # older files: the only rule
            if positives not in POSITIVES:
                raise ValueError(f"positives {positives!r}")
            return cls(questions, int(record["skipped"]), int(record["depth"]),
                       tuple(record["sources"]), positives)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MarginError(f"{path} is not a mining this margin wrote ({exc}); "
                              "start the run again in a new --out") from None


def interleave(*rankings: Sequence[int]) -> list[int]:
    """The candidates of several rankings, rank by rank (first of each, then second ...),
    each passage once; rows below 0 (FAISS's "no result") are dropped."""
    seen: dict[int, None] = {}
    for rank in range(max((len(r) for r in rankings), default=0)):
        for ranking in rankings:
            if rank < len(ranking) and int(ranking[rank]) >= 0:
                seen.setdefault(int(ranking[rank]), None)
    return list(seen)


def label(
    candidates: Sequence[int], texts: Sequence[str], example: Example, hard_negatives: int,
    normal: Sequence[str] | None = None,
) -> tuple[int | None, tuple[int, ...]]:
    """The positive (first candidate whose text holds a gold answer; None if none does) and the
    first ``hard_negatives`` candidates without one. ``texts[i]`` is ``candidates[i]``'s text;
    ``normal[i]`` the same text as :func:`~margin.evaluation.metrics.padded_normal` gives it,
    when the caller normalised each passage once for many questions (the same answer as
    ``has_answer``, without normalising a passage per question)."""
    positive: int | None = None
    negatives: list[int] = []
    needles = answer_needles(example.answers)
    for i, (row, text) in enumerate(zip(candidates, texts, strict=True)):
        if _holds(example, text, None if normal is None else normal[i], needles):
            positive = row if positive is None else positive
        elif len(negatives) < hard_negatives:
            negatives.append(row)
        if positive is not None and len(negatives) == hard_negatives:
            break
    return positive, tuple(negatives)


def first_answer(candidates: Sequence[int], texts: Sequence[str], example: Example,
                 normal: Sequence[str] | None = None) -> int | None:
    """The first candidate whose text holds a gold answer (None if none does); ``texts`` and
    ``normal`` as for :func:`label`."""
    needles = answer_needles(example.answers)
    for i, (row, text) in enumerate(zip(candidates, texts, strict=True)):
        if _holds(example, text, None if normal is None else normal[i], needles):
            return row
    return None


def _holds(example: Example, text: str, normal: str | None, needles: Sequence[str]) -> bool:
    """Whether ``text`` holds one of ``example``'s answers (``has_answer``; with ``normal``, the
    text already normalised, by the answers' ``needles`` alone)."""
    if example.regex or normal is None:
        return has_answer([text], example.answers, example.regex)
    return any(n in normal for n in needles)


def search_rows(index: LoadedIndex, queries: np.ndarray | Sequence[str], depth: int,
                batch: int = 256) -> np.ndarray:
    """The top ``depth`` rows of ``index`` for each query (vectors for a dense index, strings
    for BM25), in batches: ``(n, depth)`` int64, -1 where the index holds fewer."""
    depth = min(depth, index.manifest.passages)
    parts = [index.search(queries[i : i + batch], depth).rows  # (batch, depth)
             for i in range(0, len(queries), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, depth), dtype=np.int64)


def mine(
    examples: Sequence[Example],
    dense_rows: np.ndarray,
    store: PassageStore,
    hard_negatives: int,
    bm25_rows: np.ndarray | None = None,
    which: Sequence[int] | None = None,
    progress: bool = False,
    positives: Positives = "interleaved",
) -> Mining:
    """Label examples from their dense (and BM25) candidates: ``dense_rows`` and ``bm25_rows``
    are ``(n, depth)`` rankings of ``store``'s rows (:func:`search_rows`), one per example of
    ``which`` (positions in ``examples``; None: every example). ``positives``: the rule a
    positive is chosen by (the module's docstring); "bm25" needs ``bm25_rows``."""
    from tqdm.auto import tqdm

    if positives not in POSITIVES:
        raise MarginError(f"unknown positives rule {positives!r}; use 'interleaved' or 'bm25'")
    if positives == "bm25" and bm25_rows is None:
        raise MarginError("positives 'bm25' needs BM25 rankings; give a BM25 index of the same "
                          "passages (--bm25-index) or use --positives interleaved")
    positions = list(range(len(examples))) if which is None else list(which)
    if len(dense_rows) != len(positions) or (bm25_rows is not None
                                             and len(bm25_rows) != len(positions)):
        raise ValueError("one ranking per mined example")
    questions: list[Mined] = []
    skipped = 0
    bar = tqdm(total=len(positions), desc="mining positives", unit="question",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(positions), _CHUNK):
        chunk = range(start, min(start + _CHUNK, len(positions)))
        candidates = [interleave(*([dense_rows[j]] if bm25_rows is None
                                   else [dense_rows[j], bm25_rows[j]])) for j in chunk]
        rows = np.unique(np.fromiter((r for c in candidates for r in c), dtype=np.int64))
        text_of = dict(zip(rows.tolist(), (p.text for p in store.get(rows)), strict=True))
        normal_of = {row: padded_normal(text) for row, text in text_of.items()}  # once a chunk
        for j, found in zip(chunk, candidates, strict=True):
            example = examples[positions[j]]
            positive, negatives = label(found, [text_of[r] for r in found], example,
                                        hard_negatives, [normal_of[r] for r in found])
            if positives == "bm25":
                assert bm25_rows is not None
                ranked = [int(r) for r in bm25_rows[j] if r >= 0]  # all among the candidates
                positive = first_answer(ranked, [text_of[r] for r in ranked], example,
                                        [normal_of[r] for r in ranked])
            if positive is None:
                skipped += 1
            else:
                questions.append(Mined(positions[j], positive, negatives))
        bar.update(len(chunk))
    bar.close()
    sources = ("dense",) if bm25_rows is None else ("dense", "bm25")
    return Mining(questions, skipped, int(dense_rows.shape[1]), sources, positives)


def renew(old: Mining, fresh: Mining) -> Mining:
    """``old``'s questions, in its order, with ``fresh``'s positive and hard negatives where
    ``fresh`` found a positive (after an index refresh); the rest keep theirs. The training set
    keeps its size, so the data order of a run does not change mid-run. Both must be mined by
    the same rule (``positives``)."""
    if fresh.positives != old.positives:
        raise ValueError(f"renewing a {old.positives!r} mining with a {fresh.positives!r} one")
    found = {m.example: m for m in fresh.questions}
    questions = [found.get(m.example, m) for m in old.questions]
    return Mining(questions, old.skipped, old.depth, old.sources, old.positives)
