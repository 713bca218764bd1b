"""End to end on the real default assets (slow): the packaged encoder, corpus and generator.

The index covers a slice of the default corpus (a few hundred passages, chosen by title plus the
first documents) so that the test takes a minute, not the full build's several; the model is the
real default, converted once into $MARGIN_HOME and reused by later runs.
"""

from __future__ import annotations

import json
import math

import pytest

from margin.cli import main
from margin.retrieval.passages import read_corpus

pytestmark = pytest.mark.slow

TITLES = {"Mona Lisa", "Romeo and Juliet", "Mars", "Australia", "Leonardo da Vinci",
          "William Shakespeare", "Photosynthesis", "Mount Everest", "Albert Einstein"}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from margin.retrieval.build import build_index
    from margin.retrieval.encoders import load_encoder

    passages = [p for i, p in enumerate(read_corpus("default")) if p.title in TITLES or i < 150]
    out = tmp_path_factory.mktemp("default-assets") / "index"
    build_index(passages, load_encoder("default", role="passage"), out, kind="flat",
                progress=False)
    return out


def test_default_corpus_keeps_attribution():
    first = next(iter(read_corpus("default")))
    assert first.title and first.text
    assert first.source.startswith("https://en.wikipedia.org/wiki/") and "CC BY-SA" in first.source
    assert len(first.text.split()) <= 100


def test_search_finds_the_article_that_answers(index, capsys):
    assert main(["search", "--index", str(index), "-k", "3", "--json",
                 "Who painted the Mona Lisa?", "Which planet is called the Red Planet?"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "Mona Lisa" in [p["title"] for p in results[0]["passages"]]
    assert "Mars" in [p["title"] for p in results[1]["passages"]]
    assert all(isinstance(p["id"], str) for r in results for p in r["passages"])


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_ask_answers_a_question_the_corpus_answers(index, capsys, mode):
    assert main(["ask", "--index", str(index), "-k", "3", "--mode", mode, "--json",
                 "Who wrote the play Romeo and Juliet?"]) == 0
    [obj] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "Shakespeare" in obj["answer"]
    assert obj["mode"] == mode and obj["logprob"] < 0
    passages = obj["passages"]
    assert len(passages) == 3 and passages[0]["title"] == "Romeo and Juliet"
    assert math.isclose(sum(p["prior"] for p in passages), 1, rel_tol=1e-4)
    assert math.isclose(sum(p["posterior"] for p in passages), 1, rel_tol=1e-4)
    assert {"id", "title", "text", "score", "prior", "posterior"} <= set(passages[0])
