"""The paper's decoding (Sec. 2.5) against the plain generator and against its own definitions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from margin.decoding import DecodeConfig, decode, decode_rag_sequence, decode_rag_token
from margin.errors import MarginError
from margin.generator import Seq2SeqGenerator
from margin.marginalize import rag_sequence_logprob
from test_generator import (
    PASSAGES,
    QUESTIONS,
    bare_prompt,
    causal,
    preamble_prompt,
)

QS = [*QUESTIONS, "who made the louvre?"]
PS = [
    [*PASSAGES[0], PASSAGES[1][0]],
    [*PASSAGES[1], PASSAGES[0][0]],
    [PASSAGES[1][1], PASSAGES[0][1], PASSAGES[1][0]],
]
SCORES = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4], [-0.6, 0.2, 0.4]])


def _ids(decoded):
    return [list(h.token_ids) for d in decoded for h in d.nbest]


def _strip(rows, pad, eos_ids, skip):
    """model.generate rows -> generated tokens up to and including the first EOS."""
    out = []
    for r in rows.tolist():
        r = r[skip:]
        ends = [i for i, t in enumerate(r) if t in eos_ids]
        out.append(r[: ends[0] + 1] if ends else [t for t in r if t != pad])
    return out


@torch.no_grad()
def test_k1_rag_token_beam_equals_plain_generate(bart):
    inputs = bart.build_inputs(QS, None)  # closed book: k = 1
    assert inputs.n_docs == 1
    cfg = DecodeConfig(num_beams=4, max_new_tokens=8, num_return_sequences=2)
    ours = decode_rag_token(bart, inputs, torch.zeros(3, 1), cfg)
    ref = bart.model.generate(
        inputs.input_ids,
        attention_mask=inputs.attention_mask,
        num_beams=4,
        num_return_sequences=2,
        max_new_tokens=8,
    )
    assert _ids(ours) == _strip(ref, bart.pad_token_id, bart.eos_token_ids, 1)
    assert all(h.doc_posterior == (1.0,) for d in ours for h in d.nbest)


@torch.no_grad()
def test_identical_passages_equal_plain_generate(bart):
    # without forced EOS and length penalty, beam search and RAG-Sequence rank by the same score
    gen = Seq2SeqGenerator(bart.model, bart.tokenizer, bart.fmt)
    gen.forced_eos_token_id = None
    cfg = DecodeConfig(num_beams=3, max_new_tokens=6, length_penalty=0.0)
    same = [[p[0]] * 3 for p in PS]
    inputs = gen.build_inputs(QS, same)
    single = gen.build_inputs(QS, [[p[0]] for p in PS])
    ref = bart.model.generate(
        single.input_ids,
        attention_mask=single.attention_mask,
        num_beams=3,
        max_new_tokens=6,
        length_penalty=0.0,
        forced_eos_token_id=None,
    )
    want = _strip(ref, gen.pad_token_id, gen.eos_token_ids, 1)
    for method in ("token", "thorough", "fast"):
        assert _ids(decode(gen, inputs, SCORES, cfg, method)) == want, method


@torch.no_grad()
def test_thorough_reuses_beams_and_beats_fast(bart):
    cfg = DecodeConfig(num_beams=3, max_new_tokens=8, num_return_sequences=3)
    inputs = bart.build_inputs(QS, PS)
    calls = {"encoder": 0, "rows": 0}
    encoder = bart.model.get_encoder()
    hook = encoder.register_forward_hook(
        lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1)
    )
    score = bart.score

    def counting_score(enc, rows, tgt, mask):
        calls["rows"] += rows.numel()
        return score(enc, rows, tgt, mask)

    bart.score = counting_score
    try:
        thorough = decode_rag_sequence(bart, inputs, SCORES, cfg, thorough=True)
        extra_rows, calls["rows"] = calls["rows"], 0
        fast = decode_rag_sequence(bart, inputs, SCORES, cfg, thorough=False)
    finally:
        del bart.score
        hook.remove()
    assert calls["encoder"] == 2 and calls["rows"] == 0  # one encoder pass per decode, fast: none
    assert 0 < extra_rows < 3 * 3 * 9  # only the pairs no beam scored (at most U*k = 27*3)
    for t, f in zip(thorough, fast, strict=True):
        assert t.best.logprob >= f.best.logprob - 1e-6
        assert [h.logprob for h in t.nbest] == sorted((h.logprob for h in t.nbest), reverse=True)
    # every thorough score equals the definition: teacher-force y under all k passages
    prior = SCORES.log_softmax(-1)
    for b, d in enumerate(thorough):
        for h in d.nbest:
            tgt = torch.tensor([h.token_ids])
            mask = torch.ones_like(tgt)
            mask[0, 0] = 0  # the forced BOS is not scored
            one = bart.build_inputs([QS[b]], [PS[b]])
            tok = bart.token_logprobs(one, tgt, mask)
            want = rag_sequence_logprob(prior[b : b + 1], tok, mask)
            assert h.logprob == pytest.approx(float(want), abs=1e-4)
            post = torch.tensor(h.doc_posterior)
            assert float(post.sum()) == pytest.approx(1.0, abs=1e-5)
    # fast never credits a passage whose beam did not produce y, so it can only score lower
    fast_best = {tuple(d.best.token_ids): d.best.logprob for d in fast}
    for d in thorough:
        for h in d.nbest:
            if h.token_ids in fast_best:
                assert fast_best[h.token_ids] <= h.logprob + 1e-6


@torch.no_grad()
def test_batch_equals_one_question_at_a_time(bart):
    cfg = DecodeConfig(num_beams=2, max_new_tokens=6, num_return_sequences=2)
    inputs = bart.build_inputs(QS, PS)
    for method in ("token", "thorough"):
        batch = decode(bart, inputs, SCORES, cfg, method)
        for b in (0, 2):  # the first and the last question: any row offset bug shows
            one = decode(bart, bart.build_inputs([QS[b]], [PS[b]]), SCORES[b : b + 1], cfg, method)
            assert _ids(one) == _ids(batch[b : b + 1]), method
            assert one[0].best.logprob == pytest.approx(batch[b].best.logprob, abs=1e-4)


@torch.no_grad()
def test_rag_token_provenance_follows_a_dominant_passage(bart):
    cfg = DecodeConfig(num_beams=2, max_new_tokens=6)
    inputs = bart.build_inputs(QS[:1], PS[:1])
    out = decode_rag_token(bart, inputs, torch.tensor([[-30.0, 30.0, -30.0]]), cfg)[0].best
    assert len(out.token_docs) == len(out.token_ids)
    assert set(out.token_docs[1:]) == {1}  # position 0 is the forced BOS: prior only, also 1
    assert out.doc_posterior[1] == pytest.approx(1.0, abs=1e-6)
    # with one passage in charge, RAG-Token is that passage's own beam search
    alone = decode_rag_token(bart, bart.build_inputs(QS[:1], [[PS[0][1]]]), torch.zeros(1, 1), cfg)
    assert out.token_ids == alone[0].best.token_ids
    assert out.text == bart.decode(out.token_ids)


def test_decoding_errors(bart):
    inputs = bart.build_inputs(QS, PS)
    with pytest.raises(MarginError, match="doc_scores has shape"):
        decode_rag_token(bart, inputs, torch.zeros(3, 2), DecodeConfig())
    with pytest.raises(MarginError, match="num_return_sequences"):
        decode_rag_sequence(bart, inputs, SCORES, DecodeConfig(num_beams=2, num_return_sequences=3))
    with pytest.raises(MarginError, match="unknown decoding"):
        decode(bart, inputs, SCORES, DecodeConfig(), "greedy")  # type: ignore[arg-type]


@torch.no_grad()
def test_causal_k1_decoding_equals_plain_generate(llama):
    qs = ["where is the tower ?", "what is a river in france ?"]
    inputs = llama.build_inputs(qs, None)
    for beams in (1, 3):
        cfg = DecodeConfig(num_beams=beams, max_new_tokens=7)
        ours = decode_rag_token(llama, inputs, torch.zeros(2, 1), cfg)
        ref = llama.model.generate(
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            do_sample=False,
            num_beams=beams,
            max_new_tokens=7,
            pad_token_id=llama.pad_token_id,
        )
        width = inputs.input_ids.shape[1]
        assert _ids(ours) == _strip(ref, llama.pad_token_id, llama.eos_token_ids, width), beams
    # RAG-Sequence thorough on the causal generator: scores match the definition
    inputs = llama.build_inputs(qs, PASSAGES)
    cfg = dataclasses.replace(cfg, num_beams=2)
    out = decode_rag_sequence(llama, inputs, SCORES[:2, :2], cfg)
    for b, d in enumerate(out):
        tgt = torch.tensor([d.best.token_ids])
        one = llama.build_inputs([qs[b]], [PASSAGES[b]])
        tok = llama.token_logprobs(one, tgt, torch.ones_like(tgt))
        want = rag_sequence_logprob(
            SCORES[b : b + 1, :2].log_softmax(-1), tok, torch.ones_like(tgt)
        )
        assert d.best.logprob == pytest.approx(float(want), abs=1e-4)


@pytest.mark.parametrize("prompt_fn", [preamble_prompt, bare_prompt])
@torch.no_grad()
def test_causal_shared_prefix_decodes_like_the_plain_path(prompt_fn):
    """The shared-prefix cache changes no token and no score (1e-4), greedy and beam, and a batch
    whose prompts share nothing (bare_prompt) takes the plain left-padded path. Suffix groups
    of one row length each (suffix_padding=0) against one left-padded batch."""
    shared, plain = causal(prompt_fn, True, 0.0), causal(prompt_fn, False, 10.0)
    qs = ["where is the tower ?", "what is a river in france ?", "what is the louvre ?"]
    inputs = shared.build_inputs(qs, PS)
    for beams, method in ((1, "token"), (3, "token"), (1, "thorough"), (2, "thorough")):
        cfg = DecodeConfig(num_beams=beams, max_new_tokens=6, num_return_sequences=beams)
        a = decode(shared, inputs, SCORES, cfg, method)
        b = decode(plain, inputs, SCORES, cfg, method)
        assert _ids(a) == _ids(b), (beams, method)
        for da, db in zip(a, b, strict=True):
            for ha, hb in zip(da.nbest, db.nbest, strict=True):
                assert ha.logprob == pytest.approx(hb.logprob, abs=1e-4)
                assert ha.doc_posterior == pytest.approx(hb.doc_posterior, abs=1e-4)
                assert ha.token_docs == hb.token_docs


@torch.no_grad()
def test_causal_shared_prefix_equals_plain_generate():
    gen = causal(preamble_prompt, True)
    inputs = gen.build_inputs(["where is the tower ?", "what is a river in france ?"], None)
    for beams in (1, 3):
        cfg = DecodeConfig(num_beams=beams, max_new_tokens=7)
        ours = decode_rag_token(gen, inputs, torch.zeros(2, 1), cfg)
        ref = gen.model.generate(
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            do_sample=False,
            num_beams=beams,
            max_new_tokens=7,
            pad_token_id=gen.pad_token_id,
        )
        width = inputs.input_ids.shape[1]
        assert _ids(ours) == _strip(ref, gen.pad_token_id, gen.eos_token_ids, width), beams


def test_greedy_rag_token_streams_the_answer_tokens(bart):
    cfg = DecodeConfig(num_beams=1, max_new_tokens=8, min_new_tokens=8)  # no early EOS
    streamed: list[list[int]] = []
    out = decode(bart, bart.build_inputs(QS[:1], PS[:1]), SCORES[:1], cfg, "token", streamed.append)
    ids = list(out[0].best.token_ids)
    # every token but the last was streamed as it was decided, in order, one question per call
    assert [s[0] for s in streamed] == ids[: len(streamed)] and len(streamed) == len(ids) - 1
    beams = DecodeConfig(num_beams=2, max_new_tokens=4)
    calls: list = []
    decode(bart, bart.build_inputs(QS[:1], PS[:1]), SCORES[:1], beams, "token", calls.append)
    assert calls == []  # beam search decides nothing until it ends: nothing to stream


@pytest.mark.parametrize("kind", ["bart", "llama"])
@pytest.mark.parametrize(("method", "beams"), [("token", 1), ("token", 2), ("thorough", 1),
                                               ("thorough", 2)])
@pytest.mark.parametrize("first_done", [0, -1])
def test_dropping_finished_groups_changes_nothing_but_the_work(kind, method, beams, first_done,
                                                               request, monkeypatch):
    """Groups that can no longer improve leave the batch (from its head or its tail); every
    result stays the same."""
    import margin.decoding as D

    gen = request.getfixturevalue(kind)
    inputs = gen.build_inputs(QS, PS)
    cfg = DecodeConfig(num_beams=beams, max_new_tokens=8)
    full = decode(gen, inputs, SCORES, cfg, "token")
    # make one question's second greedy token an end token, so groups finish unevenly
    stop = full[first_done].best.token_ids[1]
    monkeypatch.setattr(gen, "eos_token_ids", (*gen.eos_token_ids, stop))
    rows: list[int] = []
    step = gen.step
    monkeypatch.setattr(gen, "step", lambda state: rows.append(len(state.last_tokens)) or
                        step(state))
    real = D.beam_search
    monkeypatch.setattr(D, "beam_search", lambda *a, **kw: real(*a, **{**kw,
                                                                       "drop_finished": False}))
    kept = decode(gen, inputs, SCORES, cfg, method)
    steps_kept = list(rows)
    monkeypatch.setattr(D, "beam_search", real)
    rows.clear()
    dropped = decode(gen, inputs, SCORES, cfg, method)
    assert _ids(dropped) == _ids(kept)
    for a, b in zip(dropped, kept, strict=True):
        for x, y in zip(a.nbest, b.nbest, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert x.doc_posterior == pytest.approx(y.doc_posterior, abs=1e-5)
            assert x.token_docs == y.token_docs
    assert len(set(steps_kept)) == 1  # without dropping, every step runs every row
    if beams == 1:  # greedy: a group is done when its answer ends (beams wait for a heuristic)
        assert rows[-1] < rows[0] and sum(rows) < sum(steps_kept[: len(rows)])
