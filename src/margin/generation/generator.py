"""One generator interface over seq2seq (BART, T5) and decoder-only (Llama, SmolLM2) models.

RAG's generator p_theta(y_i | x, z, y_<i) only needs three things from a language model (Sec. 2):
turn each (question, passage) pair into model inputs, score given target tokens under every pair
in one batched forward, and extend hypotheses one token at a time with a KV cache for the paper's
decoding (Sec. 2.5). Both kinds of model sit behind that one surface, so the marginalisation
(margin.marginalize) and the decoding (margin.generation.decoding) never ask which kind they drive.

Rows are question-major: row ``b * k + z`` holds question b with its z-th passage, exactly like
transformers' RAG ``context_input_ids``. Passages and document scores are given by the caller;
nothing here retrieves.

This module is what both kinds share: the rows (:class:`GenInputs`), the work done once per row
(:class:`Encoded`), the decoding state (:class:`DecodeState`), and the :class:`Generator` base,
which scores targets and drives incremental decoding from a kind's few abstract methods. The
kinds are margin.generation.seq2seq (:class:`Seq2SeqGenerator`, the paper's BART, Sec. 2.3) and
margin.generation.causal (:class:`CausalGenerator`, decoder-only); each says how it tokenises
inputs and targets. The KV caches they keep between passes are in margin.generation.kv_cache.

Prompts always fit: a (question, passage) input over the limit (``max_combined_length``,
``max_prompt_length``) has its PASSAGE cut (:func:`fit_passage`: the text's end, then the
title's), never the question or the template, so the answer still reads the whole question. An
input that fits is tokenised exactly as before. transformers' RAG cuts the whole string at the
end instead, dropping the question; a seq2seq input whose question and separators alone are over
the limit still gets that cut, and a causal one is an error (the answer would follow no question).
``Seq2SeqFormat(cut_passage=False)`` keeps transformers' cut (checkpoints from transformers load
with it, so margin reads their inputs token for token as transformers does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from margin.errors import MarginError
from margin.generation.kv_cache import PromptCache, StartCache, is_identity, length_groups
from margin.generation.passage_cache import HeadSpan
from margin.retrieval.passages import Passage

# what a caller of Generator.advance knows of its reordering (see there)
Moves = Literal["any", "within_context", "none"]

SCORE_CHUNK = 2**26  # logits (pairs x tokens x vocabulary) scored at once: 256 MiB of float32
SCORE_SLACK = 0.25  # targets scored together while padding adds at most this share of tokens
TOKEN_CHARS = 32  # no token is this long on average: text past limit x this never fits, so is cut


@dataclass
class GenInputs:
    """Generator inputs for B questions x k passages, flattened question-major to B*k rows."""

    input_ids: torch.Tensor  # (B*k, S) seq2seq: right-padded; causal: left-padded
    attention_mask: torch.Tensor  # (B*k, S) 1 for real tokens
    n_docs: int  # k, passages per question (1 in the closed-book case)
    spans: list[HeadSpan | None] | None = None  # causal: each row's prefix|passage|question split

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0] // self.n_docs

    @classmethod
    def from_ids(
        cls, context_input_ids: torch.Tensor, attention_mask: torch.Tensor, n_docs: int
    ) -> GenInputs:
        """Pre-tokenised rows from the caller, like transformers' ``context_input_ids``."""
        if context_input_ids.shape[0] % n_docs:
            raise MarginError(
                f"context_input_ids has {context_input_ids.shape[0]} rows, not a multiple of "
                f"n_docs={n_docs}; pass k rows per question, question-major"
            )
        return cls(context_input_ids, attention_mask, n_docs)


@dataclass
class Encoded:
    """The per-(question, passage) work done once and reused by scoring and decoding.

    Seq2seq: the encoder's output. Causal: the prompts' KV cache.
    """

    inputs: GenInputs
    hidden: torch.Tensor | None = None  # (B*k, S, d) seq2seq encoder output; None for causal
    prompt: PromptCache | None = None  # causal: every row's prompt, run once; None for seq2seq
    start: StartCache | None = None  # seq2seq: the decoder-start step, run once when first needed


@dataclass
class DecodeState:
    """Incremental decoding state for N = B*k*expand rows (row ``(b*k + z) * expand + j``)."""

    cache: Cache  # the model's own KV cache object, reordered in place for beam search
    last_tokens: torch.Tensor  # (N,) the token the next step reads
    attention_mask: torch.Tensor  # (N, S) seq2seq: encoder mask; causal: mask over prompt+generated
    hidden: torch.Tensor | None = None  # (N, S, d) seq2seq encoder output, one copy per row
    positions: torch.Tensor | None = None  # (N,) causal: position id of last_tokens
    context: torch.Tensor | None = None  # (N,) seq2seq: the context row each row decodes from
    pending: torch.Tensor | None = None  # (N, V) causal: log-probs from the prefill, used once
    steps: int = 0  # tokens generated so far


def fit_passage(passage: Passage, length: Callable[[Passage], int], limit: int) -> Passage | None:
    """``passage`` cut so that ``length(passage) <= limit`` tokens: its text's end first, then
    (if even no text is over) its title's; the passage itself when it fits, None when even an
    empty title and text are over (the question and template alone are too long).

    A binary search over characters, so any tokenizer (fast or slow) and any prompt format work:
    about log2(characters) calls of ``length`` on inputs of about ``limit`` tokens.
    """
    cap = limit * TOKEN_CHARS  # characters past this cannot fit: dropped before tokenising
    if len(passage.text) > cap or len(passage.title) > cap:
        passage = replace(passage, text=passage.text[:cap], title=passage.title[:cap])
    if length(passage) <= limit:
        return passage
    for name in ("text", "title"):
        value = getattr(passage, name)
        if length(replace(passage, **{name: ""})) > limit:  # not enough even without it
            passage = replace(passage, **{name: ""})
            continue
        lo, hi = 0, len(value)  # value[:lo] fits, value[:hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if length(replace(passage, **{name: value[:mid]})) <= limit:
                lo = mid
            else:
                hi = mid
        return replace(passage, **{name: value[:lo]})
    return None


def _eos_ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def _check_passages(questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> int:
    if len(passages) != len(questions):
        raise MarginError(
            f"got {len(questions)} questions but {len(passages)} passage lists; "
            "pass one list of k passages per question"
        )
    counts = {len(p) for p in passages}
    if len(counts) != 1 or 0 in counts:
        raise MarginError(
            f"every question needs the same number k >= 1 of passages, got {sorted(counts)}; "
            "retrieve the same top-k for each question"
        )
    return counts.pop()


class Generator(ABC):
    """p_theta(y_i | x, z, y_<i) for every (question, passage) row, scoring and decoding."""

    model: torch.nn.Module
    tokenizer: object
    eos_token_ids: tuple[int, ...]  # any of these ends a hypothesis
    pad_token_id: int  # fills finished hypotheses; never generated (unless it is also EOS)
    forced_bos_token_id: int | None  # first generated token, forced (BART); not scored
    forced_eos_token_id: int | None  # forced at the last allowed step (BART)

    @abstractmethod
    def build_inputs(
        self, questions: Sequence[str], passages: Sequence[Sequence[Passage]] | None
    ) -> GenInputs:
        """Tokenise B questions x k passages to B*k rows; ``passages=None`` is closed book (k=1)."""

    @abstractmethod
    def build_targets(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target token ids (B, T) and mask (B, T), right-padded."""

    @abstractmethod
    def encode(self, inputs: GenInputs) -> Encoded:
        """The once-per-row context pass, reused by scoring and decoding.

        Seq2seq: the encoder. Causal: the prompt into a KV cache (shared prefix run once).
        """

    @abstractmethod
    def _logits(
        self, enc: Encoded, rows: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits (M, T, V) predicting target_ids (M, T) under context rows (M,).

        The model reads every target token; ``target_mask`` only says which positions are scored
        (right padding cannot influence earlier positions of a decoder).
        """

    @abstractmethod
    def start(self, enc: Encoded, expand: int) -> DecodeState:
        """Begin incremental decoding with every row repeated ``expand`` times (beams)."""

    @abstractmethod
    def _forward_step(self, state: DecodeState) -> torch.Tensor:
        """Logits (N, V) of the next token after ``state.last_tokens``, updating the cache."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    # -- scoring -------------------------------------------------------------------------------

    def score(
        self, enc: Encoded, rows: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        """log p(y_i|x,z,y_<i) (M, T) of targets (M, T) under context rows (M,); 0 where masked.

        Targets of different lengths (Thorough Decoding's hypotheses: a one-word answer beside a
        sentence) are scored in groups of similar length, each cut to its longest target, so a
        long one does not make every row run its length; a target's positions past its end are
        masked and never read by its real ones (the decoder is causal). Groups are also cut so
        that the logits held at once stay under SCORE_CHUNK values.
        """
        M, T = target_ids.shape
        # a target's width: up to its last scored position (a forced BOS may be unscored)
        positions = torch.arange(1, T + 1, device=target_mask.device)
        lengths = (target_mask.bool() * positions).amax(-1).clamp(min=1).tolist()
        parts: list[tuple[list[int], int]] = []  # (row indices, their longest target)
        for group in length_groups(lengths, SCORE_SLACK):
            width = int(lengths[group[0]])  # groups list their longest row first
            per = max(1, SCORE_CHUNK // (width * self.vocab_size))
            parts += [(group[i : i + per], width) for i in range(0, len(group), per)]
        if len(parts) == 1 and parts[0][1] == T:
            return self._score(enc, rows, target_ids, target_mask)
        scored, order = [], []
        for idx, width in parts:
            i = torch.tensor(idx, device=rows.device)
            lp = self._score(enc, rows[i], target_ids[i, :width], target_mask[i, :width])
            scored.append(F.pad(lp, (0, T - width)))  # (n, T), 0 past the group's width
            order += idx
        inverse = torch.empty(M, dtype=torch.long, device=rows.device)
        inverse[torch.tensor(order, device=rows.device)] = torch.arange(M, device=rows.device)
        return torch.cat(scored).index_select(0, inverse)  # (M, T) back in row order

    def _score(
        self, enc: Encoded, rows: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        logprobs = F.log_softmax(self._logits(enc, rows, target_ids, target_mask).float(), -1)
        tok = logprobs.gather(-1, target_ids[..., None]).squeeze(-1)  # (M, T)
        return tok.masked_fill(~target_mask.bool(), 0.0)

    def _pair_rows(self, inputs: GenInputs, target_ids: torch.Tensor) -> torch.Tensor:
        if target_ids.shape[0] != inputs.batch_size:
            raise MarginError(
                f"got {target_ids.shape[0]} targets for {inputs.batch_size} questions; "
                "pass one target per question"
            )
        return torch.arange(inputs.input_ids.shape[0], device=target_ids.device)  # (B*k,)

    def token_logprobs(
        self, inputs: GenInputs, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        """log p(y_i|x,z,y_<i) (B, k, T) for all k passages in one batched forward."""
        k = inputs.n_docs
        rows = self._pair_rows(inputs, target_ids)
        tgt = target_ids.repeat_interleave(k, 0)  # (B*k, T)
        msk = target_mask.repeat_interleave(k, 0)
        out = self.score(self.encode(inputs), rows, tgt, msk)  # (B*k, T)
        return out.view(-1, k, target_ids.shape[1])

    def vocab_logprobs(
        self, inputs: GenInputs, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        """Full next-token log-probs (B, k, T, V) along the targets (for label smoothing)."""
        k = inputs.n_docs
        rows = self._pair_rows(inputs, target_ids)
        tgt = target_ids.repeat_interleave(k, 0)
        msk = target_mask.repeat_interleave(k, 0)
        logits = self._logits(self.encode(inputs), rows, tgt, msk)  # (B*k, T, V)
        return F.log_softmax(logits.float(), -1).view(-1, k, *logits.shape[1:])

    # -- incremental decoding ------------------------------------------------------------------

    def step(self, state: DecodeState) -> torch.Tensor:
        """Next-token log-probs (N, V) for every row of the state."""
        if state.pending is not None:
            out, state.pending = state.pending, None
            return out
        return F.log_softmax(self._forward_step(state).float(), -1)

    def advance(
        self, state: DecodeState, next_tokens: torch.Tensor, reorder: torch.Tensor,
        moves: Moves = "any",
    ) -> None:
        """Row i continues row ``reorder[i]`` with ``next_tokens[i]`` (beam reordering).

        ``moves``, what the caller knows of ``reorder`` without asking the device (each question
        to a GPU waits for it): "none", every row stays where it is (greedy, nobody dropped);
        "within_context", every row continues a row of its own context (beams of one
        (question, passage)) and none is dropped; "any", nothing known: checked here.
        """
        # greedy never reorders (until finished rows leave): skip copying the whole cache
        if moves != "none" and not is_identity(reorder, state.last_tokens.numel()):
            state.cache.reorder_cache(reorder)
            state.attention_mask = state.attention_mask.index_select(0, reorder)
            if state.hidden is not None:
                state.hidden = state.hidden.index_select(0, reorder)
            if state.positions is not None:
                state.positions = state.positions.index_select(0, reorder)
            if state.context is not None:
                state.context = state.context.index_select(0, reorder)
        if state.positions is not None:
            state.positions = state.positions + 1
            ones = state.attention_mask.new_ones(state.attention_mask.shape[0], 1)
            state.attention_mask = torch.cat([state.attention_mask, ones], 1)
        state.last_tokens = next_tokens
        state.steps += 1

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated tokens, special tokens skipped."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()  # type: ignore[attr-defined]
