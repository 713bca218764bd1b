"""`margin train --passage-encoder train [--refresh-every N]` (margin.training.end2end): the
passage encoder d(z) learns through the document prior p(z|x) ∝ exp(s · d(z)ᵀq(x)), and the index
is re-encoded and swapped in between steps.

The setting is tests/test_train.py's: 8 questions over a 6-passage corpus, a tiny random Llama
generator and a tiny random sentence-transformers retriever, here without dropout so that a
trained run at step 0 and the frozen one compute the same function. The background refresh is
replaced by one that runs the real refresh (margin.retrieval.refresh.refresh_index) at once and
hands it over after ``lag`` polls, so the swap step is known; one slow test runs the real
background process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import (
    TINY_BERT,
    TRAIN_CONFIG,
    TRAIN_DOCS,
    TRAIN_TASK,
    bert_tokenizer,
    one_thread,
    tiny_llama,
)
from margin.cli import main
from margin.errors import MarginError
from margin.evaluation.examples import Example
from margin.generation.decoding import DecodeConfig
from margin.models import load_model, make_generator
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.encoders import load_encoder
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.refresh import BackgroundRefresh, refresh_index
from margin.retrieval.retriever import Retriever
from margin.training import end2end
from margin.training.config import TrainConfig
from margin.training.end2end import PassageTower, load_passage_encoder
from margin.training.schedule import micro_batches
from margin.training.train import train

EXAMPLES = [Example(f"ex{i}", q, (a,)) for i, (q, a) in enumerate(TRAIN_TASK)]
FAST = dict(k=2, batch_size=4, grad_accum=2, lr=3e-3, retriever_lr=1e-3, seed=0, device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dropout-free tiny sentence-transformers encoder, its index, and a tiny Llama."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("end2end")
    with one_thread():
        torch.manual_seed(0)
        config = dict(TINY_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        BertModel(BertConfig(**config)).save_pretrained(root / "hf")
        bert_tokenizer().save_pretrained(root / "hf")
        transformer = Transformer(str(root / "hf"), max_seq_length=48)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(
            str(root / "st"))
        passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(TRAIN_DOCS)]
        build_index(passages, load_encoder(root / "st", role="passage"), root / "index",
                    progress=False)
        model, tok = tiny_llama()
        model.save_pretrained(root / "gen")
        tok.save_pretrained(root / "gen")
    return root


def make_rag(world) -> RAG:
    return RAG(make_generator(world / "gen", "causal", TRAIN_CONFIG),
               Retriever.load(world / "index"), doc_score_scale=5.0,
               default_decode=DecodeConfig(max_new_tokens=3), config=TRAIN_CONFIG)


def run(world, out, on_step=None, resume=False, **config):
    with one_thread():
        return train(make_rag(world), EXAMPLES, out, TrainConfig(**{**FAST, **config}),
                     progress=False, on_step=on_step, resume=resume)


def log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(out) -> list[float]:
    return [r["loss"] for r in log(out) if "loss" in r]


class Stop(Exception):
    """Raised from on_step: a run killed after a step (and after that step's save)."""


class SoonRefresh:
    """BackgroundRefresh's contract with a known timing: ``start`` runs the real refresh at
    once; ``poll`` returns None ``lag`` times, then the new index, once."""

    lag = 0
    made: list[SoonRefresh] = []

    def __init__(self, index, work, device="cpu"):
        self.index, self.work, self.started, self.waiting, self.closed = index, work, [], None, 0
        SoonRefresh.made.append(self)

    def start(self, encoder_dir, step):
        if self.waiting is not None:
            return False
        out = self.work / f"index-step{step}"
        refresh_index(self.index, encoder_dir, out, progress=False)
        self.started.append((step, str(self.index), str(encoder_dir)))
        self.waiting = [out, self.lag]
        return True

    def poll(self):
        if self.waiting is None:
            return None
        if self.waiting[1] > 0:
            self.waiting[1] -= 1
            return None
        out, self.waiting = self.waiting[0], None
        self.index = out
        return out

    def close(self):
        self.closed += 1
        self.waiting = None


@pytest.fixture
def soon(monkeypatch):
    """SoonRefresh in place of BackgroundRefresh; set ``SoonRefresh.lag`` in the test."""
    SoonRefresh.made, SoonRefresh.lag = [], 0
    monkeypatch.setattr(end2end, "make_refresher", SoonRefresh)
    return SoonRefresh


@pytest.fixture
def versions(monkeypatch):
    """Which index each step used: per step, one ("retrieved", index) per retrieval and one
    ("scored", index the scored hits came from) per document-score computation."""
    steps: list[list[tuple[str, str]]] = [[]]
    origin: dict[int, str] = {}
    retrieve, vectors = Retriever.retrieve_by_vector, PassageTower.vectors

    def by_vector(self, *args, **kwargs):
        hits = retrieve(self, *args, **kwargs)
        origin[id(hits)] = str(self.index.path)
        steps[-1].append(("retrieved", origin[id(hits)]))
        return hits

    def scored(self, hits):
        steps[-1].append(("scored", origin[id(hits)]))
        return vectors(self, hits)

    monkeypatch.setattr(Retriever, "retrieve_by_vector", by_vector)
    monkeypatch.setattr(PassageTower, "vectors", scored)
    return steps, lambda record: steps.append([])


# ----------------------------------------------------------------------------- the gradient


def test_the_loss_gradient_reaches_the_passage_encoder_through_the_prior(world):
    """d(z) re-encoded from the passages' text gives the stored vectors' loss at step 0, and the
    gradient w.r.t. a passage-encoder weight is non-zero and what finite differences give."""
    rag = make_rag(world)
    encoder = load_passage_encoder(rag, "cpu")
    tower = PassageTower(encoder, world / "unused", 0, "cpu")
    questions = [q for q, _ in TRAIN_TASK[:4]]
    answers = [a for _, a in TRAIN_TASK[:4]]
    with one_thread():
        hits = rag.retrieve(questions, 2)
        stored = rag.loss(questions, answers, k=2, hits=hits)
        vectors = tower.vectors(hits)  # (4, 2, d)
        np.testing.assert_allclose(vectors.detach().numpy(), hits.vectors, atol=1e-5)
        loss = rag.loss(questions, answers, k=2, hits=hits, passage_vectors=vectors)
        assert loss.item() == pytest.approx(stored.item(), rel=1e-5)
        loss.backward()
        weight = encoder.module[0].auto_model.encoder.layer[1].output.dense.weight
        grad = weight.grad.clone()
        assert grad.abs().sum() > 0
        i, j = np.unravel_index(int(grad.abs().argmax()), grad.shape)
        eps, moved = 1e-2, []
        with torch.no_grad():
            for sign in (1, -1):
                weight[i, j] += sign * eps
                moved.append(rag.loss(questions, answers, k=2, hits=hits,
                                      passage_vectors=tower.vectors(hits)).item())
                weight[i, j] -= sign * eps
        finite = (moved[0] - moved[1]) / (2 * eps)
        assert finite == pytest.approx(grad[i, j].item(), rel=2e-2)
        # the generator never sees d(z): without the prior, no gradient reaches the encoder
        encoder.module.zero_grad()
        rag.loss(questions, answers, k=2, hits=hits).backward()
        assert all(p.grad is None or not p.grad.any() for p in encoder.module.parameters())


def test_one_step_trains_the_passage_encoder_and_frozen_is_todays_loss(world, tmp_path):
    frozen = run(world, tmp_path / "frozen", steps=1)
    trained = run(world, tmp_path / "trained", steps=1, passage_encoder="train")
    # frozen: the loss of today's path (RAG.loss over the index's vectors), bit for bit
    rag = make_rag(world)
    batches = micro_batches(len(EXAMPLES), TrainConfig(**FAST), 0, 0)
    want = 0.0
    with one_thread():
        for _ in range(FAST["grad_accum"]):  # the first step's micro-batches, as the loop sums
            asked = [EXAMPLES[i] for i in next(batches)[0]]
            hits = rag.retrieve([e.input for e in asked], 2)
            loss = rag.loss([e.input for e in asked], [e.answers[0] for e in asked], k=2,
                            hits=hits)
            want += (loss / FAST["grad_accum"]).item()
    assert losses(tmp_path / "frozen") == [want]
    assert losses(tmp_path / "trained")[0] == pytest.approx(want, rel=1e-5)
    assert frozen.steps == trained.steps == 1
    frozen_state = json.loads((tmp_path / "frozen" / "state" / "state.json").read_text())
    assert "current_index" not in frozen_state and not (tmp_path / "frozen" / "refresh").exists()
    # trained: the passage encoder's weights are in the state and moved; its index re-encoded
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "trained" / "state" / "trainable.safetensors"))
    names = [n for n in saved if n.startswith("passage_encoder.")]
    assert names
    original = load_encoder(world / "st", role="passage").module.state_dict()
    assert any(not torch.equal(saved[n], original[n.removeprefix("passage_encoder.")])
               for n in names)
    built = open_index(world / "index").manifest.encoder["fingerprint"]
    final = open_index(tmp_path / "trained" / "refresh" / "index-step1").manifest
    assert final.encoder["fingerprint"] != built
    [swap] = [r for r in log(tmp_path / "trained") if r.get("final")]
    assert swap["stale_max_abs"] > 0 and swap["fresh_max_abs"] == 0.0


# ----------------------------------------------------------------------------- refresh


def test_refresh_swaps_between_steps_and_a_step_never_uses_two_indexes(
    world, tmp_path, soon, versions
):
    """Refresh every 2 steps, each handed over one poll late: steps 1-3 search the original
    index, 4-5 the one encoded after step 2, 6 the one after step 4; every micro-batch of a step
    retrieves from, and is scored against the vectors of, one index."""
    soon.lag = 1
    steps, on_step = versions
    out = tmp_path / "run"
    run(world, out, steps=6, passage_encoder="train", refresh_every=2, on_step=on_step)
    steps = steps[:-1]  # the list opened after the last step stays empty
    assert [len(step) for step in steps] == [4] * 6  # 2 micro-batches: retrieved, scored each
    used = [{index for _, index in step} for step in steps]
    assert all(len(indexes) == 1 for indexes in used), used
    refresh = out / "refresh"
    assert [indexes.pop() for indexes in used] == [str(world / "index")] * 3 + [
        str(refresh / "index-step2")] * 2 + [str(refresh / "index-step4")]
    [fake] = soon.made
    assert [s for s, _, _ in fake.started] == [2, 4]
    assert fake.started[1][1] == str(refresh / "index-step2")  # re-encodes the index in use
    swaps = [r for r in log(out) if "index" in r]
    assert [(r["step"], r["refresh_steps"]) for r in swaps] == [(3, 1), (5, 1), (6, 0)]
    assert all(r["stale_max_abs"] >= r["fresh_max_abs"] for r in swaps)
    # the saved model carries the final index, with its passage encoder's fingerprint
    carried = open_index(out / "last" / "index").manifest.encoder["fingerprint"]
    record = json.loads((out / "last" / "margin_model.json").read_text())
    assert record["index_encoder_fingerprint"] == carried
    with one_thread():
        model = load_model(out / "last")  # index "auto": the one it carries
        assert model.retriever.index.path == out / "last" / "index"
        assert model.ask(["where is the seine ?"], k=2)[0].passages
    with pytest.raises(MarginError, match="leave the index out"):
        load_model(out / "last", index=world / "index")


@pytest.mark.parametrize("crash_after", [3, 4])
def test_resume_continues_on_the_index_in_use_with_the_same_losses(
    world, tmp_path, soon, crash_after
):
    """Saved every 2 steps, refreshed every 2, handed over one poll late. Killed after step 3
    (state of step 2: a refresh pending) or 4 (on the refreshed index, another pending),
    resumed: the same indexes step by step and the same losses as a run never stopped."""
    soon.lag = 1
    config = dict(steps=5, passage_encoder="train", refresh_every=2, save_every=2)

    def stop(record):
        if record["step"] == crash_after:
            raise Stop

    with pytest.raises(Stop):
        run(world, tmp_path / "cut", on_step=stop, **config)
    assert soon.made[-1].closed  # the refresh of a run that died is stopped
    run(world, tmp_path / "cut", resume=True, **config)
    run(world, tmp_path / "whole", **config)
    swaps = {name: [(r["step"], r["index"].split("/")[-1]) for r in log(tmp_path / name)
                    if "index" in r] for name in ("cut", "whole")}
    # the refresh started after step 4 is still pending after step 5: the final one replaces it
    assert swaps["cut"] == swaps["whole"] == [(3, "index-step2"), (5, "index-step5")]
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)
    assert [r["step"] for r in log(tmp_path / "cut") if "loss" in r] == [1, 2, 3, 4, 5]
    state = json.loads((tmp_path / "cut" / "state" / "state.json").read_text())
    assert state["current_index"] == str(tmp_path / "cut" / "refresh" / "index-step5")
    kept = sorted(p.name for p in (tmp_path / "cut" / "refresh").iterdir() if p.is_dir())
    assert kept == ["index-step5"]


@pytest.mark.slow
def test_the_background_refresh_equals_a_fresh_build_with_the_saved_encoder(
    world, tmp_path, monkeypatch
):
    """The real background process (``margin index refresh``), waited for at each poll so the
    swap step is known: the index swapped in is a fresh build with the snapshot's encoder."""
    built: list[tuple[str, np.ndarray]] = []

    class Waiting(BackgroundRefresh):
        def poll(self):
            if self._process is not None:
                self._process.wait()
            new = super().poll()
            if new is not None:
                snapshot = tmp_path / "run" / "refresh" / f"encoder-{new.name.split('-')[1]}"
                fresh = tmp_path / f"fresh-{new.name}"
                passages = open_index(world / "index").store
                build_index(passages.get(np.arange(len(passages))),
                            load_encoder(snapshot, role="passage"), fresh, progress=False)
                built.append((new.name, open_index(fresh).dense.vectors(np.arange(6)[None])[0]))
                built.append((new.name, open_index(new).dense.vectors(np.arange(6)[None])[0]))
            return new

    monkeypatch.setattr(end2end, "make_refresher",
                        lambda index, work, device: Waiting(index, work, device=device))
    run(world, tmp_path / "run", steps=3, passage_encoder="train", refresh_every=2)
    assert [name for name, _ in built] == ["index-step2", "index-step2"]
    np.testing.assert_allclose(built[0][1], built[1][1], atol=1e-6)
    swaps = [r for r in log(tmp_path / "run") if "index" in r]
    assert [(r["step"], r.get("final", False)) for r in swaps] == [(2, False), (3, True)]


# ----------------------------------------------------------------------------- refusals


def test_the_flags_that_cannot_work_are_refused_in_one_line(world, tmp_path, capsys):
    with pytest.raises(MarginError, match="add --passage-encoder train"):
        TrainConfig(refresh_every=2)
    with pytest.raises(MarginError, match="unknown passage_encoder"):
        TrainConfig(passage_encoder="both")
    with pytest.raises(MarginError, match="drop one of them"):
        TrainConfig(passage_encoder="train", freeze_retriever=True)
    with pytest.raises(MarginError, match="at least 0"):
        TrainConfig(passage_encoder="train", refresh_every=-1)
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"{q}\t['{a}']\n" for q, a in TRAIN_TASK))
    base = ["train", "--train", str(data), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*base, "--refresh-every", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--passage-encoder train" in err
    assert main([*base, "--passage-encoder", "train", "--freeze-retriever"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    bm25 = tmp_path / "bm25"
    build_index([Passage(str(i), t, x) for i, (t, x) in enumerate(TRAIN_DOCS)], None, bm25,
                kind="bm25", progress=False)
    rag = make_rag(world).with_retriever(Retriever.load(bm25), doc_score_scale=1.0)
    with pytest.raises(MarginError, match="needs a dense index"):
        train(rag, EXAMPLES, tmp_path / "bm25-run",
              TrainConfig(**{**FAST, "passage_encoder": "train"}), progress=False)
