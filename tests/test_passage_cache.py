"""The passage KV cache (margin.generation.passage_cache) gives the uncached prompts' results.

A warm cache hands back the KV the cold one computed and used, so their logits are bit-identical
(torch.equal). Against the uncached encode, which runs passage and question in one batched
forward, the same matmuls run in other shapes: the logits agree to float rounding (atol 1e-5 on
logits of order 1) and the decoded tokens are the same.
"""

from __future__ import annotations

import pytest
import torch

from helpers import PREAMBLE, tiny_llama
from margin.generation.causal import CausalFormat, CausalGenerator
from margin.generation.decoding import DecodeConfig, decode
from margin.generation.passage_cache import PassageCache, is_passage, kv_bytes, weights_stamp
from margin.retrieval.passages import Passage


def newline_prompt(tokenizer, question, passage):
    """PREAMBLE, the passage, then the question on its own line (the cache's cut)."""
    context = "" if passage is None else f"context : {passage.text}"
    return f"{PREAMBLE}{context}\nquestion : {question} :"


P = [
    Passage("a", "", "the eiffel tower is in paris"),
    Passage("b", "", "the louvre is an art museum in paris"),
    Passage("c", "", "the seine is a river in france"),
]
Q1, Q2 = "where is the eiffel tower ?", "what is the capital of france ?"


def gen(mb: float = 1.0, **kw) -> CausalGenerator:
    model, tok = tiny_llama()
    return CausalGenerator(model, tok, CausalFormat(newline_prompt, passage_cache_mb=mb, **kw))


@torch.no_grad()
def test_spans_cut_the_prompt_where_its_own_tokens_are():
    g = gen()
    inputs = g.build_inputs([Q1], [P])
    tok = g.tokenizer
    for row, (span, p) in enumerate(zip(inputs.spans, P, strict=True)):
        ids = inputs.input_ids[row][inputs.attention_mask[row].bool()].tolist()
        assert ids[: span.prefix] == tok(PREAMBLE + "context :", add_special_tokens=False)[
            "input_ids"
        ][: span.prefix]
        assert ids[span.prefix : span.head] == tok(p.text)["input_ids"][-len(
            ids[span.prefix : span.head]):]
        assert ids[span.head :] == tok(f"question : {Q1} :", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def test_cold_and_warm_cache_give_bit_identical_logits():
    g = gen()
    cold = g.encode(g.build_inputs([Q1], [P])).prompt
    # each distinct block is looked up once: the prefix and the 3 passages, all missing
    assert (g.passage_cache.misses, g.passage_cache.hits) == (4, 0)
    warm = g.encode(g.build_inputs([Q1], [P])).prompt
    assert (g.passage_cache.misses, g.passage_cache.hits) == (4, 4)
    # the warm cache hands back the bits the cold one computed and used
    assert torch.equal(cold.next_logits, warm.next_logits)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(cold.layers, warm.layers, strict=True))
    # a new question over the same passages: all from the cache; a fresh cache computes them in
    # another batch (another order), so the two agree to float rounding
    again = g.encode(g.build_inputs([Q2], [P[::-1]])).prompt
    assert (g.passage_cache.misses, g.passage_cache.hits) == (4, 8)
    fresh = gen()
    alone = fresh.encode(fresh.build_inputs([Q2], [P[::-1]])).prompt
    assert fresh.passage_cache.misses == 4
    torch.testing.assert_close(again.next_logits, alone.next_logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_missed_passages_run_once_each_in_one_batched_forward(monkeypatch):
    """Two questions over the same 3 passages: the prefix runs alone, the 3 passages together
    (not 6 rows, not one forward each), then the 6 rows' questions; warm, only the questions."""
    g = gen(suffix_padding=10.0)  # any padding allowed: one forward per stage
    forward, runs = g.model.forward, []

    def spy(*args, **kw):
        runs.append(tuple(kw["input_ids"].shape))
        return forward(*args, **kw)

    monkeypatch.setattr(g.model, "forward", spy)
    inputs = g.build_inputs([Q1, Q2], [P, P[::-1]])
    spans = inputs.spans
    longest = max(s.head - s.prefix for s in spans)
    cold = g.encode(inputs).prompt
    assert [rows for rows, _ in runs] == [1, 3, 6]
    assert runs[0][1] == spans[0].prefix and runs[1][1] == longest
    assert (g.passage_cache.misses, g.passage_cache.hits, len(g.passage_cache)) == (4, 0, 4)
    runs.clear()
    warm = g.encode(inputs).prompt
    assert [rows for rows, _ in runs] == [6]
    assert torch.equal(cold.next_logits, warm.next_logits)
    plain = gen(mb=0, suffix_padding=10.0)
    want = plain.encode(plain.build_inputs([Q1, Q2], [P, P[::-1]])).prompt.next_logits
    torch.testing.assert_close(cold.next_logits, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_cache_too_small_for_the_batch_still_gives_its_prompts():
    """Blocks the bound evicts (or never keeps) are still used for the batch that ran them."""
    small = gen(mb=0.0005)  # 524 bytes: not even one block fits
    plain = gen(mb=0)
    qs, ps = [Q1, Q2], [P, P[1:] + P[:1]]
    got = small.encode(small.build_inputs(qs, ps)).prompt
    want = plain.encode(plain.build_inputs(qs, ps)).prompt
    assert len(small.passage_cache) == 0 and small.passage_cache.misses == 4
    torch.testing.assert_close(got.next_logits, want.next_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.lengths, want.lengths)


@torch.no_grad()
def test_cached_prompts_score_and_decode_as_uncached():
    cached, plain = gen(), gen(mb=0)
    assert plain.passage_cache is None
    qs, ps = [Q1, Q2], [P, P[1:] + P[:1]]
    cin, pin = cached.build_inputs(qs, ps), plain.build_inputs(qs, ps)
    assert pin.spans is None and torch.equal(cin.input_ids, pin.input_ids)
    cold = cached.encode(cin).prompt  # the cache filled, then the warm path
    a, b = cached.encode(cin).prompt, plain.encode(pin).prompt
    assert torch.equal(cold.next_logits, a.next_logits)
    torch.testing.assert_close(a.next_logits, b.next_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.last_tokens, b.last_tokens)
    target, tmask = cached.build_targets(["paris", "france"])
    torch.testing.assert_close(
        cached.token_logprobs(cin, target, tmask), plain.token_logprobs(pin, target, tmask),
        atol=1e-5, rtol=1e-5,
    )
    scores = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.1, 0.3]])
    for method, beams in (("token", 1), ("token", 3), ("thorough", 2)):
        cfg = DecodeConfig(num_beams=beams, max_new_tokens=6)
        got = [d.best.token_ids for d in decode(cached, cin, scores, cfg, method)]
        want = [d.best.token_ids for d in decode(plain, pin, scores, cfg, method)]
        assert got == want, (method, beams)


@torch.no_grad()
def test_rows_with_different_prefixes_cache_each_their_own():
    """A prompt that names its question before the passage: each question has its own prefix,
    and a passage is cached once per prefix it follows."""

    def asks_first(tokenizer, question, passage):
        context = "" if passage is None else f"context : {passage.text}"
        return f"{PREAMBLE}{question} {context}\nquestion : {question} :"

    model, tok = tiny_llama()
    cached = CausalGenerator(model, tok, CausalFormat(asks_first, passage_cache_mb=1))
    plain = CausalGenerator(model, tok, CausalFormat(asks_first))
    qs, ps = [Q1, Q2], [P, P[::-1]]
    cin = cached.build_inputs(qs, ps)
    assert len({s.prefix for s in cin.spans}) == 2  # the two questions differ in length
    got = cached.encode(cin).prompt
    assert (cached.passage_cache.misses, len(cached.passage_cache)) == (2 + 6, 8)
    want = plain.encode(plain.build_inputs(qs, ps)).prompt
    torch.testing.assert_close(got.next_logits, want.next_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached.encode(cin).prompt.next_logits, got.next_logits)


@torch.no_grad()
def test_a_cut_passage_is_cached_as_cut():
    long = Passage("long", "", " ".join(["the seine is a river in france"] * 8))
    g = gen(max_prompt_length=60)
    inputs = g.build_inputs([Q1], [[long]])
    span = inputs.spans[0]
    assert inputs.attention_mask.sum() == 60  # the passage was cut to fit
    g.encode(inputs)
    keys = [k for k in g.passage_cache._entries if len(k) == 3]
    assert [len(k[2]) for k in keys] == [span.head - span.prefix]  # the cut passage's tokens


@torch.no_grad()
def test_no_cut_no_cache():
    """A prompt with no newline before its question has no safe cut: the uncached path."""
    model, tok = tiny_llama()
    g = CausalGenerator(model, tok, CausalFormat(lambda t, q, p: f"{PREAMBLE}{p.text} {q} :",
                                                 passage_cache_mb=16))
    inputs = g.build_inputs([Q1], [P])
    assert inputs.spans == [None, None, None]
    g.encode(inputs)
    assert len(g.passage_cache) == 0
    assert g._head_span(Q1, P[0], [5, 6, 7], {}) is None  # ids that do not start with the head


def test_training_and_new_weights_bypass_or_clear_the_cache():
    g = gen()
    inputs = g.build_inputs([Q1], [P])
    g.encode(inputs)  # autograd on: not cached
    assert len(g.passage_cache) == 0
    with torch.no_grad():
        before = g.encode(inputs).prompt.next_logits
        stamp = weights_stamp(g.model)
        assert len(g.passage_cache) == 4
        w = g.model.model.layers[0].mlp.down_proj.weight
        w.mul_(2.0)  # an in-place update, as an optimizer step
        try:
            assert weights_stamp(g.model) != stamp
            after = g.encode(inputs).prompt.next_logits
            plain = gen(mb=0).encode(gen(mb=0).build_inputs([Q1], [P])).prompt.next_logits
            assert not torch.equal(before, after)
            torch.testing.assert_close(after, plain, atol=1e-5, rtol=1e-5)
            assert g.passage_cache.misses == 4 + 4  # cleared: all run again on the new weights
            assert len(g.passage_cache) == 4
        finally:
            w.div_(2.0)


def test_lru_keeps_the_recent_entries_within_the_bound():
    one = [(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8))]  # 256 bytes
    cache = PassageCache(max_bytes=600)
    for key in ("a", "b"):
        cache.put((key,), one)
    assert cache.get(("a",)) is not None  # "a" is now the most recent
    cache.put(("c",), one)
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None
    assert cache.bytes == 512 <= cache.max_bytes and len(cache) == 2
    cache.put(("big",), [(torch.zeros(1, 1, 40, 8), torch.zeros(1, 1, 40, 8))])
    assert cache.get(("big",)) is None and len(cache) == 2  # alone over the bound: not kept


@torch.no_grad()
def test_evicting_the_passages_keeps_the_template_prefix():
    g = gen()
    g.encode(g.build_inputs([Q1], [P]))
    cache = g.passage_cache
    prefix_bytes = sum(kv_bytes(kv) for key, kv in cache._entries.items() if not is_passage(key))
    assert cache.evict(is_passage) == 3
    assert len(cache) == 1 and cache.bytes == prefix_bytes > 0
    g.encode(g.build_inputs([Q1], [P]))
    assert (cache.misses, cache.hits) == (4 + 3, 1)  # the passages ran again, the prefix did not


@pytest.mark.parametrize("mb", [0, 0.0])
def test_zero_megabytes_turns_the_cache_off(mb):
    assert gen(mb=mb).passage_cache is None


@pytest.mark.parametrize(("argv", "size"), [([], None), (["--passage-cache-mb", "1.5"], 1572864),
                                            (["--passage-cache-mb", "0"], 0)])
def test_ask_flag_sizes_the_generators_cache(argv, size, monkeypatch):
    from margin.cli import main
    from margin.rag import RAG

    seen = []

    class Model:
        class generator:  # noqa: N801 - stands in for a CausalGenerator
            set_passage_cache = staticmethod(seen.append)

        def ask(self, questions, **kw):
            return []

    monkeypatch.setattr(RAG, "load", classmethod(lambda cls, **kw: Model()))
    assert main(["ask", *argv, "paris"]) == 0
    assert seen == ([] if size is None else [size])
    assert main(["ask", "--passage-cache-mb", "-1", "paris"]) != 0 and len(seen) <= 1


def test_the_cache_is_off_unless_asked_for():
    """Off by default in the library (a one-shot process rarely sees a passage twice, and the
    memory is the caller's to give); `margin serve` turns it on (tests/test_server.py)."""
    model, tok = tiny_llama()
    assert CausalGenerator(model, tok, CausalFormat(newline_prompt)).passage_cache is None
