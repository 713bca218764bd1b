"""Contrastive retriever training (margin.training.contrastive, margin.training.mining): DPR's
loss worked by hand, mining exact on a hand-ranked fixture, and runs of a tiny random
sentence-transformers retriever over the fine-tuning task's six passages (tests/helpers.py):
resume, the saved encoders' pairing with their index, the passage encoder frozen or trained, and
the background refresh wired through a fake that builds the new index at once.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import (
    DOCS,
    TINY_BERT,
    TRAIN_DOCS,
    TRAIN_TASK,
    FakeClock,
    KeywordEncoder,
    bert_tokenizer,
    one_thread,
)
from margin.cli import main
from margin.errors import MarginError
from margin.evaluation.examples import Example
from margin.retrieval.build import build_index
from margin.retrieval.encoders import PAIRING_FILE, load_encoder
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever
from margin.training import contrastive
from margin.training.contrastive import (
    RetrieverTrainConfig,
    batch_columns,
    contrastive_loss,
    false_negatives,
    train_retriever,
)
from margin.training.mining import Mined, Mining, interleave, label, mine, renew

# the fine-tuning task plus one question whose answer no passage holds: mined, then skipped
EXAMPLES = [Example(f"ex{i}", q, (a,)) for i, (q, a) in enumerate(TRAIN_TASK)]
EXAMPLES.append(Example("absent", "who painted the mona lisa ?", ("picasso",)))
FAST = dict(batch_size=4, lr=1e-3, mine_depth=6, hard_negatives=1, log_every=1, seed=0,
            device="cpu")


def log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


class Stop(Exception):
    """Raised from on_step: a run killed after a step."""


@pytest.fixture(scope="module")
def index(tmp_path_factory, st_model):
    out = tmp_path_factory.mktemp("contrastive") / "index"
    passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(TRAIN_DOCS)]
    with one_thread():
        build_index(passages, load_encoder(st_model, role="passage"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def bm25(index):
    """A BM25 index of the same six passages (the mining's second ranking)."""
    out = index.parent / "bm25"
    passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(TRAIN_DOCS)]
    build_index(passages, None, out, kind="bm25", progress=False)
    return out


def run(index, out, **kw):
    config = RetrieverTrainConfig(**{**FAST, **kw.pop("config", {})})
    with one_thread():
        return train_retriever(EXAMPLES, out, config, index=index, progress=False, **kw)


# ----------------------------------------------------------------------------- the loss


def test_loss_is_dprs_negative_log_likelihood_worked_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B=2, d=2)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (N=3, d)
    # question 0: scores (1, 0, 1), positive column 0; question 1: (0, 1, 1), positive column 1
    loss = contrastive_loss(q, p, torch.tensor([0, 1]), scale=2.0)
    want = -math.log(math.exp(2) / (2 * math.exp(2) + 1))  # both questions alike
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # leaving column 2 out of both softmaxes: -log(e^2 / (e^2 + 1))
    exclude = torch.tensor([[False, False, True], [False, False, True]])
    assert contrastive_loss(q, p, torch.tensor([0, 1]), exclude, 2.0).item() == pytest.approx(
        math.log1p(math.exp(-2)), rel=1e-6)


def test_one_step_moves_the_positive_up_relative_to_the_negatives(index):
    """A real question encoder (tiny random BERT) and the index's stored vectors: after one small
    SGD step on DPR's loss, the positives gain on the log-sum-exp of their negatives, which is
    the loss going down (loss = mean of log(1 + exp(-margin)))."""
    loaded = open_index(index)
    encoder = load_encoder(loaded.manifest.encoder["spec"]["name"], role="question")
    batch = [Mined(0, 0, (3,)), Mined(1, 1, (4,)), Mined(4, 2, (5,))]  # paris, seine, louvre
    rows, positive = batch_columns(batch)
    assert rows.tolist() == [0, 3, 1, 4, 2, 5] and positive.tolist() == [0, 2, 4]
    p = torch.from_numpy(loaded.dense.vectors(rows[None])[0])  # (6, dim)
    questions = [EXAMPLES[m.example].input for m in batch]

    def margins():
        with torch.no_grad():
            scores = 20 * encoder.embed_queries(questions) @ p.T  # (3, 6)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[torch.arange(3), torch.from_numpy(positive)] = True
        negatives = torch.logsumexp(scores.masked_fill(mask, float("-inf")), dim=1)
        return scores[mask] - negatives

    with one_thread():
        encoder.module.eval()  # no dropout: the step's effect alone
        before = margins()
        optimizer = torch.optim.SGD(encoder.module.parameters(), lr=1e-3)
        loss = contrastive_loss(encoder.embed_queries(questions), p, torch.from_numpy(positive),
                                scale=20.0)
        loss.backward()
        optimizer.step()
        after = margins()
    assert after.mean() > before.mean() + 1e-4, (before, after)
    assert torch.nn.functional.softplus(-after).mean() < loss.item()  # the loss fell


def test_a_column_that_answers_the_question_is_a_false_negative_not_a_negative():
    asked = [Example("a", "q", ("paris",)), Example("b", "q", ("berlin",))]
    texts = ["paris is here", "rome", "berlin and paris", "nothing"]
    exclude = false_negatives(texts, asked, np.array([0, 2]))
    assert exclude.tolist() == [[False, False, True, False], [False, False, False, False]]


# ----------------------------------------------------------------------------- mining


def test_mining_is_exact_on_a_hand_ranked_fixture(tmp_path):
    """DOCS rows: 0 Paris, 1 Berlin, 2 Rome, 3 Alps, 4 Seine, 5 Rhine (tests/helpers.py).
    Candidates interleave the rankings (dense 1, BM25 1, dense 2, ...); the positive is the first
    with an answer, the hard negatives the first without."""
    store = _keyword_store(tmp_path)
    asked = [
        Example("seine", "which river?", ("Seine",)),  # dense: Rhine, Paris, Seine; BM25: Alps
        Example("capital", "capital of italy?", ("Rome",)),  # the first candidate answers
        Example("moon", "what is on the moon?", ("cheese",)),  # nothing answers: skipped
        Example("germany", "germany?", ("Germany",)),  # Berlin and Rhine both answer
    ]
    dense = np.array([[5, 0, 4], [2, 1, 0], [0, 1, 2], [3, 1, 5]])
    bm25 = np.array([[3, 5, -1], [2, 4, 3], [3, 4, 5], [1, 0, 2]])
    assert interleave(dense[0], bm25[0]) == [5, 3, 0, 4]
    assert interleave(dense[3], bm25[3]) == [3, 1, 0, 5, 2]
    mining = mine(asked, dense, store, hard_negatives=2, bm25_rows=bm25)
    assert mining.skipped == 1 and mining.sources == ("dense", "bm25")
    assert mining.questions == [
        Mined(0, 4, (5, 3)),  # Seine; Rhine and Alps ranked above it hold no "seine"
        Mined(1, 2, (1, 4)),  # Rome first; then Berlin (dense 2) and Seine (BM25 2)
        Mined(3, 1, (3, 0)),  # Berlin (the "Germany" text) before Rhine; Alps, Paris negatives
    ]
    dense_only = mine(asked, dense, store, hard_negatives=1)
    assert [(m.example, m.positive, m.negatives) for m in dense_only.questions] == [
        (0, 4, (5,)), (1, 2, (1,)), (3, 1, (3,))]
    positive, negatives = label([5, 4], ["the rhine", "the seine"], asked[0], 3)
    assert (positive, negatives) == (4, (5,))  # fewer negatives than asked: what there is


def _keyword_store(tmp_path):
    passages = [Passage(str(i), d["title"], d["text"]) for i, d in enumerate(DOCS)]
    build_index(passages, KeywordEncoder(), tmp_path / "kw", progress=False)
    return open_index(tmp_path / "kw").store


def test_bm25_positives_are_the_first_answer_bearing_bm25_passage(tmp_path):
    """DPR's rule for distant supervision (Karpukhin et al., 2020, Sec. 5.1): the positive is
    BM25's best passage with an answer, not the interleaved list's first; the hard negatives are
    the same under both rules; a question whose BM25 candidates hold no answer is skipped, even
    when a dense candidate holds one. DOCS rows as above: Berlin (1) and Rhine (5) say Germany."""
    store = _keyword_store(tmp_path)
    asked = [
        Example("rhine", "which river flows through germany?", ("Germany",)),
        Example("seine", "which river?", ("Seine",)),
        Example("capital", "capital of italy?", ("Rome",)),
    ]
    dense = np.array([[5, 3, 0], [5, 0, 4], [2, 1, 0]])  # dense 1 of "rhine" holds Germany ...
    bm25 = np.array([[1, 3, 2], [3, 5, -1], [2, 4, 3]])  # ... but BM25 ranks Berlin first
    assert interleave(dense[0], bm25[0]) == [5, 1, 3, 0, 2]
    interleaved = mine(asked, dense, store, hard_negatives=2, bm25_rows=bm25)
    dpr = mine(asked, dense, store, hard_negatives=2, bm25_rows=bm25, positives="bm25")
    assert interleaved.questions == [Mined(0, 5, (3, 0)), Mined(1, 4, (5, 3)), Mined(2, 2, (1, 4))]
    assert dpr.questions == [Mined(0, 1, (3, 0)), Mined(2, 2, (1, 4))]  # no Seine in BM25's
    assert (interleaved.skipped, dpr.skipped) == (0, 1)
    assert (interleaved.positives, dpr.positives) == ("interleaved", "bm25")
    assert mine(asked, dense, store, 2, bm25, positives="interleaved") == interleaved  # default
    with pytest.raises(MarginError, match="needs BM25 rankings"):
        mine(asked, dense, store, hard_negatives=2, positives="bm25")


def test_the_mining_file_keeps_its_rule_and_an_old_one_reads_as_interleaved(tmp_path):
    mining = Mining([Mined(0, 1, (3, 0)), Mined(2, 2, (1,))], 1, 100, ("dense", "bm25"), "bm25")
    mining.save(tmp_path / "m.json")
    assert Mining.load(tmp_path / "m.json") == mining
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["positives"] == "bm25"
    del record["positives"]  # a mining written before the rule was recorded
    (tmp_path / "old.json").write_text(json.dumps(record))
    assert Mining.load(tmp_path / "old.json").positives == "interleaved"
    fresh = Mining([Mined(2, 4, (0,))], 0, 100, ("dense", "bm25"), "bm25")
    assert renew(mining, fresh) == Mining([Mined(0, 1, (3, 0)), Mined(2, 4, (0,))], 1, 100,
                                          ("dense", "bm25"), "bm25")


# ----------------------------------------------------------------------------- runs


def test_resume_after_a_crash_gives_the_same_next_step_loss(index, tmp_path):
    """Saves after step 2; the run dies after step 3. Resumed, it redoes step 3 from the step-2
    state: the same loss as the run that never stopped, and a log without the lost line."""
    cut, whole = tmp_path / "cut", tmp_path / "whole"

    def stop(record):
        if record["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        run(index, cut, config=dict(steps=5, save_every=2), on_step=stop)
    result = run(index, cut, config=dict(steps=5, save_every=2), resume=True)
    straight = run(index, whole, config=dict(steps=5, save_every=2))
    losses = {name: [r["loss"] for r in log(out) if "loss" in r]
              for name, out in (("cut", cut), ("whole", whole))}
    assert [r["step"] for r in log(cut) if "loss" in r] == [1, 2, 3, 4, 5]
    assert losses["cut"][2] == pytest.approx(losses["whole"][2], rel=1e-5, abs=1e-6)
    assert losses["cut"] == pytest.approx(losses["whole"], rel=1e-5, abs=1e-6)
    assert (result.steps, result.questions, result.skipped) == (5, 8, 1)
    assert straight.skipped == 1  # "picasso" is in no passage
    with pytest.raises(MarginError, match="resume with the original settings"):
        run(index, cut, config=dict(steps=5, save_every=2, lr=1e-4), resume=True)
    with pytest.raises(MarginError, match="--resume"):
        run(index, whole, config=dict(steps=5))


def test_a_bm25_positives_run_records_its_rule_and_resumes_only_with_it(index, bm25, tmp_path):
    out = tmp_path / "run"
    result = run(index, out, config=dict(steps=2, positives="bm25"), bm25_index=bm25)
    assert result.steps == 2 and result.questions > 0
    assert log(out)[0]["positives"] == "bm25"
    assert Mining.load(out / "mining-step0.json").positives == "bm25"
    assert json.loads((out / "state" / "state.json").read_text())["config"]["positives"] == "bm25"
    assert json.loads((out / "last" / "retriever.json").read_text())["positives"] == "bm25"
    with pytest.raises(MarginError, match="positives='interleaved' but the run used 'bm25'") as e:
        run(index, out, config=dict(steps=2), bm25_index=bm25, resume=True)
    assert "\n" not in str(e.value)
    assert run(index, out, config=dict(steps=2, positives="bm25"), bm25_index=bm25,
               resume=True).steps == 2  # the same rule: read back


def test_bm25_positives_without_bm25_rankings_are_refused_before_anything_is_written(
    index, tmp_path
):
    with pytest.raises(MarginError, match="--positives bm25") as e:
        run(index, tmp_path / "run", config=dict(steps=1, positives="bm25"))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_run_saved_before_the_rule_was_recorded_resumes_as_interleaved(index, bm25, tmp_path):
    out = tmp_path / "run"
    run(index, out, config=dict(steps=2))
    state = json.loads((out / "state" / "state.json").read_text())
    del state["config"]["positives"]  # as every run before --positives wrote it
    (out / "state" / "state.json").write_text(json.dumps(state))
    assert run(index, out, config=dict(steps=2), resume=True).steps == 2
    with pytest.raises(MarginError, match="positives='bm25' but the run used 'interleaved'"):
        run(index, out, config=dict(steps=2, positives="bm25"), bm25_index=bm25, resume=True)


def test_frozen_passage_encoder_pairs_the_question_encoder_with_its_index(index, tmp_path):
    """Frozen: the index is untouched, no passage encoder is written, and the saved question
    encoder is accepted by its index without --allow-encoder-mismatch."""
    before = open_index(index).manifest
    result = run(index, tmp_path / "run", config=dict(steps=2), dev=EXAMPLES[:4])
    assert result.passage_encoder is None and result.best_step is not None
    assert result.question_encoder == tmp_path / "run" / "best" / "question_encoder"
    assert not (tmp_path / "run" / "last" / "passage_encoder").exists()
    assert open_index(index).manifest.files == before.files
    pairing = json.loads((result.question_encoder / PAIRING_FILE).read_text())
    assert pairing["passage_fingerprint"] == before.encoder["fingerprint"]
    retriever = Retriever.load(index, query_encoder=result.question_encoder, device="cpu")
    assert retriever.encoder.fingerprint == pairing["question_fingerprint"]
    assert retriever.encoder.fingerprint != before.encoder["fingerprint"]  # it did train
    dev = [r for r in log(tmp_path / "run") if "dev_recall@5" in r]
    assert dev and set(dev[-1]) >= {"dev_recall@1", "dev_recall@5", "dev_recall@20"}


def test_trained_passage_encoder_changes_and_its_index_alone_accepts_the_pair(
    index, tmp_path, capsys
):
    result = run(index, tmp_path / "run", config=dict(steps=2, passage_encoder="train"))
    built = open_index(index).manifest.encoder
    passage = load_encoder(result.passage_encoder, role="passage")
    assert passage.fingerprint != built["fingerprint"]  # the passage encoder learnt
    new_index = tmp_path / "new-index"
    with one_thread():
        assert main(["index", "build", "--corpus", str(_corpus(tmp_path)), "--encoder",
                     str(result.passage_encoder), "--out", str(new_index),
                     "--device", "cpu"]) == 0
        assert main(["search", "--index", str(new_index), "--query-encoder",
                     str(result.question_encoder), "--json", "-k", "1", "where is paris ?"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["passages"]
    with one_thread():  # the original index was built with the other passage encoder: refused
        assert main(["search", "--index", str(index), "--query-encoder",
                     str(result.question_encoder), "where is paris ?"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained against another passage encoder" in err
    with pytest.raises(MarginError, match="trained against another passage encoder"):
        Retriever.load(index, query_encoder=result.question_encoder, device="cpu")


def _corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n"
                            for i, (t, x) in enumerate(TRAIN_DOCS)))
    return path


class FakeRefresh:
    """BackgroundRefresh's contract (margin.retrieval.refresh), run at once: ``start`` builds the
    new index from the snapshot; the next ``poll`` hands it over, exactly once."""

    def __init__(self, index, work, device="cpu"):
        self.index, self.work, self.started, self.polls, self.closed = index, work, [], 0, False
        self.done = None

    def start(self, encoder_dir, step):
        self.started.append((step, load_encoder(encoder_dir, role="passage").fingerprint))
        old = open_index(self.index).store
        out = self.work / f"index-step{step}"
        build_index(old.get(np.arange(len(old))), load_encoder(encoder_dir, role="passage"), out,
                    progress=False)
        self.done = out
        return True

    def poll(self):
        self.polls += 1
        done, self.done = self.done, None
        if done is not None:
            self.index = done
        return done

    def close(self):
        self.closed = True


def test_refresh_every_snapshots_the_passage_encoder_and_swaps_between_steps(
    index, tmp_path, monkeypatch
):
    fakes = []
    monkeypatch.setattr(contrastive, "_make_refresher",
                        lambda *a: fakes.append(FakeRefresh(*a)) or fakes[-1])
    out = tmp_path / "run"
    result = run(index, out, config=dict(steps=5, passage_encoder="train", refresh_every=2))
    [fake] = fakes
    assert [s for s, _ in fake.started] == [2, 4]  # not after the last step
    assert fake.started[0][1] != fake.started[1][1]  # each snapshot is the encoder of its step
    assert fake.polls == 5 and fake.closed  # one poll before each step
    assert result.refreshes == 2 and result.index == out / "refresh" / "index-step4"
    swaps = [r for r in log(out) if "index" in r]
    assert [r["step"] for r in swaps] == [2, 4]  # swapped before steps 3 and 5
    assert (out / "mining-step2.json").is_file() and (out / "mining-step4.json").is_file()
    assert open_index(result.index).manifest.encoder["fingerprint"] == fake.started[1][1]
    state = json.loads((out / "state" / "state.json").read_text())
    assert state["current_index"] == str(result.index)
    assert state["mining"] == "mining-step4.json"
    kept = sorted(p.name for p in (out / "refresh").iterdir())
    assert kept == ["index-step4"]  # what the saved state no longer needs is gone


@pytest.fixture
def fake_clock(monkeypatch):
    """Training time that passes only in the loss: each batch takes 30 s (loading and mining
    take none)."""
    return FakeClock(monkeypatch, contrastive)


def test_a_time_budget_cuts_the_run_and_its_learning_rate_still_ends_at_zero(
    index, tmp_path, fake_clock, capsys
):
    # 30 s a step, 2 minutes: timed after step 3 (90 s), one more step fits (120 s), not 10
    out, settings = tmp_path / "cut", dict(steps=10, warmup=1, save_every=1)

    def stop(record):
        if record["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        run(index, out, config=dict(settings, max_minutes=2), on_step=stop)
    assert "10 steps would not end within the 2 minutes left" in capsys.readouterr().err
    state = json.loads((out / "state" / "state.json").read_text())
    assert state["step"] == 3 and state["total"] == 4
    # resumed without a budget (a setting a resume may change), the run keeps its cut length
    result = run(index, out, config=settings, resume=True)
    assert result.steps == 4 and "would not end" not in capsys.readouterr().err
    assert result.planned == 10  # the length asked for, which the summary line states
    records = log(out)
    assert [r for r in records if "cut_to" in r] == [
        {"cut_to": 4, "planned": 10, "s_per_step": 30.0, "max_minutes": 2}]
    # lr factor after each step: 9/9 and 8/9 of the 10-step decay, then 1/3 and 0 of the 4-step one
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == pytest.approx([1e-3, 1e-3 * 8 / 9, 1e-3 / 3, 0.0])
    assert records[-1]["done"] and records[-1]["steps"] == 4
    assert json.loads((out / "last" / "retriever.json").read_text())["step"] == 4


def test_a_budget_that_fits_changes_nothing(index, tmp_path, fake_clock):
    result = run(index, tmp_path / "run", config=dict(steps=4, max_minutes=2))  # 4 x 30 s
    assert result.steps == 4 and not [r for r in log(tmp_path / "run") if "cut_to" in r]


def test_max_minutes_passes_through_the_command_and_a_bad_one_is_refused(
    index, tmp_path, fake_clock, capsys
):
    with pytest.raises(MarginError, match="max_minutes must be positive"):
        RetrieverTrainConfig(max_minutes=0)
    for bad in ({"lr": float("inf")}, {"lr": float("nan")}, {"scale": float("inf")}):
        with pytest.raises(MarginError, match="lr and scale must be positive and finite"):
            RetrieverTrainConfig(**bad)
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"{q}\t['{a}']\n" for q, a in TRAIN_TASK))
    args = ["train-retriever", "--train", str(data), "--index", str(index), "--steps", "6",
            "--batch-size", "4", "--mine-depth", "6", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "bad"), "--max-minutes", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_minutes must be positive" in err
    assert not (tmp_path / "bad").exists()
    with one_thread():  # 2.5 minutes at 30 s a step: 5 of the 6 steps
        assert main([*args, "--out", str(tmp_path / "run"), "--max-minutes", "2.5"]) == 0
    said = capsys.readouterr()
    assert ("trained 5 of the 6 steps asked for (the rest did not fit --max-minutes 2.5) on "
            in said.out)
    assert "6 steps would not end within the 2.5 minutes left" in said.err
    assert [r["cut_to"] for r in log(tmp_path / "run") if "cut_to" in r] == [5]
    with one_thread():  # the finished run read back, without a budget of its own
        assert main([*args, "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert ("trained 5 of the 6 steps asked for (the rest did not fit an earlier call's "
            "--max-minutes) on " in capsys.readouterr().out)


def test_options_that_cannot_work_are_refused_in_one_line(index, tmp_path, capsys):
    with pytest.raises(MarginError, match="--passage-encoder train"):
        RetrieverTrainConfig(refresh_every=2)
    with pytest.raises(MarginError, match="unknown --passage-encoder"):
        RetrieverTrainConfig(passage_encoder="both")
    with pytest.raises(MarginError, match="unknown --positives 'dense'"):
        RetrieverTrainConfig(positives="dense")
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"{q}\t['{a}']\n" for q, a in TRAIN_TASK))
    out = tmp_path / "run"
    with one_thread():
        code = main(["train-retriever", "--train", str(data), "--index", str(index), "--out",
                     str(out), "--steps", "1", "--batch-size", "4", "--mine-depth", "6",
                     "--device", "cpu"])
    assert code == 0
    said = capsys.readouterr()
    assert "trained 1 steps on 8 questions (0 without" in said.out
    assert "dense retriever only" in said.err
    with one_thread():  # run again without --resume: refused, nothing touched
        assert main(["train-retriever", "--train", str(data), "--index", str(index), "--out",
                     str(out), "--steps", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["train-retriever", "--train", str(data), "--index", str(index), "--out",
                 str(tmp_path / "other"), "--positives", "dense", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown --positives 'dense'" in err
    assert "Traceback" not in err and not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def dpr(tmp_path_factory):
    """A tiny random DPR pair (context and question towers) and an index built with the first."""
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    root = tmp_path_factory.mktemp("dpr")
    with one_thread():
        for seed, (key, cls) in enumerate((("ctx", DPRContextEncoder),
                                           ("q", DPRQuestionEncoder))):
            torch.manual_seed(seed)
            cls(DPRConfig(**TINY_BERT)).save_pretrained(root / key)
            bert_tokenizer().save_pretrained(root / key)
        passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(TRAIN_DOCS)]
        build_index(passages, load_encoder(root / "ctx", role="passage"), root / "index",
                    progress=False)
    return root


@pytest.mark.parametrize("kind", ["dpr", "sentence-transformers"])
def test_passages_embedded_with_gradient_are_the_indexed_vectors(kind, dpr, st_model):
    encoder = load_encoder(dpr / "ctx" if kind == "dpr" else st_model, role="passage")
    passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(TRAIN_DOCS)]
    encoder.module.eval()
    with one_thread():
        vectors = encoder.embed_passages(passages)  # (6, dim), in the autograd graph
        assert vectors.requires_grad
        np.testing.assert_allclose(vectors.detach().numpy(), encoder.encode_passages(passages),
                                   rtol=1e-4, atol=1e-5)


def test_a_dpr_pair_trains_with_scale_one_and_pairs_with_its_new_index(dpr, tmp_path):
    with one_thread():
        result = train_retriever(
            EXAMPLES, tmp_path / "run", RetrieverTrainConfig(**{**FAST, "steps": 2,
                                                                "passage_encoder": "train"}),
            index=dpr / "index", query_encoder=dpr / "q", progress=False)
        passage = load_encoder(result.passage_encoder, role="passage")
        build_index(open_index(dpr / "index").store.get(np.arange(6)), passage,
                    tmp_path / "new-index", progress=False)
    assert json.loads((tmp_path / "run" / "last" / "retriever.json").read_text())["scale"] == 1.0
    retriever = Retriever.load(tmp_path / "new-index", query_encoder=result.question_encoder,
                               device="cpu")
    assert retriever.retrieve(["where is paris ?"], k=1).passages[0]
    with pytest.raises(MarginError, match="trained against another passage encoder"):
        Retriever.load(dpr / "index", query_encoder=result.question_encoder, device="cpu")
    # the untrained DPR question encoder still goes with the original index, as before
    assert Retriever.load(dpr / "index", query_encoder=dpr / "q", device="cpu").encoder
