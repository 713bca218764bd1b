"""End-to-end evaluation on a tiny random BART over a keyword-retrieval fixture corpus.

Retrieval is hand-checkable (tests/helpers.py's KeywordEncoder, BM25 over the same passages);
answers are random, so the tests check what the harness does with them: the files, the metrics
recomputed from the predictions, resuming, the grid, and one-line errors.
"""

from __future__ import annotations

import json

import pytest

from helpers import DOCS, KeywordEncoder, TorchKeywordEncoder, tiny_bart
from margin.cli import main
from margin.errors import MarginError
from margin.evaluation import metrics as M
from margin.evaluation.evaluate import BM25_DOC_SCORE_SCALE, run_eval
from margin.evaluation.grid import EvalConfig, RunSpec, plan_runs
from margin.evaluation.runs import read_predictions
from margin.generation.seq2seq import Seq2SeqFormat, Seq2SeqGenerator
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.passages import split_document
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever

# question<TAB>answers; with the keyword encoder the top passage of each is known:
# "paris france" -> Paris (holds "paris"), "germany river" -> Rhine (holds "rhine"),
# "italy mountain" -> Alps (mountain 1/sqrt2 beats Rome 2/sqrt12: "Rome" only in its title),
# "berlin" -> Berlin; "mountain" -> Alps (no "everest")
QA = [
    ("paris france", ["Paris"]),
    ("germany river", ["the Rhine"]),
    ("italy mountain", ["Rome"]),
    ("berlin", ["Berlin"]),
    ("mountain", ["Everest"]),
]
TOP1_HAS_ANSWER = [True, True, False, True, False]


@pytest.fixture(scope="module")
def rags(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    passages = [
        p for i, d in enumerate(DOCS) for p in split_document(d["title"], d["text"], str(i))
    ]
    build_index(passages, KeywordEncoder(), root / "dense", kind="flat", progress=False)
    build_index(passages, None, root / "bm25", kind="bm25", progress=False)
    model, tok = tiny_bart()
    gen = Seq2SeqGenerator(model, tok, Seq2SeqFormat(max_combined_length=64))
    encoder = TorchKeywordEncoder()
    dense = RAG(gen, Retriever(open_index(root / "dense"), encoder), doc_score_scale=5.0)
    bm25 = dense.with_retriever(Retriever(open_index(root / "bm25")), BM25_DOC_SCORE_SCALE)
    return {"dense": dense, "bm25": bm25, "none": dense}


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("".join(f"{q}\t{a!r}\n" for q, a in QA), encoding="utf-8")
    return path


def config(data, out, **kw) -> EvalConfig:
    kw.setdefault("max_new_tokens", 4)
    return EvalConfig(data=str(data), out=str(out), progress=False, **kw)


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_one_run_writes_predictions_metrics_and_report(rags, qa_file, tmp_path):
    out = tmp_path / "out"
    [result] = run_eval(config(qa_file, out, ks=(1,)), rags)
    records = lines(out / "predictions.jsonl")
    assert [r["question"] for r in records] == [q for q, _ in QA]
    for r, (_, gold), hit in zip(records, QA, TOP1_HAS_ANSWER, strict=True):
        assert r["gold"] == gold
        assert r["metrics"]["exact_match"] == M.exact_match(r["answer"], gold)
        assert r["metrics"]["f1"] == M.token_f1(r["answer"], gold)
        assert r["metrics"]["answer_in_passages"] is hit
        [p] = r["passages"]
        assert p["prior"] == pytest.approx(1.0) and {"id", "title", "text"} <= set(p)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == result
    assert saved["n"] == 5 and saved["k"] == 1 and saved["retriever"] == "dense"
    assert saved["answer_recall@1"] == pytest.approx(3 / 5)
    assert saved["n_answer_retrieved"] == 3
    assert saved["exact_match"] == pytest.approx(
        sum(r["metrics"]["exact_match"] for r in records) / 5
    )
    assert saved["seconds_per_example"] > 0
    report = (out / "report.md").read_text()
    assert "| EM |" in report and "answer recall@1" in report and "paris france" in report


def test_resuming_skips_finished_examples(rags, qa_file, tmp_path, monkeypatch):
    import margin.evaluation.runs as ev

    seen: list[str] = []
    real = ev.predict_runs

    def counting(rag, batch, runs, cfg):
        seen.extend(ex.input for ex in batch)
        return real(rag, batch, runs, cfg)

    monkeypatch.setattr(ev, "predict_runs", counting)
    out = tmp_path / "out"
    run_eval(config(qa_file, out, ks=(2,), limit=2, batch_size=1), rags)
    first = (out / "predictions.jsonl").read_text()
    # a kill mid-write leaves a torn last line; it is dropped and predicted again
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "dev.tsv:3", "quest')
    [result] = run_eval(config(qa_file, out, ks=(2,), batch_size=2), rags)
    assert seen == ["paris france", "germany river", "italy mountain", "berlin", "mountain"]
    text = (out / "predictions.jsonl").read_text()
    assert text.startswith(first) and len(text.splitlines()) == 5
    assert result["n"] == 5
    # a finished run predicts nothing more
    run_eval(config(qa_file, out, ks=(2,)), rags)
    assert len(seen) == 5


def test_runs_sharing_prompts_predict_as_separate_runs(rags, qa_file, tmp_path, monkeypatch):
    """Token and sequence runs of one retriever and k encode each batch once, and give the
    answers each gives alone; resuming predicts only what a run of the group lacks."""

    kw = dict(ks=(2,), decodings=("greedy", "beam"), beams=2)
    modes = ("token", "sequence")
    alone = {}
    for mode in modes:
        run_eval(config(qa_file, tmp_path / mode, modes=(mode,), ks=(2,)), rags)
        alone[mode] = lines(tmp_path / mode / "predictions.jsonl")
    encodings: list[int] = []
    real = rags["dense"].encode_prompts

    def counting(questions, passages):
        encodings.append(len(questions))
        return real(questions, passages)

    monkeypatch.setattr(rags["dense"], "encode_prompts", counting)
    out = tmp_path / "both"
    run_eval(config(qa_file, out, modes=modes, limit=2, batch_size=2, **kw), rags)
    assert encodings == [2]  # one batch, encoded once for its four runs
    (out / "dense-k2-sequence-beam" / "predictions.jsonl").unlink()  # one run lost
    results = run_eval(config(qa_file, out, modes=modes, batch_size=5, **kw), rags)
    assert encodings == [2, 5]  # the lost run needs all five; the others the last three
    assert [r["n"] for r in results] == [5, 5, 5, 5]
    for mode in modes:
        together = lines(out / f"dense-k2-{mode}-greedy" / "predictions.jsonl")
        assert [r["id"] for r in together] == [r["id"] for r in alone[mode]]
        assert [r["answer"] for r in together] == [r["answer"] for r in alone[mode]]
        assert [r["logprob"] for r in together] == pytest.approx(
            [r["logprob"] for r in alone[mode]], abs=1e-5
        )
        assert all(r["seconds"] > 0 for r in together)
    beam = lines(out / "dense-k2-sequence-beam" / "predictions.jsonl")
    assert sorted(r["id"] for r in beam) == [f"dev.tsv:{i}" for i in range(1, 6)]


def test_resuming_with_other_settings_is_refused(rags, qa_file, tmp_path):
    out = tmp_path / "out"
    run_eval(config(qa_file, out, ks=(1,), limit=1), rags)
    with pytest.raises(MarginError, match="k=1, not 2; use another --out"):
        run_eval(config(qa_file, out, ks=(2,), limit=1), rags)


def test_read_predictions_refuses_a_bad_complete_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(MarginError, match=r"predictions.jsonl:2: not valid JSON"):
        read_predictions(path)


def test_ablation_and_k_sweep_write_one_table_and_a_plot(rags, qa_file, tmp_path):
    out = tmp_path / "grid"
    cfg = config(qa_file, out, retrievers=("dense", "bm25", "none"), ks=(1, 2), limit=3)
    results = run_eval(cfg, rags)
    names = ["dense-k1-token-greedy", "dense-k2-token-greedy", "bm25-k1-token-greedy",
             "bm25-k2-token-greedy", "none-greedy"]
    assert [RunSpec(r["retriever"], r["k"], r["mode"], r["decoding"]).name for r in results] == (
        names
    )
    for name in names:
        assert len(lines(out / name / "predictions.jsonl")) == 3
    assert json.loads((out / "metrics.json").read_text())["runs"] == results
    assert (out / "k_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    rows = [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| ")]
    assert rows.count("| dense") == 2 and rows.count("| bm25") == 2 and rows.count("| none") == 1
    assert "k_sweep.png" in report
    closed = lines(out / "none-greedy" / "predictions.jsonl")
    assert all(r["passages"] == [] and "answer_in_passages" not in r["metrics"] for r in closed)
    bm25 = lines(out / "bm25-k2-token-greedy" / "predictions.jsonl")
    # BM25 priors are the softmax of the raw BM25 scores (scale 1)
    import math

    for r in bm25:
        s = [p["score"] for p in r["passages"]]
        z = sum(math.exp(x) for x in s)
        assert [p["prior"] for p in r["passages"]] == pytest.approx([math.exp(x) / z for x in s])


def test_closed_book_uses_the_prompt_without_a_passage(rags, qa_file, tmp_path):
    rag = rags["dense"]
    [answer] = rag.ask_closed_book(["paris france"], max_new_tokens=4)
    inputs = rag.generator.build_inputs(["paris france"], None)
    text = rag.generator.tokenizer.decode(inputs.input_ids[0], skip_special_tokens=True)
    assert text == "paris france"  # the question alone: no title, no " // " separator
    assert answer.passages == [] and answer.logprob <= 0
    out = tmp_path / "cb"
    [result] = run_eval(config(qa_file, out, retrievers=("none",), limit=1), rags)
    assert result["k"] == 0 and "answer_recall@0" not in result
    assert lines(out / "predictions.jsonl")[0]["answer"] == answer.answer


def test_same_seed_same_predictions(rags, qa_file, tmp_path):
    kw = dict(ks=(2,), modes=("sequence",), decodings=("beam",), beams=2, limit=3)
    run_eval(config(qa_file, tmp_path / "a", **kw), rags)
    run_eval(config(qa_file, tmp_path / "b", **kw), rags)
    answers = [[r["answer"] for r in lines(tmp_path / d / "predictions.jsonl")] for d in "ab"]
    assert answers[0] == answers[1]


def test_plan_skips_token_with_sequence_only_decodings():
    cfg = EvalConfig(data="x", modes=("token", "sequence"), decodings=("greedy", "fast"),
                     retrievers=("dense", "none"), ks=(5,))
    assert [r.name for r in plan_runs(cfg)] == [
        "dense-k5-token-greedy", "dense-k5-sequence-greedy", "dense-k5-sequence-fast",
        "none-greedy", "none-fast",
    ]
    with pytest.raises(MarginError, match="RAG-Sequence's"):
        plan_runs(EvalConfig(data="x", modes=("token",), decodings=("thorough",)))


def test_fever_scores_labels(rags, tmp_path):
    data = tmp_path / "fever.jsonl"
    claims = [("paris france", "SUPPORTS"), ("berlin", "REFUTES"), ("alps", "NOT ENOUGH INFO")]
    data.write_text("".join(
        json.dumps({"id": f"c{i}", "input": c, "output": [{"answer": a}]}) + "\n"
        for i, (c, a) in enumerate(claims)
    ))
    out = tmp_path / "fever"
    [result] = run_eval(config(data, out, task="fever", ks=(2,)), rags)
    records = lines(out / "predictions.jsonl")
    for r in records:
        lp = r["label_logprobs"]
        assert r["answer"] == max(lp, key=lp.get)
        assert r["answer_2way"] == max(("SUPPORTS", "REFUTES"), key=lp.get)
    golds = [a for _, a in claims]
    assert result["accuracy"] == M.label_accuracy([r["answer"] for r in records], golds)
    assert result["accuracy_2way"] == M.two_way_accuracy(
        [r["answer_2way"] for r in records], golds
    )
    assert result["n_2way"] == 2


def test_generation_metrics(rags, tmp_path):
    data = tmp_path / "jeopardy.jsonl"
    data.write_text(
        json.dumps({"input": "paris", "target": "This city is the capital of France"}) + "\n"
        + json.dumps({"input": "rhine", "targets": ["This river flows through Germany"]}) + "\n"
    )
    out = tmp_path / "gen"
    [result] = run_eval(config(data, out, task="generation", ks=(1,)), rags)
    records = lines(out / "predictions.jsonl")
    hyps, refs = [r["answer"] for r in records], [r["gold"] for r in records]
    assert result["bleu_1"] == pytest.approx(M.bleu(hyps, refs, order=1))
    assert result["q_bleu_1"] == pytest.approx(M.qbleu1(hyps, refs))
    assert result["rouge_l"] == pytest.approx(M.rouge_l(hyps, refs))
    assert "Q-BLEU-1" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("content", "argv_extra", "message"),
    [
        ("q\t['a']\n", ["--format", "xml"], "unknown format 'xml'; use one of auto, dpr-tsv"),
        ("", [], "no examples found"),
        ("paris france\t['Paris']\nberlin\t[]\n", [], "dev.tsv:2: no answers"),
        ("claim\t['SUPPORTS']\n", [], "dev.tsv:1: answers are FEVER labels"),
        ("q\t['a']\n", ["--retriever", "sparse"], "unknown retriever 'sparse'"),
        ("q\t['a']\n", ["--k", "1,x"], "--k '1,x' is not a comma list"),
        ("q\t['a']\n", ["--k", "5,0"], "k must be at least 1, got 0"),
        ("q\t['a']\n", ["--max-new-tokens", "0"], "max_new_tokens must be at least 1, got 0"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    content, argv_extra, message, tmp_path, capsys, monkeypatch
):
    import margin.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "load_rags", lambda *a: pytest.fail("loaded a model"))
    data = tmp_path / "dev.tsv"
    data.write_text(content)
    out = tmp_path / "out"
    code = main(["eval", "--data", str(data), "--out", str(out), *argv_extra])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_prints_the_summary_table(rags, qa_file, tmp_path, capsys, monkeypatch):
    import margin.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "load_rags", lambda cfg, names: {n: rags[n] for n in names})
    out = tmp_path / "cli"
    code = main(["eval", "--data", str(qa_file), "--out", str(out), "--retriever", "dense,none",
                 "--k", "1", "--limit", "2", "--max-new-tokens", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| dense | 1 | token | greedy | 2 |" in printed
    assert "| none | - | none | greedy | 2 |" in printed
    assert json.loads((out / "dense-k1-token-greedy" / "metrics.json").read_text())["n"] == 2


def test_k_over_the_index_size_writes_nothing_and_the_corrected_rerun_works(
    rags, qa_file, tmp_path, capsys, monkeypatch
):
    """`--k 50` on a 6-passage index once failed after writing run.json, and the rerun with a
    valid k was then refused as "holds a run with k=50": every k is checked against every
    retriever's index before anything is written."""
    import margin.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "load_rags", lambda cfg, names: {n: rags[n] for n in names})
    out = tmp_path / "out"
    common = ["eval", "--data", str(qa_file), "--out", str(out), "--limit", "1",
              "--max-new-tokens", "3"]
    for extra, k, retriever in ((["--k", "50"], 50, "dense"), (["--k", "1,50"], 50, "dense"),
                                (["--retriever", "none,bm25", "--k", "7"], 7, "bm25")):
        code = main([*common, *extra])
        err = capsys.readouterr().err
        assert code == 2
        assert err.strip().splitlines() == [
            f"margin: error: k={k} is larger than the {retriever} index (6 passages); lower --k"
        ], err
        assert not out.exists()
    assert main([*common, "--k", "2"]) == 0
    assert len(lines(out / "predictions.jsonl")) == 1


def test_settings_of_every_run_are_checked_before_any_run_writes(rags, qa_file, tmp_path):
    """A grid whose second run's directory holds other settings is refused before the first
    run predicts or writes anything."""
    out = tmp_path / "grid"
    run_eval(config(qa_file, out / "dense-k2-token-greedy", ks=(2,), limit=1, seed=1), rags)
    with pytest.raises(MarginError, match="holds a run with seed=1, not 0"):
        run_eval(config(qa_file, out, ks=(1, 2), limit=1), rags)
    assert sorted(p.name for p in out.iterdir()) == ["dense-k2-token-greedy"]


def test_an_out_path_that_is_a_file_is_refused(rags, qa_file, tmp_path):
    out = tmp_path / "out"
    out.write_text("notes")
    with pytest.raises(MarginError, match="is a file, not a directory"):
        run_eval(config(qa_file, out, ks=(1,), limit=1), rags)
    assert out.read_text() == "notes"
