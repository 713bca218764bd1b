"""The shared prompt prefix's KV, kept between calls (``CausalGenerator.prefix_cache``).

The tiny random Llama of tests/helpers.py with a few-shot-like preamble, so every row of every
question starts with the same tokens. A kept prefix is the same forward on the same ids and
weights, so everything downstream is bit-identical to a generator that runs it every time
(``prefix_cache = None``): logits with ``torch.equal``, answers and log-probabilities with ``==``.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import PREAMBLE, QuestionKeywords, preamble_prompt, tiny_llama
from margin.generation.causal import CausalFormat, CausalGenerator
from margin.generation.decoding import DecodeConfig, decode
from margin.generation.kv_cache import common_prefix_length, unpadded_rows
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever

KEYWORDS = ("paris", "tower", "river", "museum", "france", "capital", "seine", "louvre")
DOCS = [  # each begins with its own word: the rows of any question share the preamble only
    Passage("a", "", "eiffel tower is in paris"),
    Passage("b", "", "louvre is an art museum in paris"),
    Passage("c", "", "the seine is a river in france"),
    Passage("d", "", "paris is the capital of france"),
    Passage("e", "", "seine is in paris"),
]
QUESTIONS = ["where is the eiffel tower ?", "what is the capital of france ?",
             "what is the louvre ?", "where is the seine river ?"]
ASKS = [("token", "greedy"), ("token", "beam"), ("sequence", "thorough"), ("sequence", "fast")]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-cache") / "index"
    build_index(DOCS, QuestionKeywords(KEYWORDS), root, kind="flat", progress=False)
    return root


def generator(model=None, cached: bool = True, prompt_fn=preamble_prompt) -> CausalGenerator:
    tiny, tok = tiny_llama()
    g = CausalGenerator(model or tiny, tok, CausalFormat(prompt_fn))
    if not cached:
        g.prefix_cache = None
    return g


def rag_over(index, gen: CausalGenerator) -> RAG:
    retriever = Retriever(open_index(index), QuestionKeywords(KEYWORDS))
    return RAG(gen, retriever, doc_score_scale=5.0, default_k=3,
               default_decode=DecodeConfig(max_new_tokens=5, num_beams=2))


class PrefixRuns:
    """The model's forwards over no cached position at batch 1 (the shared prefix's runs; k > 1
    rows run their suffixes on top of it), by length."""

    def __init__(self, model: torch.nn.Module):
        self.lengths: list[int] = []
        self._hook = model.register_forward_pre_hook(self._seen, with_kwargs=True)
        self._lock = threading.Lock()

    def _seen(self, _module, _args, kwargs) -> None:
        ids = kwargs["input_ids"]  # (batch, positions)
        if ids.shape[0] == 1 and kwargs["cache"].get_seq_length() == 0:
            with self._lock:
                self.lengths.append(ids.shape[1])

    def remove(self) -> None:
        self._hook.remove()


def shared_length(gen: CausalGenerator, questions, passages) -> int:
    inputs = gen.build_inputs(questions, passages)
    return common_prefix_length(unpadded_rows(inputs.input_ids, inputs.attention_mask))


@torch.no_grad()
def test_kept_prefix_gives_bit_identical_prompts_and_is_never_written():
    kept, plain = generator(), generator(cached=False)
    ps = [DOCS[:3], DOCS[2:]]
    for call in range(3):
        inputs = kept.build_inputs(QUESTIONS[:2], ps if call % 2 else ps[::-1])
        got, want = kept.encode(inputs).prompt, plain.encode(inputs).prompt
        assert torch.equal(got.next_logits, want.next_logits)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(got.layers, want.layers, strict=True))
    assert len(kept.prefix_cache) == 1 and kept.prefix_cache.hits == 2
    [(key, kv)] = kept.prefix_cache._entries.items()
    before = [(k.clone(), v.clone()) for k, v in kv]
    scores = torch.zeros(2, 3)
    for method in ("token", "thorough", "fast"):  # each grows copies of the rows it reads
        got = decode(kept, inputs, scores, DecodeConfig(max_new_tokens=4, num_beams=2), method)
        want = decode(plain, inputs, scores, DecodeConfig(max_new_tokens=4, num_beams=2), method)
        assert got == want
    assert kept.prefix_cache.hits == 2 + 3
    assert all(torch.equal(k, k0) and torch.equal(v, v0)
               for (k, v), (k0, v0) in zip(kv, before, strict=True))
    assert len(key) == shared_length(kept, QUESTIONS[:2], ps)


@pytest.mark.parametrize(("mode", "decoding"), ASKS)
def test_ask_gives_the_same_answers_and_logprobs_with_and_without_the_cache(index, mode, decoding):
    kept, plain = rag_over(index, generator()), rag_over(index, generator(cached=False))
    for questions in (QUESTIONS[:1], QUESTIONS[1:3], QUESTIONS, QUESTIONS[:1]):
        got = kept.ask(questions, mode=mode, decoding=decoding)
        want = plain.ask(questions, mode=mode, decoding=decoding)
        assert got == want  # answer text, marginal log-prob, provenance, n-best: all exact
    assert len(kept.generator.prefix_cache) == 1 and kept.generator.prefix_cache.hits == 3


def test_the_prefix_runs_once_across_asks(index):
    gen = generator()
    rag = rag_over(index, gen)
    runs = PrefixRuns(gen.model)
    try:
        for q in QUESTIONS:
            rag.ask([q], decoding="greedy")
    finally:
        runs.remove()
    P = len(next(iter(gen.prefix_cache._entries)))
    assert P >= len(PREAMBLE.split())
    assert runs.lengths == [P]  # once, at the first ask; every later ask read it
    plain = generator(cached=False)
    runs = PrefixRuns(plain.model)
    try:
        for q in QUESTIONS:
            rag_over(index, plain).ask([q], decoding="greedy")
    finally:
        runs.remove()
    assert runs.lengths == [P] * len(QUESTIONS)  # without the cache: once per ask


def test_a_training_step_makes_the_next_ask_run_the_prefix_on_the_new_weights(index):
    model = copy.deepcopy(tiny_llama()[0])  # trained below: not the shared test model
    gen = generator(model)
    rag = rag_over(index, gen)
    questions, answers = QUESTIONS[:2], ["paris", "france"]
    before = rag.ask(questions)
    assert len(gen.prefix_cache) == 1
    model.train()
    loss = rag.loss(questions, answers)  # autograd on, train mode: the cache is emptied
    assert len(gen.prefix_cache) == 0
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    model.eval()
    with torch.no_grad():  # a filled cache, then an optimizer step under no_grad
        rag.ask(questions)
        assert len(gen.prefix_cache) == 1
        torch.optim.SGD(model.parameters(), lr=1.0).step()  # the same gradient again
    runs = PrefixRuns(model)
    try:
        after = rag.ask(questions)
    finally:
        runs.remove()
    assert len(runs.lengths) == 1  # the new weights' prefix was run, not read
    fresh = rag_over(index, generator(copy.deepcopy(model), cached=False)).ask(questions)
    assert after == fresh and after != before


@torch.no_grad()
def test_a_model_in_train_mode_never_reads_or_fills_the_cache():
    model = copy.deepcopy(tiny_llama()[0])
    gen = generator(model)
    inputs = gen.build_inputs(QUESTIONS[:1], [DOCS[:2]])
    gen.encode(inputs)
    assert len(gen.prefix_cache) == 1
    model.train()
    gen.encode(inputs)
    assert len(gen.prefix_cache) == 0 and gen.prefix_cache.hits == 0


def edited_prompt(tokenizer, question, passage):
    return "the seine is a river in paris . " + preamble_prompt(tokenizer, question, passage)


@torch.no_grad()
def test_another_template_or_prefix_gets_its_own_entry():
    gen = generator()
    ps = [DOCS[:3]]
    first = gen.encode(gen.build_inputs(QUESTIONS[:1], ps)).prompt
    gen.fmt = CausalFormat(edited_prompt)  # the template edited on the same generator
    edited = gen.encode(gen.build_inputs(QUESTIONS[:1], ps)).prompt
    assert len(gen.prefix_cache) == 2 and gen.prefix_cache.hits == 0
    plain = generator(cached=False, prompt_fn=edited_prompt)
    assert torch.equal(edited.next_logits, plain.encode(plain.build_inputs(QUESTIONS[:1],
                                                                           ps)).prompt.next_logits)
    assert not torch.equal(first.next_logits, edited.next_logits)
    # rows whose passages share their first words: a longer common prefix, its own entry
    same_start = [[DOCS[2], Passage("f", "", "the seine is in paris")]]
    longer = shared_length(gen, QUESTIONS[:1], same_start)
    assert longer > shared_length(gen, QUESTIONS[:1], ps)
    gen.encode(gen.build_inputs(QUESTIONS[:1], same_start))
    assert len(gen.prefix_cache) == 3 and longer in {len(k) for k in gen.prefix_cache._entries}


def test_two_threads_asking_at_once_get_the_answers_of_one_alone(index):
    gen = generator()
    rag = rag_over(index, gen)
    want = {q: rag_over(index, generator(cached=False)).ask([q]) for q in QUESTIONS}
    runs = PrefixRuns(gen.model)
    start = threading.Barrier(2)

    def ask(questions):
        start.wait()
        return [(q, rag.ask([q])) for q in questions for _ in range(2)]

    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(ask, [QUESTIONS[:2], QUESTIONS[2:]]))
    finally:
        runs.remove()
    for q, got in (pair for result in results for pair in result):
        assert got == want[q]
    assert len(runs.lengths) == 1  # the second thread waited for the first one's fill


@torch.no_grad()
def test_the_passage_cache_holds_the_prefix_when_it_is_on():
    """With the passage cache the prompts go through it (its own prefix entry); the prefix
    cache is for the path without it."""
    def newline_prompt(tokenizer, question, passage):
        return f"{PREAMBLE}context : {passage.text}\nquestion : {question} :"

    model, tok = tiny_llama()
    gen = CausalGenerator(model, tok, CausalFormat(newline_prompt, passage_cache_mb=1.0))
    inputs = gen.build_inputs(QUESTIONS[:1], [DOCS[:3]])
    gen.encode(inputs)
    assert len(gen.passage_cache) == 4 and len(gen.prefix_cache) == 0
