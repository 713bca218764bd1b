"""The paper's decoding (Sec. 2.5) against the plain generator and against its own definitions."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import PASSAGES, QUESTIONS, bare_prompt, causal, preamble_prompt
from margin.errors import MarginError
from margin.generation.decoding import DecodeConfig, decode, decode_rag_sequence, decode_rag_token
from margin.generation.generator import DecodeState, Encoded, Generator, GenInputs
from margin.generation.seq2seq import Seq2SeqGenerator
from margin.marginalize import rag_sequence_logprob

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
    import margin.generation.decoding as D

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


# ----------------------------------------------------------------------------- hand-set scores

PAD, EOS, A, B, C = range(5)  # a five-token vocabulary
WORDS = {A: "A", B: "B", C: "C"}
# after any first token: EOS with probability 0.97, each answer word 0.01 (PAD: never)
AFTER = torch.tensor([0.0, 0.97, 0.01, 0.01, 0.01]).log()


class TableGenerator(Generator):
    """p(y_i|x,z,y_<i) read from a hand-set table, so that every score is worked out by hand.

    The first token of row (question b, passage z) follows ``first[b][z]`` ({token: p}, the rest
    of the mass on EOS); every later token follows AFTER. With ``max_new_tokens=2`` a beam of z
    holds "X EOS" for z's most likely first tokens X, and p("X EOS"|x,z) = first[b][z][X] * 0.97.
    """

    eos_token_ids = (EOS,)
    pad_token_id = PAD
    forced_bos_token_id = None
    forced_eos_token_id = None

    def __init__(self, first: list[list[dict[int, float]]]):
        self.k = len(first[0])
        probs = torch.zeros(len(first) * self.k, 5)  # (B*k, V) rows question-major
        for r, table in enumerate(p for per_question in first for p in per_question):
            for token, p in table.items():
                probs[r, token] = p
            probs[r, EOS] = 1.0 - sum(table.values())
        self.first_logprobs = probs.log()
        self.model = torch.nn.Linear(1, 1)  # where the "model" lives: the CPU
        self.scored_rows = 0  # (question, passage) pairs teacher-forced by score()

    @property
    def vocab_size(self) -> int:
        return 5

    def inputs(self) -> GenInputs:
        rows = self.first_logprobs.shape[0]
        ids = torch.arange(rows)[:, None]  # (B*k, 1): a row's id is its table row
        return GenInputs(ids, torch.ones_like(ids), self.k)

    def build_inputs(self, questions, passages):
        raise NotImplementedError  # the table is the input

    def build_targets(self, answers):
        raise NotImplementedError

    def encode(self, inputs: GenInputs) -> Encoded:
        return Encoded(inputs)

    def _logits(self, enc, rows, target_ids, target_mask):
        self.scored_rows += rows.numel()
        M, T = target_ids.shape
        out = AFTER.repeat(M, T, 1)  # (M, T, V)
        out[:, 0] = self.first_logprobs[enc.inputs.input_ids[rows, 0]]
        return out

    def start(self, enc: Encoded, expand: int) -> DecodeState:
        rows = enc.inputs.input_ids[:, 0].repeat_interleave(expand)  # (N,) table row of each beam
        return DecodeState(cache=None, last_tokens=torch.full_like(rows, PAD),  # type: ignore[arg-type]
                           attention_mask=torch.ones_like(rows)[:, None], context=rows)

    def _forward_step(self, state: DecodeState) -> torch.Tensor:
        assert state.context is not None
        if state.steps == 0:
            return self.first_logprobs[state.context]  # (N, V)
        return AFTER.repeat(state.context.numel(), 1)

    def advance(self, state: DecodeState, next_tokens: torch.Tensor, reorder: torch.Tensor,
                moves: str = "any") -> None:
        assert state.context is not None
        state.context = state.context[reorder]
        state.last_tokens = next_tokens
        state.steps += 1

    def decode(self, token_ids) -> str:
        return " ".join(WORDS[t] for t in token_ids if t in WORDS)


def _by_hand(prior, first, beams, y):
    """p(y|x) of the answer word y (then EOS), summed over the passages z in ``beams``."""
    return sum(prior[z] * first[z][y] * 0.97 for z in beams)


def test_fast_decoding_scores_are_their_definition():
    """Fast Decoding (Sec. 2.5): p(y|x) ≈ Σ_z p(z|x) p(y|x,z) over the passages z whose beam
    produced y, p(y|x,z) taken as 0 elsewhere; no extra forward pass. Two questions, k = 3,
    2 beams per passage, every score worked out from the table."""
    priors = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
    first = [
        [{A: 0.60, B: 0.30, C: 0.09}, {B: 0.50, C: 0.40, A: 0.09}, {C: 0.70, A: 0.20, B: 0.09}],
        [{A: 0.70, B: 0.20, C: 0.09}, {A: 0.50, C: 0.30, B: 0.19}, {B: 0.45, C: 0.40, A: 0.14}],
    ]
    # each passage's beam: its 2 likeliest first words (each then EOS)
    beams = [[{A, B}, {B, C}, {C, A}], [{A, B}, {A, C}, {B, C}]]
    gen = TableGenerator(first)
    scores = torch.tensor(priors).log()  # softmax(log p) = p
    cfg = DecodeConfig(num_beams=2, max_new_tokens=2, num_return_sequences=2)
    for b in range(2):  # the beams are what the table says (k = 1: one passage's own beam)
        for z in range(3):
            one = TableGenerator([[first[b][z]]])
            [alone] = decode_rag_sequence(one, one.inputs(), torch.zeros(1, 1), cfg, thorough=False)
            assert {h.token_ids for h in alone.nbest} == {(y, EOS) for y in beams[b][z]}
    fast = decode_rag_sequence(gen, gen.inputs(), scores, cfg, thorough=False)
    assert gen.scored_rows == 0  # Fast Decoding runs no extra forward pass
    for b, d in enumerate(fast):
        words = set().union(*beams[b])
        # by hand, p(y|x) x (1/0.97): question 0: A .5x.6 + .2x.2 = .34, B .5x.3 + .3x.5 = .30,
        # C .3x.4 + .2x.7 = .26; question 1: A .2x.7 + .2x.5 = .24, B .2x.2 + .6x.45 = .31,
        # C .2x.3 + .6x.4 = .30
        want = {y: _by_hand(priors[b], first[b], [z for z in range(3) if y in beams[b][z]], y)
                for y in words}
        ranked = sorted(words, key=want.get, reverse=True)[:2]
        assert [h.token_ids for h in d.nbest] == [(y, EOS) for y in ranked]
        for h in d.nbest:
            y = h.token_ids[0]
            assert h.logprob == pytest.approx(math.log(want[y]), abs=1e-6)
            # p(z|x,y): only the passages whose beam produced y
            post = [priors[b][z] * first[b][z][y] * 0.97 / want[y] if y in beams[b][z] else 0.0
                    for z in range(3)]
            assert h.doc_posterior == pytest.approx(post, abs=1e-6)
    assert [d.best.text for d in fast] == ["A", "B"]
    # Thorough Decoding scores the same hypotheses under every passage: the full sum
    thorough = decode_rag_sequence(gen, gen.inputs(), scores, cfg, thorough=True)
    assert gen.scored_rows == 6  # one extra pass per (question, passage) pair no beam scored
    for b, d in enumerate(thorough):
        for h in d.nbest:
            y = h.token_ids[0]
            assert h.logprob == pytest.approx(math.log(_by_hand(priors[b], first[b], range(3), y)),
                                              abs=1e-6)


def test_fast_and_thorough_decoding_choose_different_answers():
    """A is passage 1's greedy answer, B passage 2's; B is also likely under passage 1, which
    Fast Decoding does not look at. p(z|x) = (0.7, 0.3):
    Fast:     p(A) = .7 x .5 = .35,             p(B) = .3 x .9 = .27            -> A
    Thorough: p(A) = .35 + .3 x .05 = .365,     p(B) = .7 x .4 + .27 = .55      -> B
    (each x 0.97, the answer's EOS)."""
    gen = TableGenerator([[{A: 0.50, B: 0.40, C: 0.09}, {B: 0.90, A: 0.05, C: 0.04}]])
    scores = torch.tensor([[0.7, 0.3]]).log()
    cfg = DecodeConfig(num_beams=1, max_new_tokens=2, num_return_sequences=1)
    [fast] = decode(gen, gen.inputs(), scores, cfg, "fast")
    [thorough] = decode(gen, gen.inputs(), scores, cfg, "thorough")
    assert (fast.best.text, thorough.best.text) == ("A", "B")
    assert fast.best.logprob == pytest.approx(math.log(0.35 * 0.97), abs=1e-6)
    assert thorough.best.logprob == pytest.approx(math.log(0.55 * 0.97), abs=1e-6)
    assert fast.best.doc_posterior == pytest.approx((1.0, 0.0), abs=1e-6)
    assert thorough.best.doc_posterior == pytest.approx((0.28 / 0.55, 0.27 / 0.55), abs=1e-6)
