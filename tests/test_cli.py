"""The command line as a user meets it: outputs, stdin, exit codes and one-line errors."""

from __future__ import annotations

import io
import json

import pytest
import torch

from margin.cli import main
from test_encoders import TINY, one_thread, tokenizer

DOCS = [
    {"id": "fr", "title": "paris", "text": "paris is the capital of france ."},
    {"id": "de", "title": "berlin", "text": "berlin is the capital of germany ."},
    {"id": "ml", "title": "mona lisa", "text": "the mona lisa was painted by leonardo ."},
    {"id": "ps", "title": "plants", "text": "plants use light energy in photosynthesis ."},
]


@pytest.fixture(scope="module")
def st_model(tmp_path_factory):
    """A tiny random sentence-transformers model saved to disk (no download)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("cli")
    with one_thread():
        torch.manual_seed(0)
        BertModel(BertConfig(**TINY)).save_pretrained(root / "hf")
        tokenizer().save_pretrained(root / "hf")
        transformer = Transformer(str(root / "hf"), max_seq_length=48)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(
            str(root / "st")
        )
    return root / "st"


@pytest.fixture(scope="module")
def index(tmp_path_factory, st_model):
    root = tmp_path_factory.mktemp("cli-index")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    out = root / "index"
    with one_thread():
        assert main(["index", "build", "--corpus", str(corpus), "--encoder", str(st_model),
                     "--out", str(out)]) == 0
    return out


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with one_thread():
        code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_search_json_schema_and_exact_top1(index, capsys):
    query = "paris paris is the capital of france ."  # passage "fr" as encoded: title + text
    code, out, _ = run(["search", "--index", str(index), "--k", "2", "--json", query], capsys)
    assert code == 0
    [obj] = [json.loads(line) for line in out.splitlines()]
    assert obj["query"] == query
    assert len(obj["passages"]) == 2
    assert set(obj["passages"][0]) == {"id", "title", "text", "score"}
    # the query is passage "fr" verbatim: with unit vectors its inner product is 1, the maximum
    assert obj["passages"][0]["id"] == "fr"
    assert obj["passages"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert obj["passages"][0]["score"] >= obj["passages"][1]["score"]


def test_search_reads_queries_from_stdin(index, capsys, monkeypatch):
    code, out, _ = run(["search", "--index", str(index), "--k", "1", "--json"], capsys,
                       stdin="berlin is the capital of germany .\n\nplants use light energy in "
                             "photosynthesis .\n", monkeypatch=monkeypatch)
    assert code == 0
    ids = [json.loads(line)["passages"][0]["id"] for line in out.splitlines()]
    assert ids == ["de", "ps"]


def test_search_plain_output_names_titles(index, capsys):
    code, out, _ = run(["search", "--index", str(index), "-k", "1", "the mona lisa was painted "
                        "by leonardo ."], capsys)
    assert code == 0 and "mona lisa" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--index", "{index}", "--k", "9", "paris"], "larger than the index"),
        (["search", "--index", "{tmp}/nowhere", "paris"], "no such index"),
        (["index", "build", "--corpus", "{tmp}/missing.jsonl", "--encoder", "{st}", "--out",
          "{tmp}/out"], "missing.jsonl"),
        (["index", "build", "--corpus", "{tmp}/bad.jsonl", "--encoder", "{st}", "--out",
          "{tmp}/out"], "bad.jsonl:2"),
        (["index", "build", "--corpus", "{tmp}/bad.jsonl", "--kind", "lsh", "--out",
          "{tmp}/out"], "unknown kind"),
        (["ask", "--mode", "token", "--decoding", "fast", "why?"], "RAG-Sequence"),
        (["ask", "--model", "{tmp}", "why?"], "neither a margin model"),
        # a device this machine lacks (no machine has 100 GPUs) is refused before any loading
        (["ask", "--device", "gpu", "why?"], "unknown device 'gpu'"),
        (["ask", "--device", "cuda:99", "why?"], "'cuda:99'"),
        (["search", "--index", "{index}", "--device", "cuda:99", "paris"], "'cuda:99'"),
        (["index", "build", "--corpus", "{tmp}/bad.jsonl", "--encoder", "{st}", "--device",
          "cuda:99", "--out", "{tmp}/out"], "'cuda:99'"),
        (["eval", "--data", "{tmp}/bad.jsonl", "--device", "cuda:99", "--out", "{tmp}/out"],
         "'cuda:99'"),
        (["train", "--train", "{tmp}/bad.jsonl", "--device", "cuda:99", "--out", "{tmp}/out"],
         "'cuda:99'"),
        (["finetune", "{tmp}/bad.jsonl", "--device", "cuda:99"], "'cuda:99'"),
        (["serve", "--device", "cuda:99"], "'cuda:99'"),
    ],
)
def test_user_mistakes_are_one_line_without_traceback(argv, message, index, st_model, tmp_path,
                                                      capsys):
    (tmp_path / "bad.jsonl").write_text('{"title": "a", "text": "b"}\n{"title": "a",\n')
    argv = [a.format(index=index, tmp=tmp_path, st=st_model) for a in argv]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()  # a progress bar may precede the error; nothing follows it
    errors = [line for line in lines if line.startswith("margin: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert message in errors[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_index_add_makes_new_passages_searchable(index, tmp_path, capsys):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    extra = tmp_path / "more.jsonl"
    extra.write_text(json.dumps({"id": "it", "title": "rome", "text": "rome is in italy ."}) + "\n")
    code, out, _ = run(["index", "add", "--index", str(copy), "--corpus", str(extra)], capsys)
    assert code == 0 and "5 passages" in out
    code, out, _ = run(["search", "--index", str(copy), "-k", "1", "--json",
                        "rome is in italy ."], capsys)
    assert json.loads(out)["passages"][0]["id"] == "it"
    # the original index is untouched
    code, out, _ = run(["search", "--index", str(index), "-k", "4", "--json", "rome"], capsys)
    assert "it" not in [p["id"] for p in json.loads(out)["passages"]]
