"""The work causal RAG decoding does, counted in token positions, and its outputs unchanged.

Speed on a shared machine is noisy (benchmarks/causal_decoding.py times it); what the speed comes
from is countable: how many positions go through the transformer layers and how many through the
output layer (vocabulary-sized logits). The fast tests count both on the tiny Llama; the slow test
checks on the real default model that the fast path decodes exactly like the plain one and like
``model.generate``.
"""

from __future__ import annotations

import pytest
import torch

from helpers import PASSAGES, QUESTIONS, causal
from margin.generation.causal import CausalFormat, CausalGenerator
from margin.generation.decoding import DecodeConfig, decode, decode_rag_sequence
from margin.generation.kv_cache import common_prefix_length, unpadded_rows
from margin.retrieval.passages import Passage

SCORES = torch.tensor([[0.3, -0.1], [0.0, 0.4]])


class Counter:
    """Positions seen by the input embedding (every layer runs them) and by the output layer."""

    def __init__(self, model: torch.nn.Module):
        self.layers = self.logits = 0
        self._hooks = [
            model.get_input_embeddings().register_forward_hook(self._count_layers),
            model.get_output_embeddings().register_forward_hook(self._count_logits),
        ]

    def _count_layers(self, _module, args, _out) -> None:
        self.layers += args[0].numel()  # (batch, positions) token ids

    def _count_logits(self, _module, args, _out) -> None:
        self.logits += args[0].shape[0] * args[0].shape[1]  # (batch, positions, d)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@torch.no_grad()
def test_prefill_runs_the_shared_prefix_once_and_predicts_only_the_last_position():
    gen = causal(suffix_padding=10.0)  # one suffix group: the count is worked out below
    inputs = gen.build_inputs(QUESTIONS, PASSAGES)
    R, S = inputs.input_ids.shape
    P = common_prefix_length(unpadded_rows(inputs.input_ids, inputs.attention_mask))
    assert P > 10
    count = Counter(gen.model)
    try:
        gen.encode(inputs)
    finally:
        count.remove()
    assert count.layers == P + R * (S - P)  # the plain left-padded batch runs R * S
    assert count.logits == 1 + R  # the prefix run's last position (unused), then one per row


@pytest.mark.parametrize("method", ["token", "thorough"])
@torch.no_grad()
def test_decoding_never_reruns_a_prompt(method):
    """After the prefill, every forward is generated or target tokens: no prompt position again."""
    gen = causal()
    inputs = gen.build_inputs(QUESTIONS, PASSAGES)
    R, S = inputs.input_ids.shape
    enc_count = Counter(gen.model)
    try:
        gen.encode(inputs)
    finally:
        enc_count.remove()
    count = Counter(gen.model)
    cfg = DecodeConfig(num_beams=2, max_new_tokens=5, num_return_sequences=2)
    try:
        out = decode(gen, inputs, SCORES, cfg, method)
    finally:
        count.remove()
    assert all(d.nbest for d in out)
    decode_positions = count.layers - enc_count.layers  # beyond the one prefill
    # the search runs at most (max_new_tokens - 1) steps of R * beams rows; the final scoring
    # pass reads at most max_new_tokens - 1 target tokens for each (hypothesis, passage) pair
    search = (cfg.max_new_tokens - 1) * R * cfg.num_beams
    pairs = 2 * cfg.num_beams * 2 * 2  # thorough: up to B * (k * beams) hypotheses x k passages
    assert 0 < decode_positions <= search + pairs * (cfg.max_new_tokens - 1)
    assert decode_positions < R * S  # less than one plain prefill of the prompts


@pytest.mark.slow
@torch.no_grad()
def test_default_model_fast_path_decodes_like_plain_generate():
    """SmolLM2-135M-Instruct with the few-shot prompt: the shared-prefix cache changes no token
    and no score (1e-4), and each passage's greedy search is ``model.generate``'s."""
    from margin.generation.default_generator import default_generator_dir
    from margin.model_config import ModelConfig
    from margin.models import make_generator

    fast = make_generator(default_generator_dir(progress=False), "causal", ModelConfig())
    assert isinstance(fast, CausalGenerator)
    unshared = CausalFormat(fast.fmt.prompt_fn, share_prefix=False)
    plain = CausalGenerator(fast.model, fast.tokenizer, unshared)
    plain.eos_token_ids = fast.eos_token_ids
    questions = ["What is the capital of Australia?", "Who painted the Mona Lisa?"]
    passages = [
        [
            Passage("a1", "Australia", "The capital of Australia is Canberra."),
            Passage("a2", "Sydney", "Sydney is the largest city in Australia."),
        ],
        [
            Passage("m1", "Mona Lisa", "The Mona Lisa is a portrait painted by Leonardo da Vinci."),
            Passage("m2", "Louvre", "The Louvre in Paris holds the Mona Lisa."),
        ],
    ]
    inputs = fast.build_inputs(questions, passages)
    assert common_prefix_length(unpadded_rows(inputs.input_ids, inputs.attention_mask)) > 100
    cfg = DecodeConfig(num_beams=1, max_new_tokens=12)
    for method in ("token", "thorough"):
        a = decode(fast, inputs, SCORES, cfg, method)
        b = decode(plain, inputs, SCORES, cfg, method)
        for da, db in zip(a, b, strict=True):
            assert da.best.token_ids == db.best.token_ids, method
            assert da.best.logprob == pytest.approx(db.best.logprob, abs=1e-4)
            assert da.best.doc_posterior == pytest.approx(db.best.doc_posterior, abs=1e-4)
    assert "Canberra" in a[0].best.text
    ref = fast.model.generate(
        inputs.input_ids,
        attention_mask=inputs.attention_mask,
        do_sample=False,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=list(fast.eos_token_ids),
        pad_token_id=fast.pad_token_id,
    )[:, inputs.input_ids.shape[1] :]
    seq = decode_rag_sequence(fast, inputs, torch.zeros(2, 2), cfg)  # equal priors
    for b, d in enumerate(seq):
        gens = set()
        for row in ref[2 * b : 2 * b + 2].tolist():
            ends = [i for i, t in enumerate(row) if t in fast.eos_token_ids]
            gens.add(tuple(row[: ends[0] + 1] if ends else row))
        assert d.best.token_ids in gens
