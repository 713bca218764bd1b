"""margin's own checkpoint format: save, load, and refusing an index from another encoder."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import DOCS, KeywordEncoder, one_thread, tiny_llama
from margin.errors import MarginError
from margin.generation.decoding import DecodeConfig
from margin.model_config import MODEL_FILE, ModelConfig
from margin.models import load_model, make_generator, save_model
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.encoders import PAIRING_FILE, load_encoder
from margin.retrieval.passages import split_document
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever

QUESTIONS = ["where is the tower ?", "what is the capital of france ?"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def index(tmp_path_factory, st_model):
    out = tmp_path_factory.mktemp("models") / "index"
    passages = [
        p for i, d in enumerate(DOCS) for p in split_document(d["title"], d["text"], str(i))
    ]
    build_index(passages, load_encoder(st_model, role="passage"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def rag(tmp_path_factory, index):
    model, tok = tiny_llama()
    gen_dir = tmp_path_factory.mktemp("gen")
    model.save_pretrained(gen_dir)
    tok.save_pretrained(gen_dir)
    config = ModelConfig(generator_kind="causal", prompt="chat", doc_score_scale=7.0,
                         decode=DecodeConfig(max_new_tokens=4), stop_at_newline=False)
    rag = RAG(make_generator(gen_dir, "causal", config), Retriever.load(index),
              doc_score_scale=7.0, default_decode=DecodeConfig(max_new_tokens=4), config=config)
    return rag


def test_save_load_round_trip_gives_the_same_answers(rag, index, tmp_path):
    before = rag.ask(QUESTIONS, k=3, mode="sequence", decoding="beam", num_beams=2)
    out = save_model(rag, tmp_path / "model")
    record = json.loads((out / MODEL_FILE).read_text())
    assert record["format"] == "margin-rag" and record["doc_score_scale"] == 7.0
    assert record["index_encoder_fingerprint"] == open_index(index).manifest.encoder["fingerprint"]
    assert (out / "generator" / "model.safetensors").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))  # never pickle
    loaded = load_model(out, index)
    after = loaded.ask(QUESTIONS, k=3, mode="sequence", decoding="beam", num_beams=2)
    for a, b in zip(before, after, strict=True):
        assert a.answer == b.answer
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [p.id for p in a.passages] == [p.id for p in b.passages]
        assert [p.prior for p in a.passages] == pytest.approx([p.prior for p in b.passages])


def test_trained_question_encoder_survives_the_round_trip(rag, index, tmp_path):
    encoder = rag.question_encoder
    with torch.no_grad():
        for p in encoder.module.parameters():
            p.add_(0.01)  # as if a training step had moved it
    try:
        out = save_model(rag, tmp_path / "model")
        loaded = load_model(out, index)
        assert loaded.question_encoder.fingerprint == encoder.fingerprint
        torch.testing.assert_close(loaded.question_encoder.embed_queries(QUESTIONS),
                                   encoder.embed_queries(QUESTIONS))
        # its directory names the passage encoder it goes with, so the model's index takes it
        # as a --query-encoder; without that record its other weights are refused
        Retriever.load(index, query_encoder=out / "question_encoder")
        (out / "question_encoder" / PAIRING_FILE).unlink()
        with pytest.raises(MarginError, match="has other weights"):
            Retriever.load(index, query_encoder=out / "question_encoder")
    finally:
        with torch.no_grad():
            for p in encoder.module.parameters():
                p.sub_(0.01)


def test_an_index_from_another_passage_encoder_is_refused(rag, tmp_path):
    out = save_model(rag, tmp_path / "model")
    other = tmp_path / "other"
    passages = [p for d in DOCS for p in split_document(d["title"], d["text"])]
    build_index(passages, KeywordEncoder(), other, progress=False)
    with pytest.raises(MarginError, match="passage encoder"):
        load_model(out, other)


def test_a_newer_format_is_refused_in_one_line(rag, tmp_path):
    out = save_model(rag, tmp_path / "model")
    record = json.loads((out / MODEL_FILE).read_text())
    (out / MODEL_FILE).write_text(json.dumps(dict(record, version=99)))
    with pytest.raises(MarginError, match="upgrade margin"):
        load_model(out, None)


def test_to_moves_every_network_once_and_leaves_the_index(rag, monkeypatch):
    """RAG.to moves the generator and each distinct question encoder (the retriever's own, when
    it has another) to the resolved device; the FAISS index is not a torch module and stays."""
    from margin.retrieval.encoders import load_encoder_from_spec

    other = load_encoder_from_spec(dict(rag.question_encoder.spec))  # e.g. a frozen retriever's
    view = RAG(rag.generator, Retriever(rag.retriever.index, other, check=False),
               question_encoder=rag.question_encoder)
    moved = []
    for name, module in (("generator", view.generator.model),
                         ("question", view.question_encoder.module), ("retriever", other.module)):
        monkeypatch.setattr(module, "to", lambda device, name=name: moved.append((name, device)))
    assert view.to("auto") is view
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert sorted(moved) == [("generator", auto), ("question", auto), ("retriever", auto)]


def test_to_refuses_a_missing_device_before_moving_anything(rag, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    moved = []
    monkeypatch.setattr(rag.generator.model, "to", lambda device: moved.append(device))
    with pytest.raises(MarginError, match="no CUDA GPU"):
        rag.to("cuda")
    assert moved == []


def test_load_model_checks_the_device_before_loading(rag, index, tmp_path, monkeypatch):
    out = save_model(rag, tmp_path / "model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MarginError, match="no CUDA GPU"):
        load_model(tmp_path / "no-such-model", index, device="cuda")  # not "no such model"
    loaded = load_model(out, index, device="cpu")
    assert loaded.generator.device == torch.device("cpu")
    assert loaded.question_encoder.device == torch.device("cpu")
    assert loaded.ask(QUESTIONS[:1], k=2)[0].answer == rag.ask(QUESTIONS[:1], k=2)[0].answer
