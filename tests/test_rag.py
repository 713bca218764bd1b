"""The RAG object: retrieval wired to the generator, provenance, the loss and its gradients.

A keyword encoder (tests/helpers.py) makes retrieval hand-checkable; a tiny random BART
(tests/helpers.py) generates. The math itself is tested in test_marginalize/test_decoding;
here we check that RAG feeds it the right things.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import DOCS, TorchKeywordEncoder, tiny_bart
from margin.errors import MarginError
from margin.generation.seq2seq import Seq2SeqFormat, Seq2SeqGenerator
from margin.marginalize import nll_loss
from margin.rag import RAG, decoding_method
from margin.retrieval.build import build_index
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever


@pytest.fixture(scope="module")
def rag(tmp_path_factory):
    from margin.retrieval.passages import split_document

    out = tmp_path_factory.mktemp("rag") / "index"
    encoder = TorchKeywordEncoder()
    passages = [
        p for i, d in enumerate(DOCS) for p in split_document(d["title"], d["text"], str(i))
    ]
    build_index(passages, encoder, out, kind="flat", progress=False)
    model, tok = tiny_bart()
    gen = Seq2SeqGenerator(model, tok, Seq2SeqFormat(max_combined_length=64))
    return RAG(gen, Retriever(open_index(out), encoder), doc_score_scale=5.0)


QUESTIONS = ["paris france", "germany river"]


def test_ask_returns_the_hand_obvious_passages_with_normalised_provenance(rag):
    answers = rag.ask(QUESTIONS, k=3, mode="token", decoding="greedy", max_new_tokens=6)
    assert [a.passages[0].title for a in answers] == ["Paris", "Rhine"]
    for a in answers:
        assert len(a.passages) == 3
        assert math.isclose(sum(p.prior for p in a.passages), 1.0, rel_tol=1e-5)
        assert math.isclose(sum(p.posterior for p in a.passages), 1.0, rel_tol=1e-5)
        # the prior is the softmax of the scaled retriever scores, best passage first
        scores = np.array([p.score for p in a.passages])
        expected = np.exp(5 * scores) / np.exp(5 * scores).sum()
        np.testing.assert_allclose([p.prior for p in a.passages], expected, rtol=1e-5)
        assert a.token_docs is not None and len(a.token_docs) >= 1
        assert all(0 <= z < 3 for _, z in a.token_docs)
        assert a.logprob <= 0.0


def test_ask_logprob_is_the_marginal_of_the_answer_under_the_mode(rag):
    for mode in ("token", "sequence"):
        [answer] = rag.ask(QUESTIONS[:1], k=2, mode=mode, decoding="greedy", max_new_tokens=5)
        hits = rag.retrieve(QUESTIONS[:1], 2)
        with torch.no_grad():
            prior = torch.log_softmax(rag.doc_scores(QUESTIONS[:1], hits), -1)
        gen = rag.generator
        inputs = gen.build_inputs(QUESTIONS[:1], hits.passages)
        ids = torch.tensor([answer_ids(rag, answer, mode)])
        mask = torch.ones_like(ids)
        if gen.forced_bos_token_id is not None:
            mask[:, 0] = 0  # a forced BOS is prompt, not prediction
        with torch.no_grad():
            tok = gen.token_logprobs(inputs, ids, mask)  # (1, k, T)
        loss = nll_loss(mode, prior, tok, mask)
        assert math.isclose(-loss.item(), answer.logprob, abs_tol=1e-4), mode


def answer_ids(rag, answer, mode):
    """Re-decode the answer's token ids (the Answer keeps text; n-best keeps ids internally)."""
    hits = rag.retrieve([answer.question], len(answer.passages))
    from margin.generation.decoding import DecodeConfig, decode

    with torch.no_grad():
        scores = rag.doc_scores([answer.question], hits)
    inputs = rag.generator.build_inputs([answer.question], hits.passages)
    method = decoding_method(mode, answer.decoding)
    [decoded] = decode(rag.generator, inputs, scores, DecodeConfig(num_beams=1, max_new_tokens=5),
                       method)
    assert decoded.best.text == answer.answer
    return list(decoded.best.token_ids)


def test_loss_trains_generator_and_question_encoder(rag):
    rag.question_encoder.module.zero_grad()
    rag.generator.model.zero_grad()
    loss = rag.loss(QUESTIONS, ["a tower", "a river"], k=3, mode="sequence")
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    q_grad = rag.question_encoder.module.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0  # gradient through p(z|x)
    g_grad = rag.generator.model.get_input_embeddings().weight.grad
    assert g_grad is not None and g_grad.abs().sum() > 0
    rag.generator.model.zero_grad()
    rag.question_encoder.module.zero_grad()


def test_loss_both_is_the_mean_of_the_two_objectives(rag):
    answers = ["a tower", "a river"]
    with torch.no_grad():
        token = rag.loss(QUESTIONS, answers, k=3, mode="token", reduction="none")
        seq = rag.loss(QUESTIONS, answers, k=3, mode="sequence", reduction="none")
        both = rag.loss(QUESTIONS, answers, k=3, mode="both", reduction="none")
    assert not torch.allclose(token, seq)  # multi-token answers: the two objectives differ
    torch.testing.assert_close(both, (token + seq) / 2)
    with pytest.raises(MarginError, match="'both'"):
        rag.loss(QUESTIONS, answers, k=3, mode="tokens")


def test_loss_modes_coincide_for_a_one_token_target(rag):
    """With a one-token target RAG-Sequence and RAG-Token are the same model (Sec. 2)."""
    hits = rag.retrieve(QUESTIONS, 3)
    gen = rag.generator
    ids = torch.tensor([[7], [9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prior = torch.log_softmax(rag.doc_scores(QUESTIONS, hits), -1)
        tok = gen.token_logprobs(gen.build_inputs(QUESTIONS, hits.passages), ids, mask)
    seq = nll_loss("sequence", prior, tok, mask, "none")
    token = nll_loss("token", prior, tok, mask, "none")
    torch.testing.assert_close(seq, token)


@pytest.mark.parametrize(
    ("mode", "decoding", "method"),
    [("token", "greedy", "token"), ("token", "beam", "token"), ("sequence", "greedy", "thorough"),
     ("sequence", "beam", "thorough"), ("sequence", "thorough", "thorough"),
     ("sequence", "fast", "fast")],
)
def test_decoding_method_mapping(mode, decoding, method):
    assert decoding_method(mode, decoding) == method


@pytest.mark.parametrize(
    ("mode", "decoding", "message"),
    [("token", "thorough", "RAG-Sequence"), ("token", "fast", "RAG-Sequence"),
     ("both", "greedy", "unknown mode"), ("token", "nucleus", "unknown decoding")],
)
def test_bad_mode_or_decoding_is_one_clear_error(mode, decoding, message):
    with pytest.raises(MarginError, match=message):
        decoding_method(mode, decoding)


def test_bad_questions_and_k(rag):
    with pytest.raises(MarginError, match="empty"):
        rag.ask(["paris", "  "], k=2)
    with pytest.raises(MarginError, match="no question"):
        rag.ask([], k=2)
    with pytest.raises(MarginError, match="larger than the index"):  # ask takes every passage
        rag.retrieve(["paris"], k=50)  # instead (tests/test_index_info.py)
    with pytest.raises(MarginError, match="not a single string"):
        rag.ask("paris", k=2)


def test_overlong_question_is_truncated_with_a_warning_not_an_error(rag):
    long_question = "paris " * 5000
    with pytest.warns(UserWarning, match="truncated"):
        [answer] = rag.ask([long_question], k=2, max_new_tokens=3)
    assert answer.question.split() == ["paris"] * 128
    assert answer.passages[0].title == "Paris"


def test_overlong_question_without_spaces_is_cut_in_characters_with_a_warning(rag):
    from margin.rag import MAX_QUESTION_CHARS

    blob = "paris" + "x" * 200_000  # one "word": the 128-word cut alone never bounded it
    with pytest.warns(UserWarning, match=f"200005 characters; truncated to {MAX_QUESTION_CHARS}"):
        [answer] = rag.ask([blob], k=2, max_new_tokens=3)
    assert answer.question == blob[:MAX_QUESTION_CHARS]


def test_bm25_retrieval_gives_the_prior_from_bm25_scores(rag, tmp_path):
    from margin.retrieval.passages import split_document

    passages = [
        p for i, d in enumerate(DOCS) for p in split_document(d["title"], d["text"], str(i))
    ]
    build_index(passages, None, tmp_path / "bm25", kind="bm25", progress=False)
    bm25_rag = RAG(rag.generator, Retriever(open_index(tmp_path / "bm25")))
    [answer] = bm25_rag.ask(["capital of germany"], k=3, max_new_tokens=3)
    assert answer.passages[0].title == "Berlin"
    scores = np.array([p.score for p in answer.passages])
    expected = np.exp(scores) / np.exp(scores).sum()  # softmax of the BM25 scores, s = 1
    np.testing.assert_allclose([p.prior for p in answer.passages], expected, rtol=1e-5)
    loss = bm25_rag.loss(["capital of germany"], ["berlin"], k=3)
    assert loss.item() > 0 and loss.requires_grad  # the generator still learns


@pytest.mark.parametrize("kind", ["bart", "llama"])
@pytest.mark.parametrize(("mode", "decoding"), [
    ("token", "greedy"), ("token", "beam"), ("sequence", "greedy"), ("sequence", "fast"),
])
def test_generate_from_shared_encoded_prompts_equals_encoding_afresh(
    rag, kind, mode, decoding, request
):
    """encode_prompts once, decode many ways: the same answers and scores as encoding each time,
    and decoding leaves the shared encoding as it was (it is read by the next decoding)."""
    gen = request.getfixturevalue(kind)
    shared = RAG(gen, rag.retriever, question_encoder=rag.question_encoder, doc_score_scale=5.0)
    hits = shared.retrieve(QUESTIONS, k=2)
    scores = shared.doc_scores(QUESTIONS, hits).detach()
    encoded = shared.encode_prompts(QUESTIONS, hits.passages)
    before = encoded.prompt.layers[0][0].clone() if encoded.prompt else encoded.hidden.clone()
    kw = dict(mode=mode, decoding=decoding, num_beams=2, max_new_tokens=5)
    fresh = shared.generate(QUESTIONS, hits.passages, scores, **kw)
    for _ in range(2):  # the second decoding reads the encoding the first one used
        reused = shared.generate(QUESTIONS, hits.passages, scores, encoded=encoded, **kw)
        assert [a.answer for a in reused] == [a.answer for a in fresh]
        assert [a.logprob for a in reused] == pytest.approx([a.logprob for a in fresh], abs=1e-5)
    after = encoded.prompt.layers[0][0] if encoded.prompt else encoded.hidden
    assert torch.equal(before, after)


def test_generate_refuses_an_encoding_of_other_questions(rag):
    hits = rag.retrieve(QUESTIONS, k=2)
    scores = rag.doc_scores(QUESTIONS, hits).detach()
    encoded = rag.encode_prompts(QUESTIONS[:1], [hits.passages[0]])
    with pytest.raises(MarginError, match="encoded prompts hold 1 questions x 2 passages, not 2"):
        rag.generate(QUESTIONS, hits.passages, scores, encoded=encoded)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.ask(["paris"], k=0), "k must be at least 1, got 0"),
        (lambda r: r.ask(["paris"], k=-1), "k must be at least 1, got -1"),
        (lambda r: r.ask(["paris"], k=1, decoding="beam", num_beams=0),
         "num_beams must be at least 1, got 0"),
        (lambda r: r.ask(["paris"], k=1, max_new_tokens=0), "max_new_tokens must be at least 1"),
        (lambda r: r.ask_closed_book(["paris"], max_new_tokens=0), "max_new_tokens must be"),
        (lambda r: r.generate(["paris"], [r.retrieve(["paris"], 1).passages[0]],
                              torch.zeros(1, 1), mode="sequence", decoding="beam", num_beams=0),
         "num_beams must be at least 1, got 0"),
        (lambda r: r.loss(["paris"], ["a"], k=0), "k must be at least 1, got 0"),
    ],
    ids=["ask-k0", "ask-k-1", "ask-beams0", "ask-tokens0", "closed-book-tokens0",
         "generate-beams0", "loss-k0"],
)
def test_zero_k_beams_or_tokens_are_refused_not_replaced_by_defaults(rag, call, message):
    """0 is a value the user gave, not "unset": it must not silently become the default (None is
    the default)."""
    with pytest.raises(MarginError, match=message):
        call(rag)


def test_unset_k_and_mode_are_the_models_own_in_ask_and_loss(rag):
    model = RAG(rag.generator, rag.retriever, doc_score_scale=5.0, default_k=2,
                default_mode="sequence")
    [answer] = model.ask(["paris france"], max_new_tokens=3)
    assert (len(answer.passages), answer.mode) == (2, "sequence")
    answers = ["a tower", "a river"]
    with torch.no_grad():
        default = model.loss(QUESTIONS, answers, reduction="none")
        own = model.loss(QUESTIONS, answers, k=2, mode="sequence", reduction="none")
        other = model.loss(QUESTIONS, answers, k=5, mode="token", reduction="none")
    torch.testing.assert_close(default, own)
    assert not torch.allclose(default, other)  # so the check above tells the two apart


class CountingEncoder(TorchKeywordEncoder):
    """The question encoder of ``rag``, counting its forward passes (one per call, whole batch)."""

    def __init__(self):
        super().__init__()
        self.forwards = 0

    def encode_queries(self, texts, batch_size=64, progress=False):
        self.forwards += 1
        return super().encode_queries(texts, batch_size, progress)

    def embed_queries(self, texts):
        self.forwards += 1
        return super().embed_queries(texts)


def test_ask_and_loss_encode_each_batch_of_questions_once(rag):
    """The question is embedded once: the index is searched with q(x) detached and the prior
    computed from the same q(x) (as transformers' RagModel.forward), not embedded again."""
    counter = CountingEncoder()
    counted = rag.with_retriever(Retriever(rag.retriever.index, counter))
    answers = counted.ask(QUESTIONS, k=3, max_new_tokens=4)
    assert counter.forwards == 1  # one batch of two questions: one forward
    [one] = counted.ask(QUESTIONS[:1], k=3, max_new_tokens=4)
    assert counter.forwards == 2
    # the same answers, scores and priors as searching and scoring with two encodings
    hits = rag.retrieve(QUESTIONS, 3)
    with torch.no_grad():
        scores = rag.doc_scores(QUESTIONS, hits)
    twice = rag.generate(QUESTIONS, hits.passages, scores, max_new_tokens=4,
                         retriever_scores=hits.scores.tolist())
    assert [a.to_json() for a in answers] == [a.to_json() for a in twice]
    assert one.to_json() == twice[0].to_json()
    counter.forwards = 0
    loss = counted.loss(QUESTIONS, ["a tower", "a river"], k=3, reduction="none")
    assert counter.forwards == 1 and loss.requires_grad  # q(x) with grad, searched detached
    given = rag.loss(QUESTIONS, ["a tower", "a river"], k=3, reduction="none", hits=hits)
    assert torch.equal(loss.detach(), given.detach())


def test_with_retriever_shares_the_networks_and_takes_the_retrievers_encoder(rag, tmp_path):
    from margin.retrieval.passages import split_document

    passages = [
        p for i, d in enumerate(DOCS) for p in split_document(d["title"], d["text"], str(i))
    ]
    build_index(passages, None, tmp_path / "bm25", kind="bm25", progress=False)
    bm25 = Retriever(open_index(tmp_path / "bm25"))
    swapped = rag.with_retriever(bm25, doc_score_scale=1.0)
    assert swapped is not rag and swapped.generator is rag.generator
    assert swapped.retriever is bm25 and swapped.question_encoder is None
    assert (swapped.doc_score_scale, rag.doc_score_scale) == (1.0, 5.0)
    assert rag.retriever is not bm25 and rag.question_encoder is not None  # rag is unchanged
    assert swapped.config is rag.config and swapped.default_k == rag.default_k
    [answer] = swapped.ask(["capital of germany"], k=3, max_new_tokens=3)
    assert answer.passages[0].title == "Berlin"


def test_answer_json_writes_each_passage_with_its_provenance(rag):
    [answer] = rag.ask(QUESTIONS[:1], k=2, max_new_tokens=3)
    p = answer.passages[0]
    out = answer.to_json()["passages"][0]
    assert list(out) == ["id", "title", "text", "source", "score", "prior", "posterior"]
    assert (out["title"], out["prior"], out["posterior"]) == ("Paris", p.prior, p.posterior)
    assert list(p.to_json(source=False)) == ["id", "title", "text", "score", "prior", "posterior"]
    assert p.passage.to_json(0.5) == {"id": p.id, "title": "Paris", "text": p.text, "score": 0.5}
