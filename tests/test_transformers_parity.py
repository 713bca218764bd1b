"""Parity with transformers' RAG (RagSequenceForGeneration, RagTokenForGeneration), token for token.

Both implementations get the SAME context_input_ids / attention mask and doc_scores (no retriever):
a tiny random BART generator and a tiny DPR question encoder, combined into a RagConfig.

transformers quirks we match, or avoid on purpose (documented in margin.generation.decoding):
- Labels double as decoder inputs: ``forward(labels=[start] + y)`` scores y; we score y with
  ``[start] + y[:-1]`` as decoder input, the same thing.
- RAG-Sequence ``generate`` scores candidates with ``exclude_bos_score=True``: the first target
  token is dropped when every candidate starts with BOS (here: a forced BOS). We never score a
  forced BOS.
- RAG-Sequence ``get_nll`` adds log p(z|x) at target position 1, so it vanishes when that position
  is padding (a 1-token label); our targets here are longer. Label smoothing adds it to all V
  entries of that position.
- RAG-Sequence ``generate`` runs the generator's beam search with ``attention_mask=None``: padding
  in ``context_input_ids`` is ATTENDED during the beam search (but masked when scoring). We always
  mask padding, so generation parity is checked on unpadded rows (truncated to one length).
- RAG-Token ``generate`` ignores ``max_new_tokens``; we pass ``max_length = 1 + max_new_tokens``.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from transformers import (
    DPRConfig,
    DPRQuestionEncoder,
    DPRQuestionEncoderTokenizer,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from helpers import PASSAGES, QUESTIONS, tiny_bart
from margin.generation.decoding import DecodeConfig, decode_rag_sequence, decode_rag_token
from margin.generation.seq2seq import Seq2SeqFormat, Seq2SeqGenerator
from margin.marginalize import doc_log_prior, label_smoothed_nll_loss

K = 3
QS = [*QUESTIONS, "who made the louvre?"]
PS = [
    [*PASSAGES[0], PASSAGES[1][0]],
    [*PASSAGES[1], PASSAGES[0][0]],
    [PASSAGES[1][1], PASSAGES[0][1], PASSAGES[1][0]],
]
ANSWERS = ["paris", "a river in france", "an art museum"]


def dpr_tokenizer() -> DPRQuestionEncoderTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", *"where what who is the a".split()]
    words += "tower seine made louvre".split()
    tmp = tempfile.mkdtemp()
    try:
        with open(f"{tmp}/vocab.txt", "w") as f:
            f.write("\n".join(words) + "\n")
        return DPRQuestionEncoderTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp)


@pytest.fixture(scope="module")
def rag():
    bart, tok = tiny_bart()
    qtok = dpr_tokenizer()
    qcfg = DPRConfig(
        vocab_size=len(qtok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    qenc = DPRQuestionEncoder(qcfg).eval()
    cfg = RagConfig.from_question_encoder_generator_configs(qcfg, bart.config, n_docs=K)
    seq = RagSequenceForGeneration(config=cfg, question_encoder=qenc, generator=bart).eval()
    tokm = RagTokenForGeneration(config=cfg, question_encoder=qenc, generator=bart).eval()
    # document scores as RAG computes them: q(x) from the question encoder, d(z) from the index
    q = qtok(QS, padding=True, return_tensors="pt")
    with torch.no_grad():
        q_emb = qenc(**q).pooler_output  # (B, 16)
    doc_embs = 0.1 * torch.randn(len(QS), K, 16, generator=torch.Generator().manual_seed(1))
    doc_scores = torch.bmm(q_emb[:, None], doc_embs.transpose(1, 2))[:, 0]  # (B, K)
    torch.testing.assert_close(doc_log_prior(q_emb, doc_embs), doc_scores.log_softmax(-1))
    assert doc_scores.softmax(-1).max() < 0.95  # every passage matters
    return seq, tokm, bart, tok, doc_scores


def _ref_kwargs(inputs, doc_scores):
    return dict(
        context_input_ids=inputs.input_ids,
        context_attention_mask=inputs.attention_mask,
        doc_scores=doc_scores,
        n_docs=K,
    )


@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize(("epsilon", "reduce"), [(0.0, False), (0.1, True)])
@torch.no_grad()
def test_loss_parity(rag, mode, epsilon, reduce):
    seq, tokm, bart, tok, doc_scores = rag
    ref_model = seq if mode == "sequence" else tokm
    gen = Seq2SeqGenerator(bart, tok, Seq2SeqFormat(max_combined_length=64))
    inputs = gen.build_inputs(QS, PS)
    assert (inputs.attention_mask == 0).any()  # padded rows: the loss masks them
    target, tmask = gen.build_targets(ANSWERS)
    labels = torch.cat([torch.full((len(QS), 1), gen.decoder_start_token_id), target], 1)
    ref_model.config.label_smoothing, ref_model.config.reduce_loss = epsilon, reduce
    try:
        ref = ref_model(**_ref_kwargs(inputs, doc_scores), labels=labels).loss
    finally:
        ref_model.config.label_smoothing, ref_model.config.reduce_loss = 0.0, False
    prior = doc_scores.log_softmax(-1)
    vocab = gen.vocab_logprobs(inputs, target, tmask)
    ours = label_smoothed_nll_loss(
        mode, prior, vocab, target, tmask, epsilon, "sum" if reduce else "none"
    )
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


# num_beams, num_return_sequences, min_new_tokens, length_penalty, early_stopping
SEQUENCE_SETTINGS = [
    (1, 1, 0, 1.0, False),
    (2, 2, 0, 1.0, False),
    (4, 3, 1, 0.5, True),
    (4, 1, 1, 2.0, "never"),
]
TOKEN_SETTINGS = [(1, 1, 0, 1.0, False), (4, 1, 0, 1.0, False), (4, 3, 1, 0.5, True)]


def _padded(hyps, width, pad, start):
    rows = [[start, *h.token_ids] for d in hyps for h in d.nbest]
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


@pytest.mark.parametrize(("nb", "nrs", "min_new", "lp", "es"), SEQUENCE_SETTINGS)
@torch.no_grad()
def test_rag_sequence_thorough_generate_parity(rag, nb, nrs, min_new, lp, es):
    seq, _, bart, tok, doc_scores = rag
    gen = Seq2SeqGenerator(bart, tok, Seq2SeqFormat(max_combined_length=20, cut_passage=False))
    inputs = gen.build_inputs(QS, PS)
    assert bool(inputs.attention_mask.all())  # unpadded: see the module docstring
    ref = seq.generate(
        **_ref_kwargs(inputs, doc_scores),
        num_beams=nb,
        num_return_sequences=nrs,
        max_new_tokens=8,
        min_new_tokens=min_new,
        length_penalty=lp,
        early_stopping=es,
    )
    cfg = DecodeConfig(nb, 8, min_new, lp, es, nrs)
    ours = decode_rag_sequence(gen, inputs, doc_scores, cfg, thorough=True)
    assert [len(d.nbest) for d in ours] == [nrs] * len(QS)
    assert torch.equal(_padded(ours, ref.shape[1], gen.pad_token_id, 2), ref)
    # log p(y|x) of every returned hypothesis equals transformers' -loss (exclude_bos_score)
    ctx = inputs.input_ids.view(len(QS), K, -1).repeat_interleave(nrs, 0).flatten(0, 1)
    msk = inputs.attention_mask.view(len(QS), K, -1).repeat_interleave(nrs, 0).flatten(0, 1)
    loss = seq(
        context_input_ids=ctx,
        context_attention_mask=msk,
        doc_scores=doc_scores.repeat_interleave(nrs, 0),
        labels=ref,
        exclude_bos_score=True,
        n_docs=K,
    ).loss
    ours_lp = torch.tensor([h.logprob for d in ours for h in d.nbest])
    torch.testing.assert_close(ours_lp, -loss, atol=1e-4, rtol=1e-5)


def test_parity_outputs_are_not_degenerate(rag):
    """The random model answers differently per passage, so the parity tests could fail."""
    _, _, bart, tok, doc_scores = rag
    gen = Seq2SeqGenerator(bart, tok, Seq2SeqFormat(max_combined_length=20, cut_passage=False))
    inputs = gen.build_inputs(QS, PS)
    with torch.no_grad():
        out = bart.generate(inputs.input_ids, num_beams=2, max_new_tokens=8)
    contexts = {tuple(r) for r in inputs.input_ids.tolist()}  # truncation cuts the question
    assert len(contexts) >= 4
    assert len({tuple(r) for r in out.tolist()}) == len(contexts)  # one answer per context
    assert len({int((r != gen.pad_token_id).sum()) for r in out}) >= 2  # mixed lengths


@pytest.mark.parametrize(("nb", "nrs", "min_new", "lp", "es"), TOKEN_SETTINGS)
@torch.no_grad()
def test_rag_token_generate_parity(rag, nb, nrs, min_new, lp, es):
    _, tokm, bart, tok, doc_scores = rag
    gen = Seq2SeqGenerator(bart, tok, Seq2SeqFormat(max_combined_length=64))
    inputs = gen.build_inputs(QS, PS)  # padded rows: RAG-Token masks them in transformers too
    ref = tokm.generate(
        **_ref_kwargs(inputs, doc_scores),
        num_beams=nb,
        num_return_sequences=nrs,
        max_length=9,
        min_length=1 + min_new,
        length_penalty=lp,
        early_stopping=es,
        forced_bos_token_id=0,
    )
    cfg = DecodeConfig(nb, 8, min_new, lp, es, nrs)
    ours = decode_rag_token(gen, inputs, doc_scores, cfg)
    assert torch.equal(_padded(ours, ref.shape[1], gen.pad_token_id, 2), ref)
    # log p(y|x) = Σ_i log p'(y_i|x,y_<i) from transformers' own marginal (forced BOS excluded)
    B = len(QS)
    out = tokm(
        context_input_ids=inputs.input_ids.view(B, K, -1).repeat_interleave(nrs, 0).flatten(0, 1),
        context_attention_mask=inputs.attention_mask.view(B, K, -1)
        .repeat_interleave(nrs, 0)
        .flatten(0, 1),
        doc_scores=doc_scores.repeat_interleave(nrs, 0),
        decoder_input_ids=ref,
        do_marginalize=True,
        n_docs=K,
    )
    tgt = torch.cat([ref[:, 1:], torch.full_like(ref[:, :1], gen.pad_token_id)], 1)
    lp_tok = out.logits.gather(-1, tgt[..., None])[..., 0]  # (B*nrs, L) marginal log-probs
    keep = tgt != gen.pad_token_id
    keep[:, 0] = False  # the forced BOS
    want = (lp_tok * keep).sum(-1)
    ours_lp = torch.tensor([h.logprob for d in ours for h in d.nbest])
    torch.testing.assert_close(ours_lp, want, atol=1e-4, rtol=1e-5)
