"""The benchmark configuration of benchmarks/decoding.py and training.py, small: same answers.

Issue 9 makes margin's decoding fast by not doing work twice: the decoder-start step (and with it
every layer's cross-attention keys/values) runs once per (question, passage) row and is copied to
that row's beams and hypotheses; beams that stay in their row move only the decoder's own cache;
Thorough Decoding scores only the pairs no beam scored, in bounded chunks; RAG-Token keeps each
hypothesis's per-passage token scores from the search instead of a second pass. None of that may
change an answer. This file runs the benchmark's setting (explicit unpadded context rows given
to both sides, forced BOS/EOS, 4 beams, random fixed-seed models) at a size that takes seconds,
against ``RagSequenceForGeneration.generate``, ``RagTokenForGeneration.generate`` and the
transformers RAG training loss.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

import margin.generation.generator as generator_module
from margin.generation.decoding import DecodeConfig, decode_rag_sequence, decode_rag_token
from margin.generation.generator import GenInputs
from margin.generation.seq2seq import Seq2SeqGenerator
from margin.marginalize import doc_log_prior, nll_loss

B, K, S, VOCAB, BEAMS, MAX_NEW = 4, 4, 24, 300, 4, 8


class IdTokenizer:
    """The inputs are token ids already; a hypothesis's text is its ids."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i < 4))


@pytest.fixture(scope="module")
def setup():
    """BART-shaped generator (forced BOS/EOS like BART's), DPR question encoder, both RAGs."""
    torch.manual_seed(0)
    bcfg = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, forced_bos_token_id=0,
        forced_eos_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        init_std=0.2,  # answers differ per passage and are far from ties
    )
    bart = BartForConditionalGeneration(bcfg).eval()
    bart.generation_config.forced_bos_token_id = 0  # as BART's checkpoints set it
    with torch.no_grad():
        bart.final_logits_bias[0, 2] = 2.0  # EOS is likely: hypotheses of mixed lengths
    qcfg = DPRConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    qenc = DPRQuestionEncoder(qcfg).eval()
    cfg = RagConfig.from_question_encoder_generator_configs(qcfg, bcfg, n_docs=K)
    seq = RagSequenceForGeneration(config=cfg, question_encoder=qenc, generator=bart).eval()
    tok = RagTokenForGeneration(config=cfg, question_encoder=qenc, generator=bart).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (B * K, S), generator=g)  # (B*k, S) unpadded context rows
    ids[:, 0], ids[:, -1] = 0, 2
    inputs = GenInputs.from_ids(ids, torch.ones_like(ids), K)
    scores = torch.randn(B, K, generator=g)  # (B, k)
    return bart, qenc, seq, tok, Seq2SeqGenerator(bart, IdTokenizer()), inputs, scores


def _rows(decoded, start=2):
    return [[start, *d.best.token_ids] for d in decoded]


def _hf_rows(out, pad=1):
    return [[t for t in row if t != pad] for row in out.tolist()]


@torch.no_grad()
def test_rag_sequence_thorough_is_transformers_generate(setup):
    bart, _, seq, _, gen, inputs, scores = setup
    cfg = DecodeConfig(num_beams=BEAMS, max_new_tokens=MAX_NEW)
    ref = seq.generate(context_input_ids=inputs.input_ids,
                       context_attention_mask=inputs.attention_mask, doc_scores=scores,
                       n_docs=K, num_beams=BEAMS, max_new_tokens=MAX_NEW)
    ours = decode_rag_sequence(gen, inputs, scores, cfg, thorough=True)
    assert _rows(ours) == _hf_rows(ref)
    # the answers are not degenerate: mixed lengths, and Thorough had pairs to score
    assert len({len(r) for r in _hf_rows(ref)}) >= 2
    loss = seq(context_input_ids=inputs.input_ids, context_attention_mask=inputs.attention_mask,
               doc_scores=scores, labels=ref, exclude_bos_score=True, n_docs=K).loss
    torch.testing.assert_close(torch.tensor([d.best.logprob for d in ours]), -loss,
                               atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_thorough_scores_exactly_the_pairs_no_beam_scored(setup, monkeypatch):
    """The extra pass covers (distinct hypothesis, passage) pairs minus the beams' own, and its
    chunks (forced small here) change nothing."""
    _, _, _, _, gen, inputs, scores = setup
    cfg = DecodeConfig(num_beams=BEAMS, max_new_tokens=MAX_NEW, num_return_sequences=BEAMS)
    whole = decode_rag_sequence(gen, inputs, scores, cfg, thorough=True)
    calls = []
    real = Seq2SeqGenerator._score

    def spy(self, enc, rows, tgt, mask):
        calls.append(rows.numel())
        return real(self, enc, rows, tgt, mask)

    monkeypatch.setattr(Seq2SeqGenerator, "_score", spy)
    monkeypatch.setattr(generator_module, "SCORE_CHUNK", 5 * MAX_NEW * VOCAB)  # 5 pairs a chunk
    chunked = decode_rag_sequence(gen, inputs, scores, cfg, thorough=True)
    assert [[h.token_ids for h in d.nbest] for d in chunked] == [
        [h.token_ids for h in d.nbest] for d in whole
    ]
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close([h.logprob for h in a.nbest], [h.logprob for h in b.nbest])
    assert len(calls) >= 2 and max(calls) <= 5
    # every (distinct hypothesis, passage) pair that no passage's beam produced, and no more
    beams = gen.model.generate(inputs.input_ids, attention_mask=inputs.attention_mask,
                               num_beams=BEAMS, num_return_sequences=BEAMS,
                               max_new_tokens=MAX_NEW).view(B, K, BEAMS, -1)
    want = 0
    for b in range(B):
        produced = {(tuple(_hf_rows(beams[b, z])[j]), z) for z in range(K) for j in range(BEAMS)}
        want += len({h for h, _ in produced}) * K - len(produced)
    assert sum(calls) == want > 0


@torch.no_grad()
def test_rag_token_is_transformers_generate(setup):
    bart, _, _, tok, gen, inputs, scores = setup
    cfg = DecodeConfig(num_beams=BEAMS, max_new_tokens=MAX_NEW, num_return_sequences=2)
    ref = tok.generate(context_input_ids=inputs.input_ids,
                       context_attention_mask=inputs.attention_mask, doc_scores=scores,
                       n_docs=K, num_beams=BEAMS, num_return_sequences=2,
                       max_length=1 + MAX_NEW, forced_bos_token_id=0, forced_eos_token_id=2)
    ours = decode_rag_token(gen, inputs, scores, cfg)
    assert [[2, *h.token_ids] for d in ours for h in d.nbest] == _hf_rows(ref)
    assert len({len(r) for r in _hf_rows(ref)}) >= 2
    # the scores kept by the search are the teacher-forced ones: marginal log p(y|x)
    out = tok(context_input_ids=inputs.input_ids.view(B, K, -1).repeat_interleave(2, 0)
              .flatten(0, 1),
              context_attention_mask=inputs.attention_mask.view(B, K, -1)
              .repeat_interleave(2, 0).flatten(0, 1),
              doc_scores=scores.repeat_interleave(2, 0), decoder_input_ids=ref,
              do_marginalize=True, n_docs=K)
    tgt = torch.cat([ref[:, 1:], torch.full_like(ref[:, :1], 1)], 1)
    lp = out.logits.gather(-1, tgt[..., None])[..., 0]  # (B*2, L) marginal log-probs
    keep = tgt != 1
    keep[:, 0] = False  # the forced BOS is prompt, not prediction
    ours_lp = torch.tensor([h.logprob for d in ours for h in d.nbest])
    torch.testing.assert_close(ours_lp, (lp * keep).sum(-1), atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_beams_leaving_their_row_still_decode_correctly(setup):
    """advance() moves only the decoder's own cache while beams stay in their (question,
    passage) row; a reorder across rows must move the cross-attention cache too."""
    _, _, _, _, gen, inputs, _ = setup
    R = inputs.input_ids.shape[0]
    state = gen.start(gen.encode(inputs), expand=2)  # rows (R, 2)
    gen.step(state)
    swap = torch.arange(2 * R).view(R, 2).flip(0).flatten()  # every beam to another context
    tokens = torch.full((2 * R,), 7)
    gen.advance(state, tokens, swap)
    got = gen.step(state)  # (2R, V)
    flipped = GenInputs(inputs.input_ids.flip(0), inputs.attention_mask, K)
    fresh = gen.start(gen.encode(flipped), expand=2)
    gen.step(fresh)
    gen.advance(fresh, tokens, torch.arange(2 * R))
    torch.testing.assert_close(got, gen.step(fresh), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_training_loss_and_gradients_are_transformers(setup, mode):
    """One training step, both ways: the same loss (1e-4) and the same generator gradient."""
    bart, qenc, seq, tok, gen, inputs, _ = setup
    g = torch.Generator().manual_seed(2)
    q_ids = torch.randint(5, 50, (B, 6), generator=g)
    doc_embs = 0.1 * torch.randn(B, K, 16, generator=g)
    lengths = torch.tensor([3, 5, 8, 4])
    target = torch.randint(4, VOCAB, (B, 8), generator=g)
    target[:, 0] = 0
    target[torch.arange(B), lengths - 1] = 2
    mask = torch.arange(8)[None] < lengths[:, None]  # (B, T)
    target = target.masked_fill(~mask, 1)

    def step(fn):
        bart.zero_grad()
        qenc.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), bart.model.shared.weight.grad.clone()

    def ours():
        q = qenc(q_ids).pooler_output  # (B, d), in the graph
        tok_lp = gen.token_logprobs(inputs, target, mask.long())  # (B, k, T)
        return nll_loss(mode, doc_log_prior(q, doc_embs), tok_lp, mask, "sum")

    def theirs():
        q = qenc(q_ids).pooler_output
        scores = torch.einsum("bd,bkd->bk", q, doc_embs)
        labels = torch.cat([torch.full((B, 1), 2), target], 1)  # decoder start + target
        model = seq if mode == "sequence" else tok
        return model(context_input_ids=inputs.input_ids,
                     context_attention_mask=inputs.attention_mask, doc_scores=scores,
                     labels=labels, n_docs=K).loss.sum()

    ours_loss, ours_grad = step(ours)
    ref_loss, ref_grad = step(theirs)
    torch.testing.assert_close(ours_loss, ref_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours_grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert ours_grad.abs().sum() > 0
