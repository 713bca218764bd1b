"""Metrics on hand-worked cases, and BLEU/ROUGE against the reference libraries."""

from __future__ import annotations

import math

import pytest

from margin.errors import MarginError
from margin.evaluation import metrics as M


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("U.S.A.", "usa"),  # punctuation goes before the article pass
        ("a-ha", "aha"),
        ("An apple a day", "apple day"),
        ("theatre", "theatre"),  # articles only as whole words
        ("  Mixed\tCASE\nwords ", "mixed case words"),
        ("“curly”", "“curly”"),  # SQuAD strips ASCII punctuation only
        ("the", ""),
    ],
)
def test_squad_normalisation(text, expected):
    assert M.normalize_answer(text) == expected


def test_exact_match_is_the_max_over_golds():
    assert M.exact_match("The Eiffel Tower.", ["tower", "eiffel tower"]) == 1.0
    assert M.exact_match("Eiffel", ["tower", "eiffel tower"]) == 0.0
    assert M.exact_match("", ["the"]) == 1.0  # both normalise to nothing (SQuAD's behaviour)


def test_token_f1_hand_worked():
    # pred {tower, in, paris}, gold {eiffel, tower}: 1 in common, P = 1/3, R = 1/2, F1 = 0.4
    assert M.token_f1("tower in Paris", ["the Eiffel tower"]) == pytest.approx(0.4)
    # max over golds: the second gold matches exactly
    assert M.token_f1("tower in Paris", ["the Eiffel tower", "Tower in paris"]) == 1.0
    # repeated tokens are counted with multiplicity: {a: 2} vs {a: 1} -> P 1/2, R 1, F1 2/3
    assert M.token_f1("yes yes", ["yes"]) == pytest.approx(2 / 3)
    assert M.token_f1("", ["paris"]) == 0.0
    assert M.token_f1("the", ["a"]) == 0.0  # both empty after normalisation: SQuAD v1.1 gives 0


def test_regex_golds_follow_drqa():
    assert M.exact_match("Ivanov lives", ["ivan(ov)?"], regex=True) == 1.0  # anchored at start
    assert M.exact_match("mr ivanov", ["ivan(ov)?"], regex=True) == 0.0
    assert M.exact_match("1914", ["19(14|15)", "["], regex=True) == 1.0  # "[" does not compile
    assert M.exact_match("x", ["["], regex=True) == 0.0
    assert M.token_f1("Ivanov", ["ivan(ov)?"], regex=True) == 1.0


def test_has_answer_matches_whole_normalised_words():
    passages = ["Paris is the capital.", "The parish church near The Eiffel Tower, 1889."]
    assert M.has_answer(passages, ["Paris"])
    assert not M.has_answer(passages[1:], ["paris"])  # "parish" is not "paris"
    assert M.has_answer(passages[1:], ["the eiffel tower"])  # punctuation and articles dropped
    assert not M.has_answer(passages, ["The"])  # normalises to nothing: never matches
    assert M.has_answer(passages, [r"capit\w+"], regex=True)
    assert not M.has_answer(passages, ["["], regex=True)


def test_answer_recall_at_k_looks_at_the_top_k_only():
    ranked = ["berlin is in germany", "rome is in italy", "paris is in france"]
    assert [M.answer_recall_at_k(ranked, ["Paris"], k) for k in (1, 2, 3)] == [0.0, 0.0, 1.0]
    with pytest.raises(MarginError):
        M.answer_recall_at_k(ranked, ["Paris"], 0)


def test_kilt_r_precision_counts_pages_once():
    # R = 2 gold pages; distinct retrieved pages A, B, C; top 2 = A, B; one of them gold
    assert M.r_precision(["A", "A", "B", "C"], ["B", "C"]) == 0.5
    assert M.r_precision(["B", "C", "A"], ["C", "B"]) == 1.0
    with pytest.raises(MarginError):
        M.r_precision(["A"], [])


def test_bleu_against_sacrebleu_and_by_hand():
    import sacrebleu

    hyps = ["the cat sat on the mat", "a quick brown fox jumps"]
    refs = [["the cat is on the mat"], ["the quick brown fox jumps over the dog"]]
    # one example by hand: clipped unigram matches the x2, cat, on, mat = 5 of 6, BP = 1
    assert M.bleu(hyps[:1], refs[:1], order=1) == pytest.approx(5 / 6)
    expected = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]]).score / 100
    assert M.bleu(hyps, refs, order=4) == pytest.approx(expected)
    bleu1 = sacrebleu.metrics.BLEU(max_ngram_order=1)
    assert M.bleu(hyps, refs, order=1) == pytest.approx(
        bleu1.corpus_score(hyps, [[r[0] for r in refs]]).score / 100
    )


def test_bleu_with_a_varying_number_of_references():
    import sacrebleu

    hyps = ["the cat sat", "a dog ran"]
    refs = [["the cat sat", "a cat sat"], ["the dog ran"]]
    streams = [["the cat sat", "the dog ran"], ["a cat sat", None]]
    expected = sacrebleu.metrics.BLEU(max_ngram_order=1).corpus_score(hyps, streams).score / 100
    assert M.bleu(hyps, refs, order=1) == pytest.approx(expected)
    with pytest.raises(MarginError):
        M.bleu(hyps, refs[:1])


def test_rouge_l_against_rouge_score_and_by_hand():
    from rouge_score import rouge_scorer

    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 each
    assert M.rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(
        5 / 6
    )
    hyps = ["paris is the capital", "berlin"]
    refs = [["the capital is paris", "paris"], ["berlin germany"]]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [max(scorer.score(r, h)["rougeL"].fmeasure for r in rs) for h, rs in
                zip(hyps, refs, strict=True)]
    assert M.rouge_l(hyps, refs) == pytest.approx(sum(expected) / 2)


def test_qbleu_components_follow_the_reference_script():
    parts = M.qbleu_components("Who wrote the novel Moby Dick?")
    assert parts == {
        "ner": ["Moby", "Dick?"],  # capitalised, the leading question word skipped
        "qt": ["Who"],
        "re": ["wrote", "novel"],
        "sw": ["the"],
    }
    # "what"/"which" carry the next word (the answer type) into the question type
    assert M.qbleu_components("which river flows")["qt"] == ["which", "river"]


def test_qbleu1_worked_example():
    hyp, ref = "Who wrote Moby Dick?", "Who wrote the novel Moby Dick?"
    # classes: ner moby dick / moby dick -> F 1; qt who / who -> F 1;
    # re [wrote] vs [wrote, novel]: P = 1 * exp(1 - 2/1), R = 1/2 -> F = 2PR/(P+R);
    # sw [] vs [the] -> 0
    p, r = math.exp(-1), 0.5
    answerability = 0.6 * 1 + 0.2 * 1 + 0.1 * (2 * p * r / (p + r)) + 0.1 * 0
    assert M.answerability(hyp, ref) == pytest.approx(answerability)
    # BLEU-1 of the words: 4 of 4 match, BP = exp(1 - 6/4)
    bleu1 = math.exp(1 - 6 / 4)
    expected = 0.7 * answerability + 0.3 * bleu1
    assert M.qbleu1([hyp], [[ref]]) == pytest.approx(expected)
    assert expected == pytest.approx(0.7716, abs=1e-4)
    # the best reference counts; an identical question scores 0.9 (its empty classes give 0)
    assert M.qbleu1([hyp], [["Where is Paris?", hyp]]) == pytest.approx(
        0.7 * (0.6 + 0.2 + 0.1) + 0.3
    )


def test_fever_accuracies():
    golds = ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO", "REFUTES"]
    assert M.label_accuracy(["supports", "SUPPORTS", "not  enough info", "REFUTES"], golds) == 0.75
    # 2-way: the NOT ENOUGH INFO claim is left out; 2 of 3 right
    assert M.two_way_accuracy(["SUPPORTS", "SUPPORTS", "REFUTES", "REFUTES"], golds) == (
        pytest.approx(2 / 3)
    )
    assert M.two_way_accuracy(["SUPPORTS"], ["NOT ENOUGH INFO"]) is None
