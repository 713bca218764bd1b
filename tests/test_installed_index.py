"""An installed model carries its index (issue 26, item 3).

The world: a tiny random sentence-transformers model plays the default passage encoder, and the
default index (``$MARGIN_HOME/indexes/default-minilm-flat``) is built with it over passages with
ids ``default-*``. A copy of it with nudged weights plays a trained passage encoder; the
re-encoded index, built with that copy, holds the same texts with ids ``new-*``, so every hit
says which index answered. ``new_model`` was saved over the re-encoded index (its
``index_encoder_fingerprint`` is the nudged encoder's), ``plain_model`` over the default one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import TRAIN_CONFIG as CONFIG
from helpers import TRAIN_DOCS as DOCS
from helpers import TRAIN_TASK as TASK
from helpers import one_thread, tiny_llama
from margin.cli import main
from margin.errors import MarginError
from margin.generation.decoding import DecodeConfig
from margin.models import (
    carried_index,
    install_model,
    make_generator,
    resolve_model_index,
    save_model,
)
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.encoders import load_encoder
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import DEFAULT_INDEX_NAME, Retriever, default_index_dir

QUESTION = "what is the capital of france ?"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory, st_model):
    root = tmp_path_factory.mktemp("installed")
    default_encoder = load_encoder(st_model, role="passage")
    nudged = load_encoder(st_model, role="passage")
    with torch.no_grad():
        for p in nudged.module.parameters():
            p.add_(0.05)  # as if contrastive training had moved the passage encoder
    nudged.save(root / "passage-encoder")
    nudged = load_encoder(root / "passage-encoder", role="passage")
    assert nudged.fingerprint != default_encoder.fingerprint
    default_index = root / "home" / "indexes" / DEFAULT_INDEX_NAME
    new_index = root / "reencoded"
    build_index([Passage(f"default-{i}", t, x) for i, (t, x) in enumerate(DOCS)],
                default_encoder, default_index, progress=False)
    build_index([Passage(f"new-{i}", t, x) for i, (t, x) in enumerate(DOCS)],
                nudged, new_index, progress=False)
    model, tok = tiny_llama()
    model.save_pretrained(root / "gen")
    tok.save_pretrained(root / "gen")

    def saved(index: Path, out: Path) -> Path:
        question = load_encoder(st_model, role="question")
        retriever = Retriever(open_index(index), question, check=False)
        rag = RAG(make_generator(root / "gen", "causal", CONFIG), retriever, doc_score_scale=5.0,
                  default_decode=DecodeConfig(max_new_tokens=2), config=CONFIG)
        return save_model(rag, out)

    return SimpleNamespace(
        default_index=default_index, new_index=new_index,
        default_fp=default_encoder.fingerprint[:12], new_fp=nudged.fingerprint[:12],
        new_model=saved(new_index, root / "new-model"),
        plain_model=saved(default_index, root / "plain-model"),
    )


@pytest.fixture
def home(world, tmp_path, monkeypatch):
    """A fresh $MARGIN_HOME holding the world's default index."""
    home = tmp_path / "home"
    shutil.copytree(world.default_index, home / "indexes" / DEFAULT_INDEX_NAME)
    monkeypatch.setenv("MARGIN_HOME", str(home))
    assert default_index_dir() == home / "indexes" / DEFAULT_INDEX_NAME
    return home


def hit_ids(rag: RAG) -> list[str]:
    return [p.id for p in rag.retriever.retrieve([QUESTION], k=3).passages[0]]


# ----------------------------------------------------------------------------- the Python API


def test_an_installed_model_opens_the_index_it_carries(world, home):
    path = install_model(world.new_model, "mine", index=world.new_index)
    own = path / "index"
    assert path == home / "models" / "mine" and carried_index("mine") == own
    assert resolve_model_index("mine", "auto") == own
    for rel in open_index(own).manifest.own_files():  # linked, not copied
        assert os.path.samefile(world.new_index / rel, own / rel)
    assert not os.path.samefile(world.new_index / "manifest.json", own / "manifest.json")
    rag = RAG.load("mine")  # index "auto"
    assert rag.retriever.index.path == own
    assert [i.split("-")[0] for i in hit_ids(rag)] == ["new"] * 3
    # installed again under another name, the model keeps the index it carries
    assert carried_index(install_model(path, "again")) == home / "models" / "again" / "index"


def test_an_explicit_index_of_another_passage_encoder_is_refused_in_one_line(world, home):
    own = install_model(world.new_model, "mine", index=world.new_index) / "index"
    for index in ("default", str(world.default_index)):
        with pytest.raises(MarginError) as caught:
            RAG.load("mine", index=index)
        message = str(caught.value)
        assert "\n" not in message
        assert f"passage encoder sha256 {world.default_fp}" in message
        assert f"expects {world.new_fp}" in message
        assert f"leave the index out (or give 'auto') to use the one the model carries, {own}" \
            in message


def test_an_explicit_index_of_the_same_passage_encoder_is_accepted(world, home):
    own = install_model(world.new_model, "mine", index=world.new_index) / "index"
    assert RAG.load("mine", index=str(world.new_index)).retriever.index.path == world.new_index
    assert RAG.load("mine", index=str(own)).retriever.index.path == own
    assert RAG.load("mine", index=None).retriever is None  # None: no retriever, as before


def test_a_model_without_its_own_index_gets_the_default_one(world, home):
    path = install_model(world.plain_model, "plain")
    assert not (path / "index").exists() and carried_index("plain") is None
    assert resolve_model_index("plain", "auto") == "default"
    assert resolve_model_index("default", "auto") == "default"
    for model in ("plain", str(world.plain_model)):
        rag = RAG.load(model)
        assert rag.retriever.index.path == default_index_dir()
        assert [i.split("-")[0] for i in hit_ids(rag)] == ["default"] * 3


def test_installing_refuses_a_mismatched_index_or_a_bad_name_and_writes_nothing(world, home):
    with pytest.raises(MarginError, match=f"sha256 {world.default_fp} but model"):
        install_model(world.new_model, "mine", index=world.default_index)
    for name in ("a/b", "default", "", ".."):
        with pytest.raises(MarginError, match="model name"):
            install_model(world.new_model, name, index=world.new_index)
    with pytest.raises(MarginError, match="not a margin model"):
        install_model(world.new_index, "mine")
    assert not (home / "models").exists() or not list((home / "models").iterdir())


def test_an_index_is_copied_where_hard_links_fail(world, home, monkeypatch):
    import margin.models

    def no_links(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(margin.models.os, "link", no_links)
    own = install_model(world.new_model, "mine", index=world.new_index) / "index"
    for rel in open_index(own).manifest.own_files():
        assert not os.path.samefile(world.new_index / rel, own / rel)
        assert (world.new_index / rel).read_bytes() == (own / rel).read_bytes()
    assert RAG.load("mine").retriever.index.path == own


# ----------------------------------------------------------------------------- the commands


def test_ask_and_eval_use_the_carried_index_and_refuse_a_mismatched_one(world, home, tmp_path,
                                                                        capsys):
    own = install_model(world.new_model, "mine", index=world.new_index) / "index"
    args = ["ask", "--model", "mine", "--k", "2", "--max-new-tokens", "1", "--json", "--device",
            "cpu", QUESTION]
    assert main(args) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [p["id"].split("-")[0] for p in answer["passages"]] == ["new", "new"]
    assert main([*args[:-1], "--index", "default", QUESTION]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("margin: error: index ")
    assert world.new_fp in err and world.default_fp in err

    data = tmp_path / "dev.tsv"
    data.write_text(f"{QUESTION}\t['paris']\n")
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(data), "--model", "mine", "--k", "2", "--max-new-tokens",
                 "1", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "run.json").read_text())["index"] == str(own)
    capsys.readouterr()
    assert main(["eval", "--data", str(data), "--model", "mine", "--index", "default",
                 "--out", str(tmp_path / "eval2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"expects {world.new_fp}" in err
    assert not (tmp_path / "eval2").exists()


def test_serve_uses_the_carried_index_unless_told_another(world, home, monkeypatch):
    pytest.importorskip("fastapi")
    import margin.serving.server as server
    from margin.serving.config import ServeConfig

    own = install_model(world.new_model, "mine", index=world.new_index) / "index"
    apps = []
    monkeypatch.setattr(server, "run_server", lambda app, config: apps.append(app))
    server.serve("mine", [], ServeConfig())
    active = apps[0].state.registry.active
    assert active.id == "default" and active.path == own
    server.serve("mine", ["auto", f"same={world.new_index}"], ServeConfig())
    assert [e.path for e in apps[1].state.registry.entries()] == [own, world.new_index]
    with pytest.raises(MarginError, match=f"expects {world.new_fp}"):
        server.serve("mine", ["default"], ServeConfig())


def test_finetune_installs_the_model_with_the_reencoded_index(world, home, tmp_path, capsys):
    from margin.training.recipe import index_to_carry

    data = tmp_path / "dev.tsv"
    titles = [t for t, _ in DOCS]  # some title is in any top 2: every question is grounded
    data.write_text("".join(f"{q}\t{[a, *titles]}\n" for q, a in TASK))
    assert main(["finetune", str(data), "--model", str(world.new_model), "--index",
                 str(world.new_index), "--heldout", "5", "--steps", "1", "--device", "cpu",
                 "--retriever", "none"]) == 0
    capsys.readouterr()
    own = home / "models" / "finetuned" / "index"
    assert open_index(own).manifest.encoder == open_index(world.new_index).manifest.encoder
    rag = RAG.load("finetuned")
    assert rag.retriever.index.path == own
    assert [i.split("-")[0] for i in hit_ids(rag)] == ["new"] * 3
    # trained over the default index, or another built with its passage encoder: nothing to carry
    assert index_to_carry(RAG.load(world.plain_model)) is None
    other = tmp_path / "same-encoder"
    shutil.copytree(default_index_dir(), other)
    assert index_to_carry(RAG.load(world.plain_model, index=str(other))) is None
    assert index_to_carry(rag) == own


def test_finetune_trains_the_retriever_first_and_installs_the_model_with_its_new_index(
        world, home, tmp_path, capsys):
    """The full recipe (issue 26, item 4): contrastive training of both encoders, the index
    re-encoded with the trained passage encoder, the RAG fine-tune over it, all installed; run
    again, it resumes and redoes nothing."""
    data = tmp_path / "dev.tsv"
    data.write_text("".join(f"{q}\t{[a]}\n" for q, a in TASK * 3))
    args = ["finetune", str(data), "--model", str(world.plain_model), "--index",
            str(world.default_index), "--heldout", "2", "--steps", "1", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = home / "runs" / "finetuned"
    trained = load_encoder(run / "retriever" / "last" / "passage_encoder", role="passage")
    assert trained.fingerprint[:12] != world.default_fp  # the passage encoder learnt
    refreshed = open_index(run / "index").manifest
    assert refreshed.encoder["fingerprint"] == trained.fingerprint  # re-encoded with it
    assert f"searching {home / 'models' / 'finetuned' / 'index'}" in out
    assert "retriever: " in out and " steps on " in out
    own = home / "models" / "finetuned" / "index"
    assert open_index(own).manifest.encoder["fingerprint"] == trained.fingerprint
    rag = RAG.load("finetuned")
    assert rag.retriever.index.path == own
    with pytest.raises(MarginError, match=f"expects {trained.fingerprint[:12]}"):
        RAG.load("finetuned", index=str(world.default_index))  # the old index no longer fits
    # the RAG stage trained over the new retrieval: its question encoder started from stage 1's
    stage1 = load_encoder(run / "retriever" / "last" / "question_encoder", role="question")
    assert stage1.fingerprint != load_encoder(world.plain_model / "question_encoder",
                                              role="question").fingerprint
    def logs() -> tuple[bytes, list[str]]:  # the RAG run logs its end again when resumed
        steps = [line for line in (run / "log.jsonl").read_text().splitlines() if "loss" in line]
        return (run / "retriever" / "log.jsonl").read_bytes(), steps

    before = logs()
    assert main(args) == 0  # resumed: both stages read back, nothing trained again
    assert logs() == before


def test_finetune_refuses_an_unknown_retriever_stage(home, tmp_path, capsys):
    data = tmp_path / "dev.tsv"
    data.write_text("".join(f"{q}\t{[a]}\n" for q, a in TASK * 3))
    assert main(["finetune", str(data), "--heldout", "2", "--retriever", "both"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown --retriever 'both'" in err
    assert not (home / "runs" / "finetuned").exists()
