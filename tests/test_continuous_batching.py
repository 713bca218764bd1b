"""Continuous batching (margin.serving.continuous): requests join the running decode between
steps, and every request gets exactly what ``RAG.ask`` gives it alone.

The tiny random Llama of tests/helpers.py behind the causal generator (a shared few-shot-like
preamble, so the rows share a prefix) over the server's 2016 index and its keyword encoder.
Its answers are gibberish but deterministic; what is checked is that they are the same.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

import margin.rag
import margin.serving.continuous as continuous
from helpers import SERVER_KEYWORDS as KEYWORDS
from helpers import QuestionKeywords, build_world, causal
from margin.errors import MarginError
from margin.generation.causal import CausalFormat, CausalGenerator
from margin.generation.continuous import regroup
from margin.generation.decoding import DecodeConfig
from margin.rag import RAG
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever
from margin.serving.config import ServeConfig
from margin.serving.continuous import ContinuousBatcher
from margin.serving.registry import start_registry
from margin.serving.schemas import AskKey
from margin.serving.server import create_app, run_batch
from margin.serving.streaming import Question

# (questions, max_new_tokens, the decoding step at which the request arrives)
REQUESTS = [
    (["capital of germany?"], 7, 0),
    (["where is the tower?", "capital of italy?"], 3, 2),
    (["what is the seine in france?"], 5, 3),
    (["the river in paris?"], 2, 3),
    (["capital of france?"], 4, 6),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory, bart):
    return build_world(tmp_path_factory.mktemp("indexes"), bart)[0]


def causal_rag(root, generator=None) -> RAG:
    return RAG(generator or causal(), Retriever(open_index(root / "2016"),
                                                QuestionKeywords(KEYWORDS)),
               doc_score_scale=5.0, default_decode=DecodeConfig(max_new_tokens=8), default_k=3)


def key(rag: RAG, max_new_tokens: int, k: int = 3) -> AskKey:
    entry = start_registry(rag, None).active
    return AskKey(entry, "token", "greedy", k, None, max_new_tokens)


def record_answers(monkeypatch, module) -> dict[str, object]:
    """Each question's best hypothesis (token ids, marginal, provenance) as ``module``'s
    ``answer_of`` sees it."""
    seen: dict[str, object] = {}
    original = module.answer_of

    def spy(question, passages, decoded, *args):
        seen[question] = decoded.best
        return original(question, passages, decoded, *args)

    monkeypatch.setattr(module, "answer_of", spy)
    return seen


def assert_same(got, want) -> None:
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.token_docs == want.token_docs
    assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
    assert got.doc_posterior == pytest.approx(want.doc_posterior, abs=1e-5)


def test_requests_joining_at_different_steps_get_what_rag_ask_gives_each_alone(root, monkeypatch):
    rag = causal_rag(root)
    want = record_answers(monkeypatch, margin.rag)
    alone = [rag.ask(qs, k=3, max_new_tokens=n) for qs, n, _ in REQUESTS]
    got = record_answers(monkeypatch, continuous)
    batcher = ContinuousBatcher(rag.generator, run_batch, max_rows=40)
    futures: dict[int, object] = {}
    step = rag.generator.step

    def arrive_on_schedule(state):  # the worker's step: submit the requests due by now
        for i, (qs, n, at) in enumerate(REQUESTS):
            if i not in futures and at <= batcher.steps_run:
                futures[i] = batcher.submit(key(rag, n), [Question(q) for q in qs])
        return step(state)

    monkeypatch.setattr(rag.generator, "step", arrive_on_schedule)
    try:
        qs, n, _ = REQUESTS[0]
        futures[0] = batcher.submit(key(rag, n), [Question(q) for q in qs])
        answers = [futures_result(futures, i) for i in range(len(REQUESTS))]
    finally:
        batcher.close()
    assert batcher.joined >= 4  # requests did join a batch already decoding
    for mine, theirs in zip(answers, alone, strict=True):
        assert [a.answer for a in mine] == [a.answer for a in theirs]
        for a, b in zip(mine, theirs, strict=True):
            assert a.question == b.question and a.token_docs == b.token_docs
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [p.prior for p in a.passages] == pytest.approx([p.prior for p in b.passages])
            assert_same(got[a.question], want[a.question])
    assert len(got) == len(want) == 6


def futures_result(futures: dict, i: int, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while i not in futures:  # submitted by the worker when its step comes
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return futures[i].result(timeout)


@torch.no_grad()
def test_regrouped_rows_compute_what_they_computed_alone(root):
    """Two prompt batches of different lengths, left-padded into one: each row's next-token
    log-probs are those of its own batch, to float rounding."""
    rag = causal_rag(root)
    gen = rag.generator
    states, alone = [], []
    for questions in (["capital of germany?"], ["what is the seine in france, where?"]):
        hits = rag.retrieve(questions, k=2)
        state = gen.start(gen.encode(gen.build_inputs(questions, hits.passages)), expand=1)
        first = gen.step(state).argmax(-1)
        gen.advance(state, first, torch.arange(first.numel()))
        states.append(state)
    assert states[0].attention_mask.shape != states[1].attention_mask.shape
    for state in states:  # reference: a copy of each decoded alone
        copy = regroup([(state, torch.arange(state.last_tokens.numel()))])
        alone.append(gen.step(copy))
    joined = regroup([(s, torch.arange(s.last_tokens.numel())) for s in states])
    both = gen.step(joined)
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=0)
    # rows leave: a row of the shorter batch alone, the join's left padding dropped again
    gen.advance(joined, both.argmax(-1), torch.arange(4))
    short = min((0, 1), key=lambda i: states[i].attention_mask.shape[1])
    row = 2 * short
    one = regroup([(joined, torch.tensor([row]))])
    assert one.attention_mask.shape[1] == states[short].attention_mask.shape[1] + 1
    torch.testing.assert_close(gen.step(one), gen.step(joined)[row : row + 1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bounds


def test_the_running_batch_holds_at_most_max_rows_and_a_larger_request_runs_alone(root,
                                                                                  monkeypatch):
    rag = causal_rag(root)
    small, large = ["capital of germany?"], ["capital of italy?", "the river in paris?"]
    alone = [rag.ask(small, k=3, max_new_tokens=4), rag.ask(large, k=3, max_new_tokens=4)]
    rows_seen: list[int] = []
    step = rag.generator.step
    monkeypatch.setattr(rag.generator, "step",
                        lambda state: (rows_seen.append(state.last_tokens.numel()), step(state))[1])
    batcher = ContinuousBatcher(rag.generator, run_batch, max_rows=4)
    try:
        with batcher._cond:  # both queued before the worker looks: it may take only the first
            futures = [batcher.submit(key(rag, 4), [Question(q) for q in qs])
                       for qs in (small, large)]
        got = [f.result(60) for f in futures]
    finally:
        batcher.close()
    assert [[a.answer for a in g] for g in got] == [[a.answer for a in w] for w in alone]
    assert set(rows_seen) == {3, 6}  # 3 rows, then the 6-row request alone: never 9
    assert batcher.joined == 0


def test_a_full_queue_refuses_with_busy(root):
    from margin.serving.batching import BatcherBusy

    rag = causal_rag(root)
    batcher = ContinuousBatcher(rag.generator, run_batch, max_pending=1)
    try:
        with batcher._cond:  # the worker cannot take the first while we hold its lock
            first = batcher.submit(key(rag, 2), [Question("capital of germany?")])
            with pytest.raises(BatcherBusy, match="already queued"):
                batcher.submit(key(rag, 2), [Question("capital of italy?")])
        assert len(first.result(60)) == 1
    finally:
        batcher.close()
    with pytest.raises(MarginError, match="closed"):
        batcher.submit(key(rag, 2), [Question("capital of italy?")])


# ------------------------------------------------------------------------ one request's failure


def test_a_prompt_too_long_fails_only_its_own_request_in_its_prefill_group(root, llama,
                                                                           monkeypatch):
    generator = CausalGenerator(llama.model, llama.tokenizer, CausalFormat(max_prompt_length=64))
    rag = causal_rag(root, generator)
    good, long_question = "capital of germany?", "capital of germany " + "where is the tower " * 20
    [want] = rag.ask([good], k=3, max_new_tokens=3)
    with pytest.raises(MarginError, match="prompt"):
        rag.ask([long_question], k=3, max_new_tokens=3)
    built: list[list[str]] = []
    build = generator.build_inputs
    monkeypatch.setattr(generator, "build_inputs",
                        lambda qs, ps: (built.append(list(qs)), build(qs, ps))[1])
    batcher = ContinuousBatcher(generator, run_batch)
    try:
        shared = key(rag, 3)  # one index entry: the two are prefilled as one group
        with batcher._cond:
            ok = batcher.submit(shared, [Question(good)])
            bad = batcher.submit(shared, [Question(long_question)])
        [got] = ok.result(60)
        with pytest.raises(MarginError, match="prompt"):
            bad.result(60)
    finally:
        batcher.close()
    assert built[0] == [good, long_question]  # the group failed, then each alone
    assert got.answer == want.answer and got.logprob == pytest.approx(want.logprob, abs=1e-5)


def test_a_failed_decoding_step_answers_each_request_again_alone(root, monkeypatch):
    """The step fails while two requests decode together: each is answered by RAG.ask alone,
    and the one that fails alone too is the only one to get an error."""
    rag = causal_rag(root)
    good, poison = "capital of germany?", "capital of nowhere?"
    [want] = rag.ask([good], k=3, max_new_tokens=3)
    step = rag.generator.step

    def step_fails_on_two_requests(state):
        if state.last_tokens.numel() > 3:
            raise RuntimeError("the step broke")
        return step(state)

    def fallback(key, items):
        if any(item.text == poison for item in items):
            raise MarginError("cannot answer this one")
        return run_batch(key, items)

    monkeypatch.setattr(rag.generator, "step", step_fails_on_two_requests)
    batcher = ContinuousBatcher(rag.generator, fallback)
    try:
        shared = key(rag, 3)
        with batcher._cond:
            ok = batcher.submit(shared, [Question(good)])
            bad = batcher.submit(shared, [Question(poison)])
        [got] = ok.result(60)
        with pytest.raises(MarginError, match="cannot answer"):
            bad.result(60)
    finally:
        batcher.close()
    assert got.answer == want.answer


# ----------------------------------------------------------------------------- the server


def test_a_slow_rag_sequence_request_does_not_hold_a_token_request_behind_it(root, monkeypatch):
    app = create_app(causal_rag(root), None, ServeConfig())
    rag = app.state.registry.active.rag
    gate, entered = threading.Event(), threading.Event()
    original = rag.ask

    def slow_sequence(questions, **options):
        if options["mode"] == "sequence":
            entered.set()
            assert gate.wait(30)
        return original(questions, **options)

    monkeypatch.setattr(rag, "ask", slow_sequence)
    sequence = {"question": "capital of italy?", "mode": "sequence", "decoding": "beam",
                "beams": 2, "max_new_tokens": 3}
    with TestClient(app) as c, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(c.post, "/v1/ask", json=sequence)
        assert entered.wait(30)  # the RAG-Sequence request holds the micro-batcher's worker
        token = c.post("/v1/ask", json={"question": "capital of germany?", "max_new_tokens": 3})
        assert token.status_code == 200, token.text  # answered while it still runs
        assert not slow.done()
        gate.set()
        assert slow.result(30).status_code == 200
    assert app.state.continuous.items_run == 1


def test_the_server_streams_and_answers_from_the_running_batch(root):
    rag = causal_rag(root)
    app = create_app(rag, None, ServeConfig())
    body = {"questions": ["capital of germany?", "what is the seine?"], "max_new_tokens": 4}
    with TestClient(app) as c:
        plain = c.post("/v1/ask", json=body)
        with c.stream("POST", "/v1/ask", json={**body, "stream": True}) as r:
            events = [block for block in r.read().decode().strip().split("\n\n")]
    assert plain.status_code == 200, plain.text
    want = rag.ask(body["questions"], max_new_tokens=4)
    assert [a["answer"] for a in plain.json()["answers"]] == [a.answer for a in want]
    assert events[-1].startswith("event: answer") and sum(e.startswith("event: token")
                                                          for e in events) > 0
    assert app.state.continuous.items_run == 4 and app.state.batcher.items_run == 0


def test_continuous_batching_off_or_a_seq2seq_model_uses_the_micro_batcher(root, bart):
    off = create_app(causal_rag(root), None, ServeConfig(continuous_batching=False))
    seq2seq = create_app(causal_rag(root, bart), None, ServeConfig())
    assert off.state.continuous is None and seq2seq.state.continuous is None
    for app in (off, seq2seq):
        app.state.batcher.close()


def configured(rag, **config) -> None:
    """Build the app (which sets the generator up) and stop its workers again."""
    app = create_app(rag, None, ServeConfig(**config))
    app.state.batcher.close()
    app.state.continuous.close()


def test_the_passage_cache_setting_reaches_the_generator(root):
    rag = causal_rag(root)
    assert rag.generator.passage_cache is None
    configured(rag)  # the server's default: 1 GiB
    assert rag.generator.passage_cache.max_bytes == 1024 * 2**20
    configured(rag, passage_cache_mb=2)
    assert rag.generator.passage_cache.max_bytes == 2 * 2**20
    configured(rag, passage_cache_mb=None)  # None: as it is
    assert rag.generator.passage_cache.max_bytes == 2 * 2**20
    configured(rag, passage_cache_mb=0)
    assert rag.generator.passage_cache is None
    for bad in (-1, float("inf"), float("nan")):  # refused, not overflowed into int()
        with pytest.raises(MarginError, match="passage-cache-mb"):
            configured(rag, passage_cache_mb=bad)
