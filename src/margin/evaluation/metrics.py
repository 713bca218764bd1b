"""The metrics of the paper's tasks (Sec. 3), as small pure functions.

Why one module: every number ``margin eval`` reports comes from here, so each function can be
checked against a hand-worked case or the reference tool (tests/test_metrics.py). Scores are
fractions in [0, 1]; reports print them x100, as the paper does.

- Open-domain QA (Table 1): exact match and token F1 after SQuAD answer normalisation (lowercase,
  drop punctuation and the articles a/an/the, collapse whitespace), the max over the gold answers.
  Gold answers given as regular expressions (CuratedTrec) are matched as regexes instead.
- Retrieval: answer recall@k (a gold answer occurs in one of the top-k passages, DPR's "top-k
  accuracy") and KILT R-precision over gold provenance pages.
- Generation (Tables 2-3): BLEU-1/BLEU-4 (``sacrebleu``), ROUGE-L (``rouge-score``) and
  Q-BLEU-1 (Nema & Khapra, 2018), which the paper uses for Jeopardy question generation.
- FEVER (Table 4): label accuracy, 3-way and 2-way.

    >>> exact_match("The Eiffel Tower!", ["eiffel tower"])
    1.0
    >>> round(token_f1("tower in Paris", ["the Eiffel tower"]), 3)
    0.4
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from margin.errors import MarginError, require

_EVAL_EXTRA = "pip install 'margin[eval]'"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)

# -- QA: SQuAD normalisation, exact match, token F1 -------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lowercase, remove punctuation, articles, extra whitespace.

    The steps run in SQuAD's order, so "The U.S.A." becomes "usa" and "a-ha" becomes "aha".
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def regex_match(prediction: str, pattern: str) -> bool:
    """Whether ``prediction`` matches the gold regular expression ``pattern`` (CuratedTrec).

    DrQA's convention, which DPR and RAG reuse: case-insensitive ``re.match`` (anchored at the
    start of the prediction, not at its end). A pattern that does not compile matches nothing.
    """
    try:
        compiled = re.compile(pattern, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except re.error:
        return False
    return compiled.match(prediction) is not None


def exact_match(prediction: str, golds: Sequence[str], regex: bool = False) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer (or matches a gold
    regex), else 0.0: the max over golds of SQuAD's exact match."""
    if regex:
        return float(any(regex_match(prediction, g) for g in golds))
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0  # SQuAD v1.1: also when both are empty
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str], regex: bool = False) -> float:
    """SQuAD's token F1 between normalised bags of words, max over gold answers.

    F1 = 2PR / (P + R), with P and R the shares of predicted and gold tokens in common.
    A regex gold has no tokens: F1 is then the exact match.
    """
    if regex:
        return exact_match(prediction, golds, regex=True)
    return max(_f1(prediction, g) for g in golds)


# -- retrieval: answer recall@k, KILT R-precision ---------------------------------------------


def has_answer(passages: Sequence[str], golds: Sequence[str], regex: bool = False) -> bool:
    """Whether a gold answer occurs in one of the passages (DPR's ``has_answer``).

    Text golds: the normalised answer's tokens appear as a contiguous run of the normalised
    passage's tokens (whole words only: "paris" is not in "parish"). Regex golds: a
    case-insensitive ``re.search`` in the raw passage text. Golds that normalise to nothing never
    match.
    """
    if regex:
        compiled = []
        for g in golds:
            try:
                compiled.append(re.compile(g, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE))
            except re.error:
                continue
        return any(c.search(p) for c in compiled for p in passages)
    needles = answer_needles(golds)
    texts = [padded_normal(p) for p in passages]
    return any(n in t for n in needles for t in texts)


def answer_needles(golds: Sequence[str]) -> list[str]:
    """The text golds as :func:`has_answer` looks for them: normalised, padded with a space on
    each side (whole words), those that normalise to nothing left out."""
    return [f" {n} " for n in (normalize_answer(g) for g in golds) if n]


def padded_normal(text: str) -> str:
    """A passage as :func:`has_answer` searches it: normalised, padded with a space each side.
    Normalise a passage once and test many questions' :func:`answer_needles` against it."""
    return f" {normalize_answer(text)} "


def answer_recall_at_k(
    passages: Sequence[str], golds: Sequence[str], k: int, regex: bool = False
) -> float:
    """1.0 if a gold answer occurs in the top ``k`` of the ranked ``passages``, else 0.0."""
    if k < 1:
        raise MarginError(f"k must be at least 1, got {k}")
    return float(has_answer(passages[:k], golds, regex))


def r_precision(retrieved_titles: Sequence[str], gold_titles: Sequence[str]) -> float:
    """KILT R-precision: with R gold provenance pages, the share of the top R distinct retrieved
    pages that are gold (Petroni et al., 2021). Passages of one page count once."""
    gold = set(gold_titles)
    if not gold:
        raise MarginError("R-precision needs at least one gold provenance title")
    pages = list(dict.fromkeys(retrieved_titles))[: len(gold)]
    return sum(p in gold for p in pages) / len(gold)


# -- generation: BLEU, ROUGE-L, Q-BLEU-1 ------------------------------------------------------


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's reference streams (None where one is short)."""
    width = max(len(r) for r in references)
    return [[r[i] if i < len(r) else None for r in references] for i in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], order: int = 4) -> float:
    """Corpus BLEU with n-grams up to ``order`` (BLEU-1 is ``order=1``), by ``sacrebleu``.

    BLEU = BP · exp(Σ_n (1/N) log p_n), clipped n-gram precisions p_n over the corpus and the
    brevity penalty BP (Papineni et al., 2002); sacrebleu's 13a tokenisation, several references
    per example allowed. Returned in [0, 1] (sacrebleu's score / 100).
    """
    sacrebleu = require("sacrebleu", _EVAL_EXTRA)
    _check_pairs(hypotheses, references)
    metric = sacrebleu.metrics.BLEU(max_ngram_order=order)  # type: ignore[attr-defined]
    return metric.corpus_score(list(hypotheses), _reference_streams(references)).score / 100


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence, Lin 2004) by ``rouge-score``, the max
    over each example's references."""
    rouge_scorer = require("rouge_score.rouge_scorer", _EVAL_EXTRA)
    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # type: ignore[attr-defined]
    scores = [
        scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return sum(scores) / len(scores)


# Q-BLEU's word classes, as in Nema & Khapra's reference script (answerability_score.py).
QUESTION_WORDS = frozenset(
    w for q in ("what", "which", "why", "who", "whom", "whose", "where", "when", "how")
    for w in (q, q.capitalize())
)
STOP_WORDS = frozenset(
    """did have ourselves hers between yourself but again there about once during out very having
    with they own an be some for do its yours such into of most itself other off is s am or as
    from him each the themselves until below are we these your his through don nor me were her
    more himself this down should our their while above both up to ours had she all no at any
    before them same and been in will on does yourselves then that because over so can not now
    under he you herself has just too only myself those i after few t being if theirs my against
    a by doing it further was here than""".split()
)
QBLEU_WEIGHTS = {"ner": 0.6, "qt": 0.2, "re": 0.1, "sw": 0.1}  # the reference script's defaults
QBLEU_DELTA = 0.7  # weight of answerability; 1 - delta goes to BLEU-1


def qbleu_components(question: str) -> dict[str, list[str]]:
    """Split a question into Q-BLEU's four word classes (Nema & Khapra, 2018, Sec. 4).

    On whitespace tokens, case-sensitive, as the reference script does: ``qt`` question words
    and the word after "what"/"which" (it names the answer type); ``ner`` capitalised words
    (named entities), skipping a leading question word; ``re`` relevant content words (neither
    question type, capitalised nor stop words); ``sw`` stop words, lowercased.
    """
    words = question.split()
    qt = []
    for i, w in enumerate(words):
        if w in QUESTION_WORDS:
            qt.append(w)
            if i + 1 < len(words) and w.lower() in ("what", "which"):
                qt.append(words[i + 1])
    body = words[1:] if words and words[0].lower() in QUESTION_WORDS else words
    return {
        "ner": [w for w in body if w[0].isupper()],
        "qt": qt,
        "re": [w for w in words if w not in qt and not w[0].isupper() and w not in STOP_WORDS],
        "sw": [w.lower() for w in words if w.lower() in STOP_WORDS],
    }


def _words(tokens: Sequence[str]) -> list[str]:
    """Lowercased word tokens without punctuation (what the reference's PTB tokenizer leaves)."""
    return re.findall(r"\w+(?:'\w+)?", " ".join(tokens).lower())


def unigram_bleu(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """Sentence BLEU-1 of token lists: clipped unigram precision times the brevity penalty
    BP = exp(1 - r/c) when the hypothesis is shorter (c < r). 0 for an empty hypothesis."""
    if not hypothesis:
        return 0.0
    matched = sum((Counter(hypothesis) & Counter(reference)).values())
    c, r = len(hypothesis), len(reference)
    return matched / c * (1.0 if c >= r else math.exp(1 - r / c))


def answerability(hypothesis: str, reference: str) -> float:
    """Nema & Khapra's answerability of a generated question against its reference, in [0, 1].

    For each word class i (see :func:`qbleu_components`) the F-score of the class's words is
    F_i = 2 P_i R_i / (P_i + R_i), with P_i the BLEU-1 of hypothesis vs reference and R_i the
    BLEU-1 of reference vs hypothesis; answerability = Σ_i w_i F_i with the weights
    ``QBLEU_WEIGHTS``. A class empty on either side scores 0, as in the reference script.
    """
    hyp, ref = qbleu_components(hypothesis), qbleu_components(reference)
    total = 0.0
    for name, weight in QBLEU_WEIGHTS.items():
        h, r = _words(hyp[name]), _words(ref[name])
        p, rec = unigram_bleu(h, r), unigram_bleu(r, h)
        total += weight * (2 * p * rec / (p + rec) if p + rec > 0 else 0.0)
    return total


def qbleu1(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Q-BLEU-1 (Nema & Khapra, 2018): mean over examples of
    δ · answerability + (1 − δ) · BLEU-1, δ = ``QBLEU_DELTA``.

    Sentence-level, as the reference script computes it; with several references an example
    takes its best one. BLEU-1 here is :func:`unigram_bleu` on the lowercased words.
    """
    _check_pairs(hypotheses, references)
    scores = [
        max(
            QBLEU_DELTA * answerability(hyp, ref)
            + (1 - QBLEU_DELTA) * unigram_bleu(_words([hyp]), _words([ref]))
            for ref in refs
        )
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return sum(scores) / len(scores)


def _check_pairs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise MarginError(
            f"got {len(hypotheses)} hypotheses and {len(references)} reference lists; "
            "give one non-empty list of references per hypothesis"
        )
    if any(not refs for refs in references):
        raise MarginError("an example has no reference; give at least one per hypothesis")


# -- FEVER ------------------------------------------------------------------------------------

FEVER_2WAY = ("SUPPORTS", "REFUTES")  # the 2-way task drops NOT ENOUGH INFO claims


def label_accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Share of predicted labels equal to the gold label (case and spacing ignored)."""
    if len(predictions) != len(golds) or not golds:
        raise MarginError(f"got {len(predictions)} predictions for {len(golds)} gold labels")
    same = [_label(p) == _label(g) for p, g in zip(predictions, golds, strict=True)]
    return sum(same) / len(same)


def two_way_accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float | None:
    """FEVER 2-way accuracy: label accuracy over the claims whose gold label is SUPPORTS or
    REFUTES (predictions from a SUPPORTS/REFUTES choice). None when there are no such claims."""
    pairs = [(p, g) for p, g in zip(predictions, golds, strict=True) if _label(g) in FEVER_2WAY]
    if not pairs:
        return None
    return label_accuracy([p for p, _ in pairs], [g for _, g in pairs])


def _label(text: str) -> str:
    return " ".join(text.upper().split())
