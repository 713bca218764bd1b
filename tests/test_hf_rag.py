"""transformers RAG checkpoints in margin: loading, DPR indexing, and end-to-end parity.

Tiny random checkpoints are written the way facebook/rag-sequence-nq / rag-token-nq are laid out
(tests/_tiny_rag.py). margin indexes a tiny corpus with a tiny DPRContextEncoder; transformers gets
a ``RagRetriever`` (``index_name="custom"``) over a ``datasets.Dataset`` holding the SAME passages
and vectors in an exact inner-product FAISS index. Both then run from the question strings:
retrieval, document scores, loss and generation must agree.

Where transformers misbehaves and how the tests stay on common ground (see
tests/test_transformers_parity.py for the same quirks with given contexts):
- RAG-Sequence ``generate`` runs the generator's beam search with ``attention_mask=None``, so
  padding in ``context_input_ids`` (padded to ``max_combined_length``) is attended. The
  RAG-Sequence checkpoint uses ``max_combined_length=24``: every context is truncated to exactly
  24 tokens, none is padded. (The question is cut off the generator input then; it still drives
  retrieval and the document scores.)
- RAG-Sequence ``generate`` rescores candidates with ``self(input_ids)`` WITHOUT the question's
  attention mask, so a padded question batch re-retrieves with a different question vector.
  transformers is therefore run one question at a time; margin runs the batch.
- The RAG-Token checkpoint uses ``max_combined_length=200``: transformers pads every context to
  200 tokens, margin to the longest row; both mask padding, so results agree anyway.
"""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
import torch
from transformers import (
    DPRContextEncoder,
    DPRContextEncoderTokenizer,
    DPRQuestionEncoder,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

from _tiny_rag import (
    ANSWERS,
    DOCS,
    QUESTIONS,
    save_dpr_encoders,
    save_tiny_rag,
    write_corpus,
)
from margin import cli
from margin.errors import MarginError
from margin.generation.decoding import DecodeConfig, decode
from margin.hf_rag import RagCheckpointGenerator, load_hf_rag, seq2seq_format
from margin.models import load_model
from margin.retrieval.build import build_index
from margin.retrieval.encoders import DPREncoder, load_encoder
from margin.retrieval.reader import open_index

K = 3  # the checkpoints' n_docs
MAX_NEW = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints, DPR encoder dirs, the corpus and a margin flat index over it."""
    root = tmp_path_factory.mktemp("hf_rag")
    qdir, cdir = save_dpr_encoders(root)
    corpus = write_corpus(root / "corpus.jsonl")
    build_index(corpus, load_encoder(cdir, role="passage"), root / "index", kind="flat",
                progress=False)
    return {
        "root": root,
        "question_encoder": qdir,
        "context_encoder": cdir,
        "corpus": corpus,
        "index": root / "index",
        "sequence": save_tiny_rag(root / "rag-sequence", "sequence", max_combined_length=24),
        "token": save_tiny_rag(root / "rag-token", "token", max_combined_length=200),
    }


def _reference(ckpt, index_dir):
    """transformers' RAG with a RagRetriever over the margin index's passages and vectors."""
    datasets = pytest.importorskip("datasets", reason="transformers' RagRetriever needs it")
    from transformers import RagRetriever

    loaded = open_index(index_dir)
    n = loaded.manifest.passages
    passages = loaded.store.get(np.arange(n))
    vectors = loaded.dense.vectors(np.arange(n)[None])[0]  # (n, d) as margin stored them
    dataset = datasets.Dataset.from_dict({
        "id": [p.id for p in passages],
        "title": [p.title for p in passages],
        "text": [p.text for p in passages],
        "embeddings": vectors.tolist(),
    })
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(vectors.shape[1]))
    retriever = RagRetriever.from_pretrained(str(ckpt), indexed_dataset=dataset)
    cls = RagSequenceForGeneration if "sequence" in ckpt.name else RagTokenForGeneration
    model = cls.from_pretrained(ckpt, retriever=retriever).eval()
    return model, RagTokenizer.from_pretrained(str(ckpt)), dataset


@pytest.fixture(scope="module")
def pair(world):
    """(margin RAG, transformers model, RagTokenizer, dataset) per mode, built once."""
    out = {}
    for mode in ("sequence", "token"):
        rag = load_hf_rag(world[mode], world["index"], progress=False)
        out[mode] = (rag, *_reference(world[mode], world["index"]))
    return out


def _questions(tok, questions=QUESTIONS):
    q = tok(list(questions), return_tensors="pt", padding=True)
    return q["input_ids"], q["attention_mask"]


def _labels(rag, answers=ANSWERS):
    """transformers' labels: the decoder start token, then margin's targets (<s> y </s>)."""
    target, _ = rag.generator.build_targets(answers)
    start = torch.full((len(answers), 1), rag.generator.decoder_start_token_id)
    return torch.cat([start, target], 1)


# ----------------------------------------------------------------------------- loading


def test_load_reads_the_checkpoint(world):
    seq = load_model(world["sequence"], world["index"], progress=False)  # models.py dispatch
    tok = load_hf_rag(world["token"], None, progress=False)
    assert (seq.default_mode, tok.default_mode) == ("sequence", "token")
    assert seq.default_k == tok.default_k == K
    assert seq.doc_score_scale == 1.0
    assert tok.retriever is None and seq.retriever is not None
    assert isinstance(seq.generator, RagCheckpointGenerator)
    fmt = seq.generator.fmt
    assert (fmt.title_sep, fmt.doc_sep, fmt.prefix, fmt.max_combined_length) == (
        " / ", " // ", "", 24
    )
    assert tok.generator.fmt.max_combined_length == 200
    # transformers' generate defaults for a checkpoint that sets none: greedy, max_length 20
    assert seq.default_decode == DecodeConfig(num_beams=1, max_new_tokens=19)
    # the weights are the checkpoint's, exactly
    ref = RagSequenceForGeneration.from_pretrained(world["sequence"])
    for ours, theirs in ((seq.generator.model, ref.rag.generator),
                         (seq.question_encoder.module, ref.rag.question_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert isinstance(seq.question_encoder, DPREncoder) and seq.question_encoder.dim == 16
    assert seq.question_encoder.role == "question"


def test_generator_sees_the_question_as_transformers_does(pair):
    rag = pair["sequence"][0]
    # uncased BERT lowercases; "made" is not in the DPR vocabulary, so [UNK] drops it
    assert rag.generator.rag_questions(QUESTIONS) == [
        "where is the eiffel tower?", "what is the seine?", "who the louvre museum?"
    ]


def test_prefix_is_the_generators_as_transformers_passes_it():
    config = {"prefix": "top: ", "generator": {"prefix": "answer: "}, "max_combined_length": 7}
    fmt = seq2seq_format(config)
    assert (fmt.prefix, fmt.max_combined_length, fmt.title_sep) == ("answer: ", 7, " / ")
    assert seq2seq_format({"prefix": "top: ", "generator": {}}).prefix == ""


def test_legacy_generation_options_become_decode_defaults(world, tmp_path):
    ckpt = save_tiny_rag(
        tmp_path / "rag-token-legacy", "token", num_beams=4, max_length=12, min_length=3,
        length_penalty=2.0, early_stopping=True, forced_bos_token_id=0, no_repeat_ngram_size=3,
    )
    with pytest.warns(UserWarning, match="no_repeat_ngram_size"):
        rag = load_hf_rag(ckpt, None, progress=False)
    assert rag.default_decode == DecodeConfig(4, 11, 2, 2.0, True)
    assert rag.generator.forced_bos_token_id == 0
    # a generation_config.json, when there is one, is what transformers' generate reads
    (ckpt / "generation_config.json").write_text(json.dumps({"num_beams": 2, "max_new_tokens": 5}))
    rag = load_hf_rag(ckpt, None, progress=False)
    assert rag.default_decode == DecodeConfig(num_beams=2, max_new_tokens=5)
    assert rag.generator.forced_bos_token_id is None


# ----------------------------------------------------------------------------- indexing


def test_index_vectors_follow_transformers_dpr_recipe(world):
    """Passages as (title, text) pairs through DPRContextEncoder, pooler output (one at a time:
    use_own_knowledge_dataset.py passes no attention mask, so only unpadded rows compare)."""
    loaded = open_index(world["index"])
    assert [p.id for p in loaded.store.get(np.arange(len(DOCS)))] == [d["id"] for d in DOCS]
    model = DPRContextEncoder.from_pretrained(world["context_encoder"]).eval()
    tok = DPRContextEncoderTokenizer.from_pretrained(world["context_encoder"])
    with torch.no_grad():
        want = torch.cat([
            model(tok(d["title"], d["text"], return_tensors="pt")["input_ids"]).pooler_output
            for d in DOCS
        ]).numpy()
    got = loaded.dense.vectors(np.arange(len(DOCS))[None])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cli_builds_a_dpr_index_and_searches_it(world, tmp_path, capsys):
    out = tmp_path / "cli-index"
    argv = ["index", "build", "--out", str(out), "--corpus", str(world["corpus"]),
            "--encoder", str(world["context_encoder"]), "--kind", "flat"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["search", "--index", str(out), "--query-encoder",
                     str(world["question_encoder"]), "-k", str(K), "--json", *QUESTIONS]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    # brute-force MIPS with the raw transformers models
    q_model = DPRQuestionEncoder.from_pretrained(world["question_encoder"]).eval()
    q_tok = RagTokenizer.from_pretrained(str(world["sequence"])).question_encoder
    with torch.no_grad():
        q = q_model(**_dict(q_tok(QUESTIONS, return_tensors="pt", padding=True))).pooler_output
    d = torch.from_numpy(open_index(out).dense.vectors(np.arange(len(DOCS))[None])[0])
    scores = q @ d.T  # (B, n)
    top = scores.topk(K, dim=-1)
    for line, question, rows, vals in zip(lines, QUESTIONS, top.indices, top.values, strict=True):
        assert line["query"] == question
        assert [p["id"] for p in line["passages"]] == [DOCS[r]["id"] for r in rows]
        np.testing.assert_allclose([p["score"] for p in line["passages"]], vals, atol=1e-5)
    assert len({tuple(p["id"] for p in line["passages"]) for line in lines}) == len(QUESTIONS)
    # a DPR context-encoder index cannot embed questions itself
    assert cli.main(["search", "--index", str(out), *QUESTIONS]) == 2
    assert "question encoder" in capsys.readouterr().err


def _dict(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mode", ["sequence", "token"])
@torch.no_grad()
def test_retrieval_and_contexts_parity(pair, mode):
    rag, ref, tok, dataset = pair[mode]
    ids, mask = _questions(tok)
    out = ref(input_ids=ids, attention_mask=mask, labels=_labels(rag), output_retrieved=True)
    hits = rag.retrieve(QUESTIONS, K)
    assert hits.rows.tolist() == out.retrieved_doc_ids.tolist()
    assert [[p.id for p in ps] for ps in hits.passages] == [
        [dataset[int(r)]["id"] for r in row] for row in out.retrieved_doc_ids
    ]
    torch.testing.assert_close(rag.doc_scores(QUESTIONS, hits), out.doc_scores, atol=1e-5,
                               rtol=1e-5)
    # the generator inputs, token for token (transformers pads to max_combined_length)
    inputs = rag.generator.build_inputs(QUESTIONS, hits.passages)
    ours = [r[m.bool()].tolist() for r, m in zip(inputs.input_ids, inputs.attention_mask,
                                                strict=True)]
    theirs = [r[m.bool()].tolist() for r, m in zip(out.context_input_ids,
                                                  out.context_attention_mask, strict=True)]
    assert ours == theirs
    if mode == "sequence":
        assert bool(inputs.attention_mask.all())  # truncated, unpadded: see the docstring
    else:
        assert not bool(inputs.attention_mask.all())  # padded rows, masked on both sides
    # not degenerate: questions retrieve different passages, every passage matters
    assert len({tuple(r) for r in hits.rows.tolist()}) == len(QUESTIONS)
    assert out.doc_scores.softmax(-1).max() < 0.9


@pytest.mark.parametrize("mode", ["sequence", "token"])
@torch.no_grad()
def test_loss_parity(pair, mode):
    rag, ref, tok, _ = pair[mode]
    ids, mask = _questions(tok)
    want = ref(input_ids=ids, attention_mask=mask, labels=_labels(rag)).loss  # (B,)
    got = rag.loss(QUESTIONS, ANSWERS, k=K, mode=mode, reduction="none")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_question_encoder_gradient_parity(pair, mode):
    """The gradient of Σ −log p(y|x) w.r.t. every question-encoder weight equals transformers'.

    The encoder's only path to the loss is the document prior p(z|x) = softmax_z d(z)ᵀq(x), which
    margin recomputes in torch from the vectors the index returns (as RagModel.forward does from
    the retriever's ``retrieved_doc_embeds``): this holds that path to the reference, where a
    non-zero check would pass a wrong gradient. The generator's gradient is compared too.
    Tolerance: 1e-5 of each tensor's largest entry (float32 sums in another order)."""
    rag, ref, tok, _ = pair[mode]
    pairs = [(rag.question_encoder.module, ref.rag.question_encoder),
             (rag.generator.model, ref.rag.generator)]
    modules = [m for two in pairs for m in two]
    assert not any(m.training for m in modules)  # no dropout: both runs are deterministic
    for m in modules:
        m.zero_grad(set_to_none=True)
    try:
        ids, mask = _questions(tok)
        want = ref(input_ids=ids, attention_mask=mask, labels=_labels(rag)).loss  # (B,)
        got = rag.loss(QUESTIONS, ANSWERS, k=K, mode=mode, reduction="none")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        want.sum().backward()
        got.sum().backward()
        for ours, theirs in pairs:
            grads = dict(ours.named_parameters())
            ref_grads = dict(theirs.named_parameters())
            assert grads.keys() == ref_grads.keys()
            for name, p in grads.items():
                r = ref_grads[name].grad
                assert p.grad is not None and r is not None, f"no gradient reached {name}"
                scale = max(1.0, float(r.abs().max()))
                torch.testing.assert_close(p.grad, r, rtol=0.0, atol=1e-5 * scale, msg=name)
        # not vacuous: the prior sends the question encoder a gradient of the loss's order
        q_grads = [p.grad for p in rag.question_encoder.module.parameters()]
        assert float(torch.stack([g.abs().max() for g in q_grads]).max()) > 0.5
    finally:
        for m in modules:
            m.zero_grad(set_to_none=True)


def _margin_decode(rag, method, num_beams):
    """What RAG.ask decodes, with the token ids ask does not return."""
    hits = rag.retrieve(QUESTIONS, K)
    scores = rag.doc_scores(QUESTIONS, hits)
    inputs = rag.generator.build_inputs(QUESTIONS, hits.passages)
    return decode(rag.generator, inputs, scores, DecodeConfig(num_beams, MAX_NEW), method)


@pytest.mark.parametrize("num_beams", [1, 4])
@torch.no_grad()
def test_rag_sequence_thorough_generate_parity(pair, num_beams):
    rag, ref, tok, _ = pair["sequence"]
    decoding = "greedy" if num_beams == 1 else "thorough"
    answers = rag.ask(QUESTIONS, k=K, mode="sequence", decoding=decoding, num_beams=num_beams,
                      max_new_tokens=MAX_NEW)
    decoded = _margin_decode(rag, "thorough", num_beams)
    compared = 0
    for i, (answer, d) in enumerate(zip(answers, decoded, strict=True)):
        ids, mask = _questions(tok, [QUESTIONS[i]])  # one at a time: see the module docstring
        want = ref.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams,
                            max_new_tokens=MAX_NEW)[0]
        want = want[want != rag.generator.pad_token_id]
        assert [rag.generator.decoder_start_token_id, *d.best.token_ids] == want.tolist()
        assert answer.answer == tok.generator.decode(want, skip_special_tokens=True).strip()
        assert abs(answer.logprob - d.best.logprob) < 1e-6
        if len(want) > 2:
            # log p(y|x) = -transformers' loss of the answer (exclude_bos_score, as generate
            # scores). Not for a 1-token answer: get_nll adds log p(z|x) at target position 1,
            # which is padding then, so transformers drops the prior (test_transformers_parity).
            loss = ref(input_ids=ids, attention_mask=mask, labels=want[None],
                       exclude_bos_score=True).loss
            assert abs(answer.logprob + float(loss[0])) < 1e-4
            compared += 1
    assert compared >= 2
    assert len({a.answer for a in answers}) >= 2  # not degenerate


@torch.no_grad()
def test_rag_token_beam4_generate_parity(pair):
    rag, ref, tok, _ = pair["token"]
    ids, mask = _questions(tok)
    want = ref.generate(input_ids=ids, attention_mask=mask, num_beams=4, max_length=1 + MAX_NEW)
    answers = rag.ask(QUESTIONS, k=K, mode="token", decoding="beam", num_beams=4,
                      max_new_tokens=MAX_NEW)
    decoded = _margin_decode(rag, "token", 4)
    pad, start = rag.generator.pad_token_id, rag.generator.decoder_start_token_id
    rows = [[start, *d.best.token_ids] for d in decoded]
    assert torch.equal(torch.tensor([r + [pad] * (want.shape[1] - len(r)) for r in rows]), want)
    assert [a.answer for a in answers] == [
        t.strip() for t in tok.generator.batch_decode(want, skip_special_tokens=True)
    ]
    # log p(y|x) = Σ_i log p'(y_i|x,y_<i) under transformers' own marginal
    logits = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=want,
                 do_marginalize=True).logits  # (B, L, V) marginal log-probs
    target = torch.cat([want[:, 1:], torch.full_like(want[:, :1], pad)], 1)
    per_token = logits.gather(-1, target[..., None])[..., 0]
    expected = (per_token * (target != pad)).sum(-1)
    torch.testing.assert_close(torch.tensor([a.logprob for a in answers]), expected, atol=1e-4,
                               rtol=1e-5)
    assert len({len(r) for r in rows}) >= 2 or len({a.answer for a in answers}) >= 2


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("model.safetensors", "model.safetensors"),
        ("generator_tokenizer", "generator_tokenizer"),
        ("question_encoder_tokenizer", "question_encoder_tokenizer"),
    ],
)
def test_incomplete_checkpoint_is_one_line(world, tmp_path, remove, named):
    ckpt = tmp_path / "rag"
    shutil.copytree(world["sequence"], ckpt)
    target = ckpt / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MarginError) as err:
        load_model(ckpt, None, progress=False)
    message = str(err.value)
    assert "\n" not in message and named in message and "save" in message


def test_default_index_is_refused(world):
    with pytest.raises(MarginError, match="DPR context encoder") as err:
        load_hf_rag(world["sequence"], "default", progress=False)
    assert "\n" not in str(err.value)


class NotATensor:
    """Anything torch.load(weights_only=True) must refuse to rebuild."""


def test_pickled_weights_load_only_as_plain_tensors(world, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "rag-bin"
    shutil.copytree(world["sequence"], ckpt)
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    rag = load_hf_rag(ckpt, None, progress=False)
    ref = load_hf_rag(world["sequence"], None, progress=False)
    a, b = rag.generator.model.state_dict(), ref.generator.model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in b)

    torch.save({**state, "payload": NotATensor()}, ckpt / "pytorch_model.bin")
    with pytest.raises(MarginError, match="pytorch_model.bin.*more than tensors") as err:
        load_hf_rag(ckpt, None, progress=False)
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
