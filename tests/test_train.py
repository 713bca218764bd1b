"""Fine-tuning (margin.training): the paper's recipe on a tiny random model and a synthetic
task.

The task: 8 questions whose one-word answers are written in a 6-passage corpus. The retriever is a
tiny random sentence-transformers model (its index built once per module), the generator a tiny
random Llama. Everything is rebuilt from disk per test, so no test sees another's training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch

from helpers import TRAIN_CONFIG as CONFIG
from helpers import TRAIN_DOCS as DOCS
from helpers import TRAIN_TASK as TASK
from helpers import FakeClock, tiny_llama
from margin.cli import main
from margin.errors import MarginError
from margin.evaluation.examples import Example
from margin.generation.decoding import DecodeConfig
from margin.models import load_model, make_generator, save_model
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.encoders import load_encoder, weights_fingerprint
from margin.retrieval.passages import Passage
from margin.retrieval.retriever import Retriever
from margin.training.config import TrainConfig
from margin.training.recipe import select_questions, training_slice
from margin.training.schedule import TimeBudget, lr_factor, pick_target, steps_within
from margin.training.train import evaluate, train

EXAMPLES = [Example(f"ex{i}", q, (a,)) for i, (q, a) in enumerate(TASK)]
FAST = dict(k=2, batch_size=8, lr=3e-3, seed=0)  # full-batch steps on the 8 examples


@pytest.fixture(scope="module")
def index(tmp_path_factory, st_model):
    out = tmp_path_factory.mktemp("train") / "index"
    passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(DOCS)]
    build_index(passages, load_encoder(st_model, role="passage"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    model, tok = tiny_llama()
    out = tmp_path_factory.mktemp("gen")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def make_rag(index, gen_dir):
    def make(index_dir=index) -> RAG:
        retriever = Retriever.load(index_dir)
        rag = RAG(make_generator(gen_dir, "causal", CONFIG), retriever,
                  doc_score_scale=5.0, default_decode=DecodeConfig(max_new_tokens=3), config=CONFIG)
        return rag

    return make


def fingerprint(module: torch.nn.Module) -> str:
    return weights_fingerprint(module)


def files_digest(directory) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


class Stop(Exception):
    """Raised by a :func:`stop_at` callback: a run cut short, as by Ctrl-C."""


def stop_at(step: int):
    """An ``on_step`` callback that stops the run after optimizer step ``step``."""
    def stop(record):
        if record["step"] == step:
            raise Stop

    return stop


# ----------------------------------------------------------------------------- the recipe


def test_loss_falls_and_eight_examples_are_fitted_to_exact_match(make_rag, tmp_path):
    rag = make_rag()
    assert evaluate(rag, EXAMPLES, k=2, mode="token") < 0.5
    result = train(rag, EXAMPLES, tmp_path / "run", TrainConfig(steps=40, **FAST), dev=EXAMPLES,
                   progress=False)
    losses = [r["loss"] for r in log(tmp_path / "run") if "loss" in r]
    assert len(losses) == 40 and losses[-1] < 0.05 * losses[0]
    assert result.best_dev_em == 1.0 and evaluate(rag, EXAMPLES, k=2, mode="token") == 1.0
    assert (tmp_path / "run" / "best" / "margin_model.json").is_file()


def test_question_encoder_learns_through_the_prior_passage_encoder_and_index_do_not(
    make_rag, index, st_model, tmp_path
):
    rag = make_rag()
    q_module = rag.question_encoder.module
    q_before = fingerprint(q_module)
    index_before = files_digest(index)
    passage_fp = load_encoder(st_model, role="passage").fingerprint
    grads = []

    def keep_grad(record):  # after the step: the gradient of its last micro-batch is still there
        grads.append(sum(float(p.grad.abs().sum()) for p in q_module.parameters()
                         if p.grad is not None))

    train(rag, EXAMPLES, tmp_path / "run", TrainConfig(steps=2, **FAST), progress=False,
          on_step=keep_grad)
    assert all(g > 0 for g in grads)  # the only path from the loss to q is the document prior
    assert fingerprint(q_module) != q_before
    assert files_digest(index) == index_before
    assert load_encoder(st_model, role="passage").fingerprint == passage_fp
    assert rag.retriever.index.manifest.encoder["fingerprint"] == passage_fp


def test_resume_gives_the_same_next_step_loss(make_rag, tmp_path):
    config = TrainConfig(steps=4, save_every=2, lora=True, lora_r=4, **FAST)
    with pytest.raises(Stop):
        train(make_rag(), EXAMPLES, tmp_path / "cut", config, progress=False, on_step=stop_at(2))
    result = train(make_rag(), EXAMPLES, tmp_path / "cut", config, resume=True, progress=False)
    train(make_rag(), EXAMPLES, tmp_path / "whole", config, progress=False)
    cut = [r["loss"] for r in log(tmp_path / "cut") if "loss" in r]
    whole = [r["loss"] for r in log(tmp_path / "whole") if "loss" in r]
    assert result.steps == 4 and len(cut) == 4
    assert cut[2] == pytest.approx(whole[2], rel=1e-6, abs=1e-7)  # the next step after resuming
    assert cut == pytest.approx(whole, rel=1e-6, abs=1e-7)
    state = tmp_path / "cut" / "state"
    assert not list(state.rglob("*.pt")) and not list(state.rglob("*.bin"))  # never pickle
    with pytest.raises(MarginError, match="resume with the original settings"):
        train(make_rag(), EXAMPLES, tmp_path / "cut", TrainConfig(steps=4, save_every=2,
              lora=True, lora_r=4, **dict(FAST, lr=1e-3)), resume=True, progress=False)
    with pytest.raises(MarginError, match="--resume"):
        train(make_rag(), EXAMPLES, tmp_path / "whole", config, progress=False)


MID_EPOCH = dict(FAST, batch_size=2)  # 2 of the 8 examples a step: 4 steps an epoch
TIMING = ("examples_per_s", "elapsed_s", "wall_s")  # log fields that differ between any two runs


def test_a_crash_between_checkpoints_mid_epoch_resumes_as_if_never_stopped(make_rag, tmp_path):
    """Saves after steps 3 (epoch 0, position 6) and 6; the run dies after step 5, inside epoch 1
    and two steps after its last save. The resumed run redoes steps 4 and 5 from the step-3
    state, across the epoch boundary, and its log is the uninterrupted run's: the lines of the
    lost steps are not kept beside their redone twins."""
    config = TrainConfig(steps=8, save_every=3, **MID_EPOCH)
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    with pytest.raises(Stop):
        train(make_rag(), EXAMPLES, cut, config, progress=False, on_step=stop_at(5))
    state = json.loads((cut / "state" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["position"]) == (3, 0, 6)
    assert [(r["step"], r["epoch"]) for r in log(cut)] == [(1, 0), (2, 0), (3, 0), (4, 0),
                                                           (5, 1)]
    result = train(make_rag(), EXAMPLES, cut, config, resume=True, progress=False)
    train(make_rag(), EXAMPLES, whole, config, progress=False)
    assert result.steps == 8
    resumed, straight = log(cut), log(whole)
    steps = [r["step"] for r in resumed if "loss" in r]
    assert steps == list(range(1, 9))  # each step once
    assert [r["loss"] for r in resumed if r.get("step") == 4] == pytest.approx(
        [r["loss"] for r in straight if r.get("step") == 4], rel=1e-6, abs=1e-7)  # the next step
    assert len(resumed) == len(straight)
    for ours, want in zip(resumed, straight, strict=True):  # every record: losses, lr, norms
        assert ours.keys() == want.keys()
        for key in want.keys() - set(TIMING):
            assert ours[key] == (pytest.approx(want[key], rel=1e-6, abs=1e-7)
                                 if isinstance(want[key], float) else want[key]), key
    assert [r["epoch"] for r in resumed if "loss" in r] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_resume_with_other_data_or_another_model_is_one_line_and_touches_nothing(
    make_rag, index, tmp_path, capsys
):
    model = save_model(make_rag(), tmp_path / "model")
    other_model = save_model(make_rag(), tmp_path / "other-model")
    data, other_data = tmp_path / "train.tsv", tmp_path / "other.tsv"
    data.write_text("".join(f"{q}\t['{a}']\n" for q, a in TASK))
    other_data.write_text("".join(f"{q}\t['{a}']\n" for q, a in TASK[::-1]))  # same, reordered
    out = tmp_path / "run"
    base = ["train", "--index", str(index), "--out", str(out), "--k", "2", "--batch-size", "4",
            "--steps", "4", "--save-every", "1"]
    assert main([*base, "--model", str(model), "--train", str(data)]) == 0
    capsys.readouterr()
    before = files_digest(out)
    refusals = [
        (["--model", str(other_model), "--train", str(data)],
         f"--resume with model '{other_model}|{index}' but the run trained '{model}|{index}'"),
        (["--model", str(model), "--train", str(other_data)],
         "--resume with other training data than the run used"),
        (["--model", str(model), "--train", str(data), "--limit", "6"],
         "--resume with other training data than the run used"),
    ]
    for args, message in refusals:
        assert main([*base, *args, "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert files_digest(out) == before  # nothing written: no log line, no checkpoint
    assert main([*base, "--model", str(model), "--train", str(data), "--resume"]) == 0
    assert [r["step"] for r in log(out) if "loss" in r] == [1, 2, 3, 4]
    assert len([r for r in log(out) if r.get("done")]) == 1  # the finished run's end, once


@pytest.mark.parametrize("frozen", ["retriever", "generator"])
def test_frozen_options_freeze_what_they_say(make_rag, tmp_path, frozen):
    rag = make_rag()
    q, g = rag.question_encoder.module, rag.generator.model
    before = fingerprint(q), fingerprint(g)
    config = TrainConfig(steps=2, freeze_retriever=frozen == "retriever",
                         freeze_generator=frozen == "generator", **FAST)
    train(rag, EXAMPLES, tmp_path / "run", config, progress=False)
    assert (fingerprint(q) == before[0]) == (frozen == "retriever")
    assert (fingerprint(g) == before[1]) == (frozen == "generator")


def test_the_question_encoder_moves_at_its_own_learning_rate(make_rag, tmp_path):
    """Adam's first step moves every weight by at most its group's lr (|m / sqrt(v)| <= 1)."""
    rag = make_rag()
    q, g = rag.question_encoder.module, rag.generator.model
    q0 = [p.detach().clone() for p in q.parameters()]
    g0 = [p.detach().clone() for p in g.parameters()]
    config = TrainConfig(steps=1, **dict(FAST, lr=1e-3), retriever_lr=1e-6, max_grad_norm=0)
    train(rag, EXAMPLES, tmp_path / "run", config, progress=False)

    def moved(module, before):
        return max(float((p.detach() - b).abs().max()) for p, b in zip(module.parameters(), before,
                                                             strict=True))

    # (+ float32 rounding: a weight near 1.0 moves in steps of ~1.2e-7)
    assert 0 < moved(q, q0) <= 1e-6 + 2.5e-7
    assert 1e-4 < moved(g, g0) <= 1e-3 + 2.5e-7
    with pytest.raises(MarginError, match="retriever_lr must be positive"):
        TrainConfig(retriever_lr=0.0)


def test_freezing_everything_is_refused(make_rag, tmp_path):
    config = TrainConfig(steps=1, freeze_retriever=True, freeze_generator=True)
    with pytest.raises(MarginError, match="nothing to train"):
        train(make_rag(), EXAMPLES, tmp_path / "run", config, progress=False)


def test_bm25_retrieval_trains_the_generator_only(make_rag, tmp_path):
    bm25 = tmp_path / "bm25"
    build_index([Passage(str(i), t, x) for i, (t, x) in enumerate(DOCS)], None, bm25,
                kind="bm25", progress=False)
    rag = make_rag()
    rag.retriever = Retriever.load(bm25)
    q_before = fingerprint(rag.question_encoder.module)
    g_before = fingerprint(rag.generator.model)
    train(rag, EXAMPLES, tmp_path / "run", TrainConfig(steps=2, **FAST), progress=False)
    assert fingerprint(rag.generator.model) != g_before
    assert fingerprint(rag.question_encoder.module) == q_before


# ----------------------------------------------------------------------------- files and CLI


def test_a_trained_checkpoint_loads_in_margin_ask(make_rag, index, tmp_path, capsys):
    rag = make_rag()
    config = TrainConfig(steps=3, mode="sequence", lora=True, lora_r=4, **FAST)
    train(rag, EXAMPLES, tmp_path / "run", config, progress=False)
    [expected] = rag.ask([TASK[0][0]], k=2, mode="sequence")
    loaded = load_model(tmp_path / "run" / "last", index)
    assert (loaded.default_mode, loaded.default_k) == ("sequence", 2)
    assert fingerprint(loaded.question_encoder.module) == fingerprint(rag.question_encoder.module)
    assert main(["ask", "--model", str(tmp_path / "run" / "last"), "--index", str(index),
                 "--json", TASK[0][0]]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["mode"] == "sequence" and len(answer["passages"]) == 2
    assert answer["answer"] == expected.answer
    assert answer["logprob"] == pytest.approx(expected.logprob, abs=1e-4)


def test_lora_in_bf16_on_the_cpu_tracks_fp32_and_saves_fp32_weights(make_rag, index, tmp_path):
    config = TrainConfig(steps=3, lora=True, lora_r=4, **FAST)
    runs = {}
    for precision in ("fp32", "bf16"):
        rag = make_rag()
        train(rag, EXAMPLES, tmp_path / precision, replace(config, precision=precision),
              progress=False)
        runs[precision] = [r["loss"] for r in log(tmp_path / precision) if "loss" in r]
        # the caller's model is fp32 again after the run, and so is what was saved
        assert {p.dtype for p in rag.generator.model.parameters()} == {torch.float32}
        loaded = load_model(tmp_path / precision / "last", index)
        assert {p.dtype for p in loaded.generator.model.parameters()} == {torch.float32}
    assert runs["bf16"] != runs["fp32"]  # bf16 did run: its rounding shows in the losses
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=0.05)
    assert runs["bf16"][-1] < runs["bf16"][0]


def test_fp16_training_on_a_cpu_is_one_clear_error(make_rag, tmp_path):
    with pytest.raises(MarginError, match="--precision fp16 needs a GPU"):
        train(make_rag(), EXAMPLES, tmp_path / "run",
              TrainConfig(steps=1, precision="fp16", device="cpu", **FAST), progress=False)
    assert not (tmp_path / "run").exists()


def test_training_both_objectives_saves_a_rag_token_default(make_rag, index, tmp_path):
    rag = make_rag()
    result = train(rag, EXAMPLES, tmp_path / "run", TrainConfig(steps=2, mode="both", **FAST),
                   progress=False)
    assert result.steps == 2 and result.loss > 0
    loaded = load_model(tmp_path / "run" / "last", index)
    assert (loaded.default_mode, loaded.default_k) == ("token", 2)


def test_cli_reports_bad_lines_and_trains(make_rag, index, tmp_path, capsys):
    model_dir = save_model(make_rag(), tmp_path / "model")
    data = tmp_path / "train.tsv"
    lines = [f"{q}\t['{a}']" for q, a in TASK]
    lines.insert(3, "a question without answers")
    data.write_text("\n".join(lines) + "\n")
    base = ["train", "--model", str(model_dir), "--index", str(index), "--train", str(data),
            "--k", "2", "--batch-size", "4", "--steps", "1"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.tsv:4:" in err
    assert main([*base, "--out", str(tmp_path / "b"), "--skip-bad-lines"]) == 0
    out = capsys.readouterr().out
    assert "trained 1 steps" in out and "skipped 1 malformed line(s)" in out
    assert (tmp_path / "b" / "last" / "margin_model.json").is_file()


def test_finetune_installs_a_model_usable_by_name(make_rag, index, tmp_path, monkeypatch, capsys):
    """`make finetune`'s fast path: training slices after the held-out lines, installed by name."""
    monkeypatch.setenv("MARGIN_HOME", str(tmp_path / "home"))
    model_dir = save_model(make_rag(), tmp_path / "model")
    data = tmp_path / "dev.tsv"
    every_title = [t for t, _ in DOCS]  # some title is in any top 2: every question is grounded
    data.write_text("".join(f"{q}\t{[a, *every_title]}\n" for q, a in TASK))
    assert main(["finetune", str(data), "--model", str(model_dir), "--index", str(index),
                 "--retriever", "none", "--heldout", "5", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "trained on 3 questions with a gold answer in their passages and 0 without" in out
    assert "--model finetuned" in out
    run = tmp_path / "home" / "runs" / "finetuned"
    assert [r["step"] for r in log(run) if "loss" in r] == [1]
    assert [e.input for e in training_slice(data, heldout=5)] == [q for q, _ in TASK[5:]]
    loaded = load_model("finetuned", index)
    assert loaded.default_k == 2
    assert fingerprint(loaded.generator.model) != fingerprint(make_rag().generator.model)
    with pytest.raises(MarginError, match="none after the 8 held out"):
        training_slice(data, heldout=8)


@pytest.fixture
def fake_clock(monkeypatch):
    """Training time that passes only in the loss: each micro-batch takes ``clock.tick`` s."""
    import margin.training.train as train_module

    return FakeClock(monkeypatch, train_module)


def test_a_time_budget_cuts_the_run_and_its_learning_rate_still_ends_at_zero(
    make_rag, tmp_path, fake_clock, capsys
):
    # 30 s a step, 2 minutes: timed after step 3 (90 s), one more step fits (120 s), not 10
    config = TrainConfig(steps=10, warmup=1, max_minutes=2, save_every=1, **FAST)
    with pytest.raises(Stop):
        train(make_rag(), EXAMPLES, tmp_path / "cut", config, progress=False, on_step=stop_at(3))
    assert "10 steps would not end within the 2 minutes left" in capsys.readouterr().err
    state = json.loads((tmp_path / "cut" / "state" / "state.json").read_text())
    assert state["step"] == 3 and state["total"] == 4
    # resumed without a budget, the run keeps the length it was cut to
    result = train(make_rag(), EXAMPLES, tmp_path / "cut", replace(config, max_minutes=None),
                   resume=True, progress=False)
    records = log(tmp_path / "cut")
    assert result.steps == 4 and result.planned == 10
    assert [r for r in records if "cut_to" in r] == [
        {"cut_to": 4, "planned": 10, "s_per_step": 30.0, "max_minutes": 2}]
    # lr factor after each step: 9/9 and 8/9 of the 10-step decay, then 1/3 and 0 of the 4-step one
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == pytest.approx([3e-3, 3e-3 * 8 / 9, 1e-3, 0.0])
    assert (tmp_path / "cut" / "last" / "margin_model.json").is_file()


def test_a_fresh_start_after_a_run_stopped_before_its_first_save_starts_a_fresh_log(
    make_rag, tmp_path
):
    config = TrainConfig(steps=3, save_every=3, **FAST)
    with pytest.raises(Stop):
        train(make_rag(), EXAMPLES, tmp_path / "run", config, progress=False, on_step=stop_at(1))
    assert not (tmp_path / "run" / "state").exists() and len(log(tmp_path / "run")) == 1
    train(make_rag(), EXAMPLES, tmp_path / "run", config, progress=False)
    assert [r["step"] for r in log(tmp_path / "run") if "loss" in r] == [1, 2, 3]


def test_a_budget_that_fits_changes_nothing(make_rag, tmp_path, fake_clock):
    config = TrainConfig(steps=4, max_minutes=2, **FAST)  # 4 x 30 s = 2 minutes
    result = train(make_rag(), EXAMPLES, tmp_path / "run", config, progress=False)
    assert result.steps == result.planned == 4
    assert not [r for r in log(tmp_path / "run") if "cut_to" in r]


def test_steps_within_a_budget():
    assert steps_within(120, elapsed_s=90, step=3, step_s=30, total=10) == 4
    assert steps_within(1000, elapsed_s=90, step=3, step_s=30, total=10) == 10  # fits: as asked
    assert steps_within(60, elapsed_s=90, step=3, step_s=30, total=10) == 3  # over: stop now
    for bad in (0, float("inf"), float("nan")):  # inf overflowed the cut once steps were timed
        with pytest.raises(MarginError, match="max_minutes must be positive"):
            TrainConfig(max_minutes=bad)


def test_a_time_budget_times_steps_from_the_end_of_the_first():
    budget = TimeBudget(2)  # 120 s
    assert budget.steps(1, elapsed_s=50, total=10) == 10  # the first step (slow): not timed
    assert budget.steps(2, elapsed_s=60, total=10) == 10  # one step timed: too few to cut on
    assert budget.steps(3, elapsed_s=70, total=10) == 8  # 10 s a step: 5 more fit (not 2)
    assert budget.step_s == 10


def test_finetune_says_when_its_budget_cut_the_steps(
    make_rag, index, tmp_path, monkeypatch, capsys, fake_clock
):
    monkeypatch.setenv("MARGIN_HOME", str(tmp_path / "home"))
    model_dir = save_model(make_rag(), tmp_path / "model")
    data = tmp_path / "dev.tsv"
    data.write_text("".join(f"{q}\t{[a, *(t for t, _ in DOCS)]}\n" for q, a in TASK))
    args = ["finetune", str(data), "--model", str(model_dir), "--index", str(index),
            "--retriever", "none", "--heldout", "5", "--steps", "6"]
    assert main([*args, "--max-minutes", "-1"]) == 2
    assert "max_minutes must be positive" in capsys.readouterr().err
    fake_clock.tick = 15.0  # 2 micro-batches a step: 30 s; 2.25 minutes hold 4 steps
    assert main([*args, "--max-minutes", "2.25"]) == 0
    out = capsys.readouterr().out
    assert ("trained 4 of the 6 steps asked for (the rest did not fit --max-minutes 2.25) of 8 "
            "questions, drawn from 3 questions with a gold answer in their passages") in out
    assert load_model("finetuned", index).default_k == 2


def test_question_selection_puts_the_answer_the_passages_hold_first(make_rag):
    rag = make_rag()
    examples = [
        Example("a", "capital of france ?", ("tokyo", "PARIS", "paris")),  # "paris": in a passage
        Example("b", "capital of japan ?", ("tokyo", "edo")),  # in no passage: ungrounded
        Example("c", "who painted the mona lisa ?", ("leonardo",)),
        Example("d", "what is in paris ?", ("pari",)),  # whole words only: "pari" is not "paris"
    ]
    k = len(DOCS)  # every passage
    kept, others = select_questions(rag, examples, k, batch=3, progress=False)
    # found answers first, the one written verbatim ("paris", not "PARIS") first of all
    assert [(e.id, e.answers) for e in kept] == [("a", ("paris", "PARIS", "tokyo")),
                                                 ("c", ("leonardo",))]
    assert others == []  # none asked for
    kept, others = select_questions(rag, examples, k, None, ungrounded=5, progress=False)
    assert [e.id for e in others] == ["b", "d"] and others[0] is examples[1]  # untouched
    kept, others = select_questions(rag, examples, k, 1, ungrounded=1, batch=1, progress=False)
    assert ([e.id for e in kept], [e.id for e in others]) == (["a"], ["b"])
    assert select_questions(rag, examples[1:2], k, progress=False) == ([], [])
    rag.retriever = None
    with pytest.raises(MarginError, match="no retriever"):
        select_questions(rag, examples, k=2, progress=False)


def test_finetune_mixes_in_the_asked_share_of_ungrounded_questions(
    make_rag, index, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MARGIN_HOME", str(tmp_path / "home"))
    model_dir = save_model(make_rag(), tmp_path / "model")
    data = tmp_path / "dev.tsv"
    every_title = [t for t, _ in DOCS]  # some title is in any top 2: grounded
    rows = [(q, every_title if i % 2 else ["tokyo"]) for i, (q, _) in enumerate(TASK * 2)]
    data.write_text("".join(f"{q}\t{answers}\n" for q, answers in rows))
    args = ["finetune", str(data), "--model", str(model_dir), "--index", str(index),
            "--retriever", "none", "--heldout", "0", "--steps", "1"]  # 1 step x 4 x 2 = 8 questions
    assert main([*args, "--ungrounded", "0.25"]) == 0
    assert "trained on 6 questions with a gold answer in their passages and 2 without" in (
        capsys.readouterr().out)
    assert main([*args, "--name", "other", "--ungrounded", "1"]) == 2
    assert "ungrounded share must be in [0, 1), got 1.0" in capsys.readouterr().err
    assert not (tmp_path / "home" / "models" / "other").exists()
    # by epochs: every grounded question (8) and ungrounded ones in proportion, 8 x 0.25 / 0.75;
    # the installed model answers with the k it was trained with
    epochs = ["--name", "epochs", "--ungrounded", "0.25", "--epochs", "1", "--k", "3",
              "--mode", "sequence"]
    assert main([*args[:-2], *epochs]) == 0
    assert "trained on 8 questions with a gold answer in their passages and 3 without" in (
        capsys.readouterr().out)
    tuned = load_model("epochs", index)
    assert (tuned.default_k, tuned.default_mode) == (3, "sequence")
    assert main([*args, "--name", "bad", "--mode", "tokens"]) == 2
    assert "unknown mode 'tokens'" in capsys.readouterr().err
    assert not (tmp_path / "home" / "models" / "bad").exists()
    assert main([*args, "--name", "both", "--epochs", "2"]) == 2
    assert "--steps and --epochs both set" in capsys.readouterr().err
    assert not (tmp_path / "home" / "models" / "both").exists()
    assert main([*args, "--name", "half", "--precision", "fp16", "--device", "cpu"]) == 2
    assert "--precision fp16 needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "home" / "models" / "half").exists()
    assert main([*args, "--name", "bf16", "--precision", "bf16", "--device", "cpu"]) == 0
    state = json.loads((tmp_path / "home" / "runs" / "bf16" / "state" / "state.json").read_text())
    assert state["config"]["precision"] == "bf16"
    assert (tmp_path / "home" / "models" / "bf16" / "margin_model.json").is_file()


def test_finetune_without_grounded_questions_fails_in_one_line_unless_all_questions(
    make_rag, index, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MARGIN_HOME", str(tmp_path / "home"))
    model_dir = save_model(make_rag(), tmp_path / "model")
    data = tmp_path / "dev.tsv"
    data.write_text("".join(f"{q}\t['tokyo']\n" for q, _ in TASK))
    assert main(["finetune", str(data), "--model", str(model_dir), "--index", str(index),
                 "--retriever", "none", "--heldout", "5", "--steps", "1"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the selection's progress bar
    assert err.startswith("margin: error: none of the 3 training questions")
    assert "--all-questions" in err
    assert not (tmp_path / "home" / "models" / "finetuned").exists()
    assert main(["finetune", str(data), "--model", str(model_dir), "--index", str(index),
                 "--retriever", "none", "--heldout", "5", "--steps", "1", "--all-questions"]) == 0
    assert "trained on 3 questions (the training slices hold 3)" in capsys.readouterr().out
    assert main(["finetune", str(data), "--model", str(model_dir), "--index", str(index),
                 "--retriever", "none", "--heldout", "5", "--all-questions", "--ungrounded",
                 "0.5"]) == 2
    assert "drop one of the two" in capsys.readouterr().err
    assert (tmp_path / "home" / "models" / "finetuned" / "margin_model.json").is_file()


# ----------------------------------------------------------------------------- small pieces


def test_learning_rate_warms_up_then_decays_linearly():
    factors = [lr_factor(s, warmup=2, total=6) for s in range(6)]
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])


def test_target_choice_skips_junk_answers():
    import random

    assert pick_target(("\U0001f600", "Paris"), "first", random.Random(0)) == "Paris"
    picks = {pick_target(("a", "b", "!"), "sample", random.Random(s)) for s in range(20)}
    assert picks == {"a", "b"}


def test_margin_train_says_when_its_budget_cut_the_steps(make_rag, index, tmp_path, capsys,
                                                         fake_clock):
    model_dir = save_model(make_rag(), tmp_path / "model")
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"{q}\t{[a]}\n" for q, a in TASK))
    args = ["train", "--train", str(data), "--model", str(model_dir), "--index", str(index),
            "--steps", "6", "--batch-size", "2"]
    fake_clock.tick = 30.0  # 30 s a step: 2.5 minutes hold 5 steps
    assert main([*args, "--out", str(tmp_path / "cut"), "--max-minutes", "2.5"]) == 0
    captured = capsys.readouterr()
    assert "6 steps would not end within the 2.5 minutes left" in captured.err
    assert ("trained 5 of the 6 steps asked for (the rest did not fit --max-minutes 2.5) in "
            in captured.out)
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert "trained 6 steps in " in capsys.readouterr().out
