"""Data-parallel fine-tuning: two torchrun-style processes with Ray-served retrieval train exactly
as one process does.

The model is test_train.py's (tests/helpers.py: tiny random Llama, tiny sentence-transformers
question encoder over a 6-passage index) with every dropout at 0, so a step is deterministic: the
only difference between one process and two is who computes which rows, and the summed gradients
make that invisible in the loss.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_BERT, bert_tokenizer, one_thread, tiny_llama
from helpers import TRAIN_CONFIG as CONFIG
from helpers import TRAIN_DOCS as DOCS
from helpers import TRAIN_TASK as TASK
from margin.cli import main
from margin.generation.decoding import DecodeConfig
from margin.models import make_generator, save_model
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.encoders import load_encoder
from margin.retrieval.passages import Passage
from margin.retrieval.retriever import Retriever
from margin.training.data_parallel import SINGLE, World, sum_gradients

SRC = Path(__file__).parent.parent / "src"


def test_a_process_takes_every_world_size_th_row():
    rows = np.arange(7)
    assert World(0, 2).shard(rows).tolist() == [0, 2, 4, 6]
    assert World(1, 2).shard(rows).tolist() == [1, 3, 5]
    assert SINGLE.shard(rows).tolist() == list(range(7))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    sum_gradients([p], SINGLE)  # one process: nothing to sum, nothing changes
    assert p.grad.tolist() == [2.0, 2.0, 2.0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved margin model and its index, every dropout 0."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("ddp")
    with one_thread():
        torch.manual_seed(0)
        config = BertConfig(**{**TINY_BERT, "hidden_dropout_prob": 0.0,
                               "attention_probs_dropout_prob": 0.0})
        BertModel(config).save_pretrained(root / "hf")
        bert_tokenizer().save_pretrained(root / "hf")
        transformer = Transformer(str(root / "hf"), max_seq_length=48)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(
            str(root / "st")
        )
        passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(DOCS)]
        build_index(passages, load_encoder(str(root / "st"), role="passage"), root / "index",
                    progress=False)
        model, tok = tiny_llama()
        model.save_pretrained(root / "gen")
        tok.save_pretrained(root / "gen")
        rag = RAG(make_generator(root / "gen", "causal", CONFIG), Retriever.load(root / "index"),
                  doc_score_scale=5.0, default_decode=DecodeConfig(max_new_tokens=3), config=CONFIG)
        save_model(rag, root / "model")
    data = root / "train.tsv"
    data.write_text("".join(f"{q}\t['{a}']\n" for q, a in TASK), encoding="utf-8")
    return root


def losses(out: Path) -> list[float]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_ray_retrieval_train_like_one(model_dir, ray_cluster, tmp_path):
    ray = ray_cluster
    args = ["train", "--model", str(model_dir / "model"), "--index", str(model_dir / "index"),
            "--train", str(model_dir / "train.tsv"), "--k", "2", "--batch-size", "4",
            "--steps", "3", "--lr", "3e-3", "--seed", "0"]
    with one_thread():
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = losses(tmp_path / "one")

    port, address = free_port(), ray.get_runtime_context().gcs_address
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "margin.cli", *args, "--out", str(tmp_path / "two"),
           "--ray-retrieval", "--ray-address", address]
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "trained 3 steps" in out
    two = losses(tmp_path / "two")
    assert len(one) == len(two) == 3 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-5)
    assert (tmp_path / "two" / "last" / "margin_model.json").is_file()


def test_ray_retrieval_refuses_bm25(tmp_path, capsys):
    train = tmp_path / "x.jsonl"  # valid data: only the flags can be refused
    train.write_text(json.dumps({"question": "who?", "answers": ["me"]}) + "\n")
    assert main(["train", "--train", str(train), "--out", str(tmp_path / "o"),
                 "--retriever", "bm25", "--ray-retrieval"]) == 2
    err = capsys.readouterr().err
    assert err == ("margin: error: --ray-retrieval serves dense indexes; drop it or "
                   "--retriever bm25\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]  # nothing written
