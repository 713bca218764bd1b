"""The generator interface: transformers' RAG inputs, batched scoring, KV-cached steps.

The tiny random models of tests/helpers.py: a 2-layer BART with a byte-level BPE tokenizer
written to a tmp dir, and a 2-layer Llama with a word-level tokenizer that carries a chat template.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import RagConfig, RagRetriever

from helpers import (
    PASSAGES,
    QUESTIONS,
    bare_prompt,
    causal,
    preamble_prompt,
    tiny_bart,
    tiny_llama,
)
from margin.errors import MarginError
from margin.generation.causal import CausalFormat, CausalGenerator, default_prompt
from margin.generation.generator import GenInputs
from margin.generation.kv_cache import (
    common_prefix_length,
    length_groups,
    prefix_layout,
    unpadded_rows,
)
from margin.generation.seq2seq import Seq2SeqFormat, Seq2SeqGenerator, rag_context_string
from margin.retrieval.passages import Passage

# -- inputs ------------------------------------------------------------------------------------


def test_context_string_matches_transformers_postprocess_docs():
    model, tok = tiny_bart()
    rag_cfg = RagConfig(generator=model.config.to_dict(), max_combined_length=48)
    retriever = RagRetriever.__new__(RagRetriever)  # postprocess_docs needs no index
    retriever.config, retriever.generator_tokenizer = rag_cfg, tok
    docs = [{"title": [p.title for p in ps], "text": [p.text for p in ps]} for ps in PASSAGES]
    ref_ids, ref_mask = retriever.postprocess_docs(docs, QUESTIONS, "", 2, return_tensors="pt")
    gen = Seq2SeqGenerator(
        model, tok, Seq2SeqFormat(max_combined_length=48, pad_to_max_length=True)
    )
    ours = gen.build_inputs(QUESTIONS, PASSAGES)
    assert ours.n_docs == 2 and ours.batch_size == 2
    assert torch.equal(ours.input_ids, ref_ids) and torch.equal(ours.attention_mask, ref_mask)
    # the quirks by hand: one pair of quotes stripped from the title, double spaces collapsed
    text = rag_context_string(QUESTIONS[0], PASSAGES[0][1], Seq2SeqFormat(prefix="x: "))
    assert text == "x: Paris / the capital. // where is the tower?"
    assert rag_context_string("q", PASSAGES[0][0], Seq2SeqFormat()).startswith("Eiffel Tower / ")


def test_closed_book_and_bad_passage_lists(bart):
    inputs = bart.build_inputs(QUESTIONS, None)
    assert inputs.n_docs == 1 and inputs.input_ids.shape[0] == 2
    with pytest.raises(MarginError, match="same number k"):
        bart.build_inputs(QUESTIONS, [PASSAGES[0], PASSAGES[1][:1]])
    with pytest.raises(MarginError, match="passage lists"):
        bart.build_inputs(QUESTIONS, PASSAGES[:1])
    with pytest.raises(MarginError, match="multiple of n_docs"):
        GenInputs.from_ids(inputs.input_ids[:1].repeat(3, 1), inputs.attention_mask[:1], 2)


def test_default_prompt_uses_chat_template_else_plain_text():
    _, tok = tiny_llama()
    chat = default_prompt(tok, "where is the tower ?", PASSAGES[0][0])
    assert chat.startswith("<|user|> Context:") and chat.endswith("<|assistant|> ")
    assert "a tower in paris." in chat
    plain = default_prompt(object(), "q?", None)
    assert plain == "Question: q?\nAnswer:"


# -- prompts that fit the generator: the passage is cut, never the question -------------------

LONG = Passage("long", "Paris", "a tower in paris and a river in france . " * 40)  # ~1700 chars


def test_seq2seq_long_passage_is_cut_to_fit_and_the_question_kept():
    model, tok = tiny_bart()
    gen = Seq2SeqGenerator(model, tok, Seq2SeqFormat(max_combined_length=40))
    inputs = gen.build_inputs(QUESTIONS, [[LONG], [PASSAGES[1][1]]])
    ids = inputs.input_ids[0][inputs.attention_mask[0].bool()].tolist()
    assert len(ids) <= 40 and inputs.input_ids.shape[1] <= 40
    # the template (title, separators) and the question's tokens, intact at the row's end
    tail = tok(" // " + QUESTIONS[0])["input_ids"][1:]  # without <s>: ends with </s>
    assert ids[-len(tail) :] == tail
    head = tok("Paris / a tower in paris")["input_ids"][:-1]  # <s> and the passage's start
    assert ids[: len(head)] == head
    # the short passage's row is exactly what it was: transformers' tokenisation, uncut
    short = tok([rag_context_string(QUESTIONS[1], PASSAGES[1][1], gen.fmt)])["input_ids"][0]
    assert inputs.input_ids[1][inputs.attention_mask[1].bool()].tolist() == short


def test_seq2seq_short_passages_give_the_same_inputs_and_logits_as_before(bart):
    """Fitting touches only rows over the limit: ids (so logits) are transformers' exactly."""
    inputs = bart.build_inputs(QUESTIONS, PASSAGES)
    texts = [
        rag_context_string(q, p, bart.fmt)
        for q, ps in zip(QUESTIONS, PASSAGES, strict=True)
        for p in ps
    ]
    ref = bart.tokenizer(texts, max_length=64, padding="longest", truncation=True)
    ref_ids, ref_mask = torch.tensor(ref["input_ids"]), torch.tensor(ref["attention_mask"])
    assert torch.equal(inputs.input_ids, ref_ids) and torch.equal(inputs.attention_mask, ref_mask)
    target, tmask = bart.build_targets(["paris", "a river"])
    with torch.no_grad():
        ours = bart.token_logprobs(inputs, target, tmask)
        plain = bart.token_logprobs(GenInputs(ref_ids, ref_mask, 2), target, tmask)
    assert torch.equal(ours, plain)


def test_causal_long_passage_is_cut_to_fit_and_the_question_kept():
    model, tok = tiny_llama()
    gen = CausalGenerator(model, tok, CausalFormat(max_prompt_length=40))
    question = "where is the tower ?"
    inputs = gen.build_inputs([question, question], [[LONG], [PASSAGES[0][0]]])  # was: an error
    rows = unpadded_rows(inputs.input_ids, inputs.attention_mask)
    assert len(rows[0]) <= 40
    tail = tok(f"Question: {question} </s> <|assistant|>", add_special_tokens=False)["input_ids"]
    assert rows[0][-len(tail) :].tolist() == tail  # the question and the template, intact
    head = tok("<|user|> Context: Paris a tower in paris", add_special_tokens=False)["input_ids"]
    assert rows[0][: len(head)].tolist() == head  # the passage's start is what is kept
    # the short passage's row is exactly the prompt as it was, uncut
    short = default_prompt(tok, question, PASSAGES[0][0])
    assert rows[1].tolist() == tok(short, add_special_tokens=False)["input_ids"]


def test_causal_short_passages_give_the_same_logits_as_with_room_to_spare():
    model, tok = tiny_llama()
    questions = ["where is the tower ?", "what is the seine ?"]
    roomy_gen = CausalGenerator(model, tok)
    tight = CausalGenerator(model, tok, CausalFormat(max_prompt_length=40))
    short = tight.build_inputs(questions, PASSAGES)
    assert int(short.attention_mask.sum(-1).max()) <= 40  # every prompt fits: nothing is cut
    roomy = roomy_gen.build_inputs(questions, PASSAGES)
    assert torch.equal(short.input_ids, roomy.input_ids)
    target, tmask = tight.build_targets(["paris", "a river"])
    with torch.no_grad():
        ours = tight.token_logprobs(short, target, tmask)
        assert torch.equal(ours, roomy_gen.token_logprobs(roomy, target, tmask))


def test_causal_question_too_long_for_any_passage_is_one_line():
    model, tok = tiny_llama()
    gen = CausalGenerator(model, tok, CausalFormat(max_prompt_length=12))
    with pytest.raises(MarginError, match=r"the question and the prompt template alone are \d+ "
                       r"tokens, over max_prompt_length=12; shorten the question") as err:
        gen.build_inputs(["where is the tower in paris in france ?"], [[LONG]])
    assert "\n" not in str(err.value)


# -- scoring -----------------------------------------------------------------------------------


def _manual_seq2seq(model, ids, mask, target, tmask, start):
    """log p(y_i|x,z,y_<i) for one unpadded row, the plain way."""
    n = int(mask.sum())
    dec = torch.cat([torch.tensor([start]), target[:-1]])[None]
    logits = model(input_ids=ids[None, :n], decoder_input_ids=dec).logits[0]
    lp = F.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]
    return lp * tmask


@torch.no_grad()
def test_seq2seq_token_logprobs_equal_per_row_forward(bart):
    inputs = bart.build_inputs(QUESTIONS, PASSAGES)
    target, tmask = bart.build_targets(["paris", "a river"])
    assert target[0, 0] == bart.tokenizer.bos_token_id and tmask[0].sum() < tmask.shape[1]
    got = bart.token_logprobs(inputs, target, tmask)  # (B, k, T)
    assert got.shape == (2, 2, target.shape[1])
    for b in range(2):
        for z in range(2):
            row = b * 2 + z
            want = _manual_seq2seq(
                bart.model, inputs.input_ids[row], inputs.attention_mask[row], target[b],
                tmask[b], bart.decoder_start_token_id,
            )  # fmt: skip
            torch.testing.assert_close(got[b, z], want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[tmask[:, None, :].expand_as(got) == 0] == 0.0)  # padding is exactly 0
    full = bart.vocab_logprobs(inputs, target, tmask)  # (B, k, T, V)
    gathered = full.gather(-1, target[:, None, :, None].expand(-1, 2, -1, 1))[..., 0]
    torch.testing.assert_close(gathered * tmask[:, None], got)


@torch.no_grad()
def test_causal_token_logprobs_equal_per_row_forward(llama):
    inputs = llama.build_inputs(["where is the tower ?", "what is a river ?"], PASSAGES)
    assert (inputs.attention_mask[:, -1] == 1).all()  # LEFT padded
    assert (inputs.attention_mask[:, 0] == 0).any()
    target, tmask = llama.build_targets(["paris", "a river in france"])
    assert target[0, 1] == llama.eos_token_ids[0] and tmask[0].sum() == 2
    got = llama.token_logprobs(inputs, target, tmask)
    for b in range(2):
        for z in range(2):
            row = b * 2 + z
            prompt = inputs.input_ids[row][inputs.attention_mask[row].bool()]
            n = int(tmask[b].sum())
            ids = torch.cat([prompt, target[b, :n]])[None]
            logits = llama.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            want = F.log_softmax(logits, -1).gather(-1, target[b, :n, None])[:, 0]
            torch.testing.assert_close(got[b, z, :n], want, atol=1e-5, rtol=1e-5)
            assert torch.all(got[b, z, n:] == 0.0)


# -- incremental decoding ----------------------------------------------------------------------


def _check_cached_steps(gen, inputs, target, tmask):
    """Feeding the targets step by step through the KV cache reproduces teacher forcing,
    also after a beam reorder that swaps the two copies of every row."""
    enc = gen.encode(inputs)
    R = inputs.input_ids.shape[0]
    full = gen.score(enc, torch.arange(R), target, tmask)  # (R, T)
    state = gen.start(enc, expand=2)  # rows (R, 2)
    swap = torch.arange(2 * R).view(R, 2).flip(1).flatten()
    T = int(tmask.sum(-1).min())
    for t in range(T):
        lp = gen.step(state).view(R, 2, -1)  # (R, 2, V)
        for j in range(2):
            step_lp = lp[:, j].gather(-1, target[:, t, None])[:, 0]
            torch.testing.assert_close(step_lp, full[:, t], atol=1e-5, rtol=1e-5)
        gen.advance(state, target[:, t].repeat_interleave(2), swap)
    assert state.steps == T


@torch.no_grad()
def test_seq2seq_cached_decoding_equals_recomputation(bart):
    inputs = bart.build_inputs(QUESTIONS, PASSAGES)
    target, tmask = bart.build_targets(["a tower in paris", "the river seine"] * 2)
    _check_cached_steps(bart, inputs, target, tmask)


@torch.no_grad()
def test_causal_cached_decoding_equals_recomputation(llama):
    inputs = llama.build_inputs(["where is the tower ?", "what is a river ?"], PASSAGES)
    target, tmask = llama.build_targets(["a tower in paris", "the river seine in france"] * 2)
    _check_cached_steps(llama, inputs, target, tmask)


# -- causal prompt cache and shared prefix -----------------------------------------------------

def test_common_prefix_and_layout_by_hand():
    t = torch.tensor
    rows = [t([1, 2, 3, 4]), t([1, 2, 5]), t([1, 2, 3])]
    assert common_prefix_length(rows) == 2  # [1, 2]; [1, 2, 3] is shorter than row 0's
    ids, mask = prefix_layout(rows, 2, pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 0, 5], [1, 2, 0, 3]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 0, 1]]
    # identical rows keep their last token of their own (it predicts the first answer token)
    assert common_prefix_length([t([7, 8, 9]), t([7, 8, 9])]) == 2
    assert common_prefix_length([t([7]), t([7])]) == 0
    # nothing shared: plain left padding, as build_inputs lays it out
    assert common_prefix_length([t([1, 2]), t([3, 4, 5])]) == 0
    ids, mask = prefix_layout([t([1, 2]), t([3, 4, 5])], 0, pad_token_id=0)
    assert ids.tolist() == [[0, 1, 2], [3, 4, 5]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    got = unpadded_rows(ids, mask)
    assert [r.tolist() for r in got] == [[1, 2], [3, 4, 5]]


def test_length_groups_by_hand():
    # longest first; a row joins while padding to the group's longest adds <= 25% pads:
    # 3 * 100 <= 1.25 * (100 + 90 + 80) but 4 * 100 > 1.25 * (270 + 12)
    lengths = [10, 100, 90, 12, 80, 11]
    assert length_groups(lengths, 0.25) == [[1, 2, 4], [3, 5, 0]]
    assert length_groups(lengths, 10.0) == [[1, 2, 4, 3, 5, 0]]
    assert length_groups(lengths, 0.0) == [[1], [2], [4], [3], [5], [0]]
    assert length_groups([5, 5, 5], 0.0) == [[0, 1, 2]]


def _reference_logprobs(gen, inputs, target, tmask):
    """log p(y_i|x,z,y_<i) (R, T) row by row, unpadded prompt + target in one plain forward."""
    out = torch.zeros(target.shape, dtype=torch.float32)
    for r, prompt in enumerate(unpadded_rows(inputs.input_ids, inputs.attention_mask)):
        n = int(tmask[r].sum())
        logits = gen.model(input_ids=torch.cat([prompt, target[r, :n]])[None]).logits[0]
        logits = logits[len(prompt) - 1 : -1]  # (n, V)
        out[r, :n] = F.log_softmax(logits, -1).gather(-1, target[r, :n, None])[:, 0]
    return out


@pytest.mark.parametrize("prompt_fn", [preamble_prompt, bare_prompt])
@pytest.mark.parametrize("slack", [0.0, 10.0])  # one suffix group per row length, or one group
@torch.no_grad()
def test_causal_prompt_cache_equals_plain_forward(prompt_fn, slack):
    qs = ["where is the tower ?", "what is a river ?"]
    shared, plain = causal(prompt_fn, True, slack), causal(prompt_fn, False, slack)
    inputs = shared.build_inputs(qs, PASSAGES)
    rows = unpadded_rows(inputs.input_ids, inputs.attention_mask)
    n_shared = common_prefix_length(rows)
    assert (n_shared > 10) == (prompt_fn is preamble_prompt)  # the preamble: ~20 tokens
    assert n_shared == 0 or prompt_fn is preamble_prompt
    target, tmask = shared.build_targets(["paris", "a river in france"] * 2)
    want = _reference_logprobs(shared, inputs, target, tmask)  # (4, T)
    R = inputs.input_ids.shape[0]
    for gen in (shared, plain):
        enc = gen.encode(inputs)
        got = gen.score(enc, torch.arange(R), target, tmask)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # rows in any order, repeated: scoring picks cached rows, it never re-runs a prompt
        pick = torch.tensor([3, 0, 0, 2])
        again = gen.score(enc, pick, target[pick], tmask[pick])
        torch.testing.assert_close(again, want[pick], atol=1e-4, rtol=1e-4)
        assert enc.prompt.lengths.tolist() == [len(r) for r in rows]
        assert torch.equal(enc.prompt.last_tokens, torch.stack([r[-1] for r in rows]))


@torch.no_grad()
def test_prefix_runs_once_and_scoring_reads_only_targets():
    gen = causal()
    seen = []  # (batch, tokens) of every forward the embedding layer sees
    hook = gen.model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: seen.append(tuple(args[0].shape))
    )
    try:
        inputs = gen.build_inputs(QUESTIONS, PASSAGES)
        enc = gen.encode(inputs)
        P = common_prefix_length(unpadded_rows(inputs.input_ids, inputs.attention_mask))
        S = inputs.input_ids.shape[1]
        assert seen == [(1, P), (4, S - P)]  # the prefix once, then each row's own suffix
        seen.clear()
        target, tmask = gen.build_targets(["a tower in paris"] * 3)
        gen.score(enc, torch.tensor([0, 1, 3]), target, tmask)
        assert seen == [(3, target.shape[1] - 1)]  # no prompt token is run again
        seen.clear()
        gen.score(enc, torch.tensor([1]), target[:1, :1], tmask[:1, :1])
        assert seen == []  # a one-token target is predicted by the prompt's last position
        short, long = gen.build_targets(["paris", "a tower in paris"])[1].sum(-1).tolist()
        target, tmask = gen.build_targets(["paris", "a tower in paris"])
        gen.score(enc, torch.tensor([0, 1]), target, tmask)
        assert seen == [(1, long - 1), (1, short - 1)]  # each target at its own length
    finally:
        hook.remove()


@torch.no_grad()
def test_decoding_leaves_the_prompt_cache_untouched():
    gen = causal()
    inputs = gen.build_inputs(QUESTIONS, PASSAGES)
    enc = gen.encode(inputs)
    before = [(k.clone(), v.clone()) for k, v in enc.prompt.layers]
    state = gen.start(enc, expand=2)
    R = inputs.input_ids.shape[0]
    swap = torch.arange(2 * R).view(R, 2).flip(1).flatten()
    for _ in range(3):
        tok = gen.step(state).argmax(-1)
        gen.advance(state, tok, swap)
    for (k, v), (k0, v0) in zip(enc.prompt.layers, before, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    # the first step's log-probs come from encode; the next two each append one position
    assert state.cache.get_seq_length() == inputs.input_ids.shape[1] + 2


def test_shared_prefix_gradients_equal_plain_path():
    """Training reads the same cache: gradients through the shared prefix match the plain path."""
    grads = []
    for share, slack in ((True, 0.0), (True, 10.0), (False, 0.25)):
        gen = causal(share_prefix=share, suffix_padding=slack)
        gen.model.zero_grad()
        inputs = gen.build_inputs(QUESTIONS, PASSAGES)
        target, tmask = gen.build_targets(["paris", "a river"])
        gen.token_logprobs(inputs, target, tmask).sum().backward()
        grads.append([p.grad.clone() for p in gen.model.parameters()])
    gen.model.zero_grad()
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradients_through_length_grouped_scoring_equal_plain_forwards():
    """Training on targets of very different lengths: scoring picks prompt rows out of order (one
    group per length), and the gradients still equal those of plain per-row forwards."""
    gen = causal()
    inputs = gen.build_inputs(QUESTIONS, PASSAGES)
    target, tmask = gen.build_targets(["paris", "a long river that runs north through france"])
    tgt, msk = target.repeat_interleave(2, 0), tmask.repeat_interleave(2, 0)
    grads = []
    for scored in (lambda: gen.token_logprobs(inputs, target, tmask),
                   lambda: _reference_logprobs(gen, inputs, tgt, msk)):
        gen.model.zero_grad()
        scored().sum().backward()
        grads.append([p.grad.clone() for p in gen.model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_targets_take_the_template_form_and_the_stop_token():
    model, tok = tiny_llama()
    dot = tok.convert_tokens_to_ids(".")
    fmt = CausalFormat(preamble_prompt, target_fn=lambda _tok, a: f"the {a}", end_token_id=dot)
    target, mask = CausalGenerator(model, tok, fmt).build_targets(["paris", "a river"])
    ids = tok.convert_tokens_to_ids
    assert target[0, :3].tolist() == ids(["the", "paris", "."]) and mask[0].sum() == 3
    assert target[1].tolist() == ids(["the", "a", "river", "."])


@pytest.mark.parametrize("method", ["token", "thorough"])
def test_a_generated_answer_scores_as_it_was_generated(method):
    """Scoring (training, eval) writes an answer as decoding produced it, ending with the stop
    token that ended it ('.', which is not the first EOS id), so the two log-probs agree."""
    from margin.generation.decoding import DecodeConfig, decode
    from margin.marginalize import rag_sequence_logprob, rag_token_logprob

    model, tok = tiny_llama(seed=3)
    dot = tok.convert_tokens_to_ids(".")
    with torch.no_grad():
        model.lm_head.weight[dot] *= 3  # answers end within a few tokens
    gen = CausalGenerator(model, tok, CausalFormat(preamble_prompt, end_token_id=dot))
    gen.eos_token_ids = tuple(sorted({*gen.eos_token_ids, dot}))
    assert gen.eos_token_ids[0] != dot  # the old rule (first EOS) would score another ending
    scores = torch.tensor([[0.3, -0.1], [0.0, 0.2]])
    inputs = gen.build_inputs(QUESTIONS, PASSAGES)
    cfg = DecodeConfig(num_beams=2, max_new_tokens=8)
    best = [d.best for d in decode(gen, inputs, scores, cfg, method)]
    assert all(h.token_ids[-1] == dot for h in best)
    target, mask = gen.build_targets([gen.decode(h.token_ids[:-1]) for h in best])
    for h, row, m in zip(best, target, mask, strict=True):
        assert row[m.bool()].tolist() == list(h.token_ids)
    tok_lp = gen.token_logprobs(inputs, target, mask)  # (B, k, T)
    marginal = rag_token_logprob if method == "token" else rag_sequence_logprob
    scored = marginal(torch.log_softmax(scores, -1), tok_lp, mask)  # (B,)
    assert scored.tolist() == pytest.approx([h.logprob for h in best], abs=1e-4)
