"""The command line as a user meets it: outputs, stdin, exit codes and one-line errors."""

from __future__ import annotations

import io
import json

import pytest

from helpers import one_thread
from margin.cli import main

DOCS = [
    {"id": "fr", "title": "paris", "text": "paris is the capital of france ."},
    {"id": "de", "title": "berlin", "text": "berlin is the capital of germany ."},
    {"id": "ml", "title": "mona lisa", "text": "the mona lisa was painted by leonardo ."},
    {"id": "ps", "title": "plants", "text": "plants use light energy in photosynthesis ."},
]


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


def test_search_refuses_stdin_that_is_not_utf8(index, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), "utf-8"))
    code, _, err = run(["search", "--index", str(index), "--k", "1"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "margin: error: stdin is not UTF-8 (byte 0xe9); re-encode the queries as UTF-8"], err


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
        (["eval", "--data", "{tmp}/empty.jsonl", "--out", "{tmp}/out"], "the file is empty"),
        (["train", "--train", "{tmp}/bad.jsonl", "--ray-address", "auto", "--out", "{tmp}/out"],
         "add --ray-retrieval"),
        (["serve", "--device", "cuda:99"], "'cuda:99'"),
        # usage mistakes, which typer (its own copy of click) raised as a traceback
        (["nosuch"], "No such command 'nosuch'; see `margin --help`"),
        (["search", "--nosuch", "paris"], "No such option: --nosuch; see `margin search --help`"),
        (["search", "--index", "{index}", "--k", "abc", "paris"], "Invalid value for '--k'"),
        (["search", "--index"], "Option '--index' requires an argument"),
        # a Latin-1 argument (surrogate-escaped by Python): the tokenizer raised a TypeError
        (["search", "--index", "{index}", "caf\udce9"], "query 1 is not UTF-8 text"),
        (["train", "--out", "{tmp}/out"], "Missing option '--train'"),
        # an --out that is a file, or under one, refused before anything loads
        (["index", "build", "--corpus", "{index}/../corpus.jsonl", "--encoder", "{st}", "--out",
          "{tmp}/bad.jsonl/out"], "is under {tmp}/bad.jsonl, which is a file"),
        (["eval", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/bad.jsonl/out"],
         "is under {tmp}/bad.jsonl, which is a file"),
        (["train", "--train", "{tmp}/bad.jsonl", "--out", "{tmp}/bad.jsonl"],
         "--out {tmp}/bad.jsonl is a file, not a directory"),
    ],
)
def test_user_mistakes_are_one_line_without_traceback(argv, message, index, st_model, tmp_path,
                                                      capsys):
    (tmp_path / "bad.jsonl").write_text('{"title": "a", "text": "b"}\n{"title": "a",\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    argv = [a.format(index=index, tmp=tmp_path, st=st_model) for a in argv]
    message = message.format(tmp=tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()  # a progress bar may precede the error; nothing follows it
    errors = [line for line in lines if line.startswith("margin: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert message in errors[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_margin_alone_shows_the_help_without_traceback(capsys):
    code, out, err = run([], capsys)
    assert code == 2 and "Traceback" not in err
    assert "Commands" in out + err and "search" in out + err


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


# ----------------------------------------------------------------------------- index integrity


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.strip().splitlines() if line.startswith("margin: error:")]


def test_index_verify_names_every_corrupt_file(index, tmp_path, capsys):
    import shutil

    code, out, err = run(["index", "verify", "--index", str(index)], capsys)
    assert code == 0 and "every check passed" in out, err
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    for name in ("embeddings/shard-00000.npy", "index.faiss"):
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
    code, out, err = run(["index", "verify", "--index", str(copy)], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 2, err
    assert "embeddings/shard-00000.npy does not match its sha256" in lines[0]
    assert "index.faiss does not match its sha256" in lines[1]
    code, out, err = run(["search", "--index", str(copy), "paris"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "shard-00000.npy does not match its sha256 in manifest.json (corrupt or changed) " \
        "(and 1 more); `margin index verify --index" in lines[0]


def test_overwrite_keeps_a_directory_that_is_not_an_index(st_model, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    code, _, err = run(["index", "build", "--corpus", str(corpus), "--encoder", str(st_model),
                        "--out", str(out), "--overwrite"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "is not a margin index" in lines[0], err
    assert (out / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "d"]


def test_search_refuses_an_encoder_with_other_weights(st_model, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "st"
    shutil.copytree(st_model, model)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    out = tmp_path / "index"
    code, _, err = run(["index", "build", "--corpus", str(corpus), "--encoder", str(model),
                        "--out", str(out)], capsys)
    assert code == 0, err
    other = tmp_path / "other"  # same architecture, other weights
    shutil.copytree(st_model, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.5 for k, v in weights.items()}, other / "model.safetensors")

    code, _, err = run(["search", "--index", str(out), "--query-encoder", str(other), "paris"],
                       capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "has other weights" in lines[0] and "--allow-encoder-mismatch" in lines[0]
    code, outp, err = run(["search", "--index", str(out), "--query-encoder", str(other),
                           "--allow-encoder-mismatch", "--json", "-k", "2", "paris"], capsys)
    assert code == 0 and len(json.loads(outp)["passages"]) == 2, err

    shutil.copy(other / "model.safetensors", model / "model.safetensors")  # replaced in place
    code, _, err = run(["search", "--index", str(out), "paris"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "has other weights" in lines[0], err
    code, _, err = run(["index", "verify", "--index", str(out)], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "now has other weights" in lines[0], err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ask", "-k", "0", "why?"], "--k must be at least 1, got 0"),
        (["ask", "--decoding", "beam", "--beams", "0", "why?"],
         "--beams must be at least 1, got 0"),
        (["ask", "--beams", "0", "why?"], "--beams must be at least 1, got 0"),
        (["ask", "--max-new-tokens", "0", "why?"], "--max-new-tokens must be at least 1, got 0"),
        (["demo", "-k", "0"], "--k must be at least 1, got 0"),
        (["search", "--index", "{index}", "-k", "0", "paris"], "--k must be at least 1, got 0"),
        (["finetune", "{tmp}/dev.jsonl", "--epochs", "0"], "epochs must be at least 1, got 0"),
        (["finetune", "{tmp}/dev.jsonl", "--k", "0"], "k must be at least 1, got 0"),
        (["train", "--train", "{tmp}/dev.jsonl", "--out", "{tmp}/out", "--save-every", "-1"],
         "save_every must be at least 0, got -1"),
        (["train", "--train", "{tmp}/dev.jsonl", "--out", "{tmp}/out", "--eval-every", "-2"],
         "eval_every must be at least 0, got -2"),
        (["train", "--train", "{tmp}/dev.jsonl", "--out", "{tmp}/out", "--warmup", "-1"],
         "warmup must be at least 0, got -1"),
        (["train", "--train", "{tmp}/dev.jsonl", "--out", "{tmp}/out", "--lr", "nan"],
         "lr must be positive and finite, got nan"),  # it trained, and left NaN weights
        (["train", "--train", "{tmp}/dev.jsonl", "--out", "{tmp}/out", "--retriever-lr", "inf"],
         "retriever_lr must be positive and finite, got inf"),
        (["index", "build", "--corpus", "{tmp}/dev.jsonl", "--ray", "--ray-workers", "0",
          "--out", "{tmp}/out"], "--ray-workers must be at least 1, got 0"),
        # inf overflowed int() after the model loaded
        (["ask", "--passage-cache-mb", "inf", "why?"],
         "--passage-cache-mb is inf; give 0 (off) or a number of MiB"),
        (["serve", "--passage-cache-mb", "inf"],
         "--passage-cache-mb is inf; give 0 (off) or a number of MiB"),
        # a missing --index-root served on, and refused every registration
        (["serve", "--index-root", "{tmp}/nowhere"], "--index-root {tmp}/nowhere is not a "
         "directory; give the folder that holds the indexes admins may register"),
    ],
)
def test_zero_counts_are_refused_before_loading_not_replaced_by_defaults(
    argv, message, index, tmp_path, capsys, monkeypatch
):
    """`-k 0` once meant the model's k (`k or default_k`) and `--epochs 0` one epoch: a number
    the user gave is checked, in one line, before any model, index or data is loaded."""
    import margin.models
    import margin.retrieval.encoders
    import margin.training.recipe
    import margin.training.train

    def loaded(*args, **kwargs):
        pytest.fail("loaded a model or ran before checking the options")

    monkeypatch.setattr(margin.models, "load_model", loaded)
    monkeypatch.setattr(margin.retrieval.encoders, "load_encoder", loaded)
    monkeypatch.setattr(margin.training.train, "run", loaded)
    monkeypatch.setattr(margin.training.recipe, "finetune", loaded)
    (tmp_path / "dev.jsonl").write_text('{"question": "why?", "answers": ["because"]}\n')
    argv = [a.format(index=index, tmp=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"margin: error: {message.format(tmp=tmp_path)}"], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("argv", "beams"), [([], None), (["--beams", "3"], 3)])
def test_ask_beams_default_to_the_models_own(argv, beams, capsys, monkeypatch):
    """Unset, --beams is None, which RAG.ask reads as the model's default_decode.num_beams."""
    from margin.rag import RAG

    seen = {}

    class Model:
        def ask(self, questions, **kw):
            seen.update(kw)
            return []

    monkeypatch.setattr(RAG, "load", classmethod(lambda cls, **kw: Model()))
    code, _, _ = run(["ask", "--decoding", "beam", *argv, "paris"], capsys)
    assert code == 0 and seen["num_beams"] == beams
