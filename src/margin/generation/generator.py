"""One generator interface over seq2seq (BART, T5) and decoder-only (Llama, SmolLM2) models.

RAG's generator p_theta(y_i | x, z, y_<i) only needs three things from a language model (Sec. 2):
turn each (question, passage) pair into model inputs, score given target tokens under every pair
in one batched forward, and extend hypotheses one token at a time with a KV cache for the paper's
decoding (Sec. 2.5). Both kinds of model sit behind that one surface, so the marginalisation
(margin.marginalize) and the decoding (margin.generation.decoding) never ask which kind they drive.

Rows are question-major: row ``b * k + z`` holds question b with its z-th passage, exactly like
transformers' RAG ``context_input_ids``. Passages and document scores are given by the caller;
nothing here retrieves.

How inputs and targets are tokenised:

- Seq2seq: the input is ``prefix + title + " / " + text + " // " + question`` as transformers'
  ``RagRetriever.postprocess_docs`` builds it (title stripped of one leading and one trailing
  double quote, then every double space replaced by one), fitted to ``max_combined_length``.
  Targets are ``tokenizer(text_target=answer)`` (BART: ``<s> answer </s>``); the decoder reads
  ``[decoder_start] + target[:-1]`` as in ``BartForConditionalGeneration(labels=...)``.
- Causal: the prompt is ``prompt_fn(tokenizer, question, passage)``, tokenised without special
  tokens when the tokenizer has a chat template (the template writes its own) and with them
  otherwise, LEFT-padded. Targets are ``tokenizer(answer, add_special_tokens=False) + [eos]``,
  read right after the prompt. Position ids count real tokens only, as ``model.generate`` does.

Prompts always fit: a (question, passage) input over the limit (``max_combined_length``,
``max_prompt_length``) has its PASSAGE cut (:func:`fit_passage`: the text's end, then the
title's), never the question or the template, so the answer still reads the whole question. An
input that fits is tokenised exactly as before. transformers' RAG cuts the whole string at the
end instead, dropping the question; a seq2seq input whose question and separators alone are over
the limit still gets that cut, and a causal one is an error (the answer would follow no question).
``Seq2SeqFormat(cut_passage=False)`` keeps transformers' cut (checkpoints from transformers load
with it, so margin reads their inputs token for token as transformers does).

Why the causal prompt is run once, into a KV cache (:class:`PromptCache`): a decoder-only model
reads the passage as prompt, and the prompt (~340 tokens for the default few-shot prompt) is far
longer than an answer. ``encode`` runs every row's prompt once; scoring a target then runs only
the target tokens on a copy of the cached rows, and decoding starts from the same cache. The rows
of a batch usually share a long token prefix (the instruction and the few-shot demonstrations),
so that prefix is run ONCE (batch 1) and the rows' own suffixes run on top of it, laid out as
``[prefix][pad ...][suffix]``: the pads are masked and position ids count real tokens only, so
every row computes what its unpadded prompt alone computes (tests/test_generator.py checks it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from margin.errors import MarginError
from margin.generation.kv_cache import DEFAULT_ROOM, GrowingCache
from margin.retrieval.passages import Passage

PromptFn = Callable[[object, str, Passage | None], str]
TargetFn = Callable[[object, str], str]  # (tokenizer, answer) -> the text that follows the prompt
KV = tuple[torch.Tensor, torch.Tensor]  # one layer's cached (keys, values), (n, h, S, d_head)
SCORE_CHUNK = 2**26  # logits (pairs x tokens x vocabulary) scored at once: 256 MiB of float32
SCORE_SLACK = 0.25  # targets scored together while padding adds at most this share of tokens
TOKEN_CHARS = 32  # no token is this long on average: text past limit x this never fits, so is cut


@dataclass
class GenInputs:
    """Generator inputs for B questions x k passages, flattened question-major to B*k rows."""

    input_ids: torch.Tensor  # (B*k, S) seq2seq: right-padded; causal: left-padded
    attention_mask: torch.Tensor  # (B*k, S) 1 for real tokens
    n_docs: int  # k, passages per question (1 in the closed-book case)

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
class PromptCache:
    """A causal model's KV cache over R prompts, run once, read by scoring and by decoding.

    Cached positions are laid out ``[shared prefix][pad ...][own suffix]`` (plain left padding
    when the rows share no prefix); ``mask`` marks the real tokens. Never modified in place:
    :meth:`select` hands out fresh caches.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) (R, h, S, d_head)
    mask: torch.Tensor  # (R, S) 1 on the real prompt tokens of each row
    lengths: torch.Tensor  # (R,) real prompt tokens: the position id of the first target token
    last_tokens: torch.Tensor  # (R,) the last prompt token of each row
    next_logits: torch.Tensor  # (R, V) logits of the first target token, after the whole prompt

    def select(self, rows: torch.Tensor, room: int = DEFAULT_ROOM) -> DynamicCache:
        """A fresh cache holding prompt rows ``rows`` (M,), in that order (repeats allowed),
        with ``room`` positions to grow into before it reallocates."""
        pick = None if _is_identity(rows, self.mask.shape[0]) else rows
        return GrowingCache(self.layers, pick, room)  # one copy: (M, h, S + room, d_head)


@dataclass
class StartCache:
    """A seq2seq model's first decoder step (the decoder-start token) over R context rows.

    Running it fills the cross-attention keys/values of every decoder layer, which depend on the
    context row only: decoding copies them to the row's beams and scoring to the row's
    hypotheses, instead of projecting the encoder output again per beam or per hypothesis.
    """

    cross: list[KV]  # per decoder layer: cross-attention (keys, values) (R, h, S, d_head)
    own: list[KV]  # per decoder layer: the start token's self-attention (keys, values) (R, h, 1, d)
    next_logits: torch.Tensor  # (R, V) logits of the first generated token

    def cache(self, rows: torch.Tensor, with_start: bool) -> EncoderDecoderCache:
        """A fresh cache for rows ``rows`` (M,) of the contexts, with or without the start token."""
        pick = None if _is_identity(rows, self.next_logits.shape[0]) else rows
        own = GrowingCache(self.own, pick) if with_start else DynamicCache()
        return EncoderDecoderCache(own, GrowingCache(self.cross, pick, room=0))


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


@dataclass(frozen=True)
class Seq2SeqFormat:
    """How a (question, passage) pair becomes one encoder input (transformers' RAG conventions)."""

    prefix: str = ""  # prepended to every input (T5 task prefixes; transformers' generator prefix)
    title_sep: str = " / "  # between the passage title and its text
    doc_sep: str = " // "  # between the passage text and the question
    max_combined_length: int = 300  # fit each input to this many tokens
    cut_passage: bool = True  # over it, cut the passage; False: the input's end, as transformers
    pad_to_max_length: bool = False  # pad every row to max_combined_length, as transformers does


def rag_context_string(question: str, passage: Passage | None, fmt: Seq2SeqFormat) -> str:
    """The seq2seq input string of transformers' ``RagRetriever.postprocess_docs``."""
    if passage is None:
        return (fmt.prefix + question).replace("  ", " ")
    title = passage.title.removeprefix('"').removesuffix('"')
    out = fmt.prefix + title + fmt.title_sep + passage.text + fmt.doc_sep + question
    return out.replace("  ", " ")


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


def default_prompt(tokenizer: object, question: str, passage: Passage | None) -> str:
    """The default causal prompt: the chat template when there is one, else plain text."""
    context = f"{passage.title}\n{passage.text}" if passage is not None else None
    if getattr(tokenizer, "chat_template", None):
        content = question if context is None else f"Context:\n{context}\n\nQuestion: {question}"
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            messages, tokenize=False, add_generation_prompt=True
        )
    if context is None:
        return f"Question: {question}\nAnswer:"
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


def _eos_ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def _is_identity(order: torch.Tensor, n: int) -> bool:
    """Whether picking rows ``order`` (M,) out of ``n`` keeps every row, each where it is."""
    return order.numel() == n and torch.equal(order, torch.arange(n, device=order.device))


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

    def advance(self, state: DecodeState, next_tokens: torch.Tensor, reorder: torch.Tensor) -> None:
        """Row i continues row ``reorder[i]`` with ``next_tokens[i]`` (beam reordering)."""
        # greedy never reorders (until finished rows leave): skip copying the whole cache
        if not _is_identity(reorder, state.last_tokens.numel()):
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


class Seq2SeqGenerator(Generator):
    """An encoder-decoder generator (BART as in the paper, or T5): the passage is encoder input."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, fmt: Seq2SeqFormat | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.fmt = fmt or Seq2SeqFormat()
        gc = model.generation_config
        self.eos_token_ids = _eos_ids(gc.eos_token_id)
        self.pad_token_id = int(
            gc.pad_token_id if gc.pad_token_id is not None else self.eos_token_ids[0]
        )
        self.decoder_start_token_id = int(gc.decoder_start_token_id)
        self.forced_bos_token_id = gc.forced_bos_token_id
        self.forced_eos_token_id = gc.forced_eos_token_id

    def build_inputs(
        self, questions: Sequence[str], passages: Sequence[Sequence[Passage]] | None
    ) -> GenInputs:
        if passages is None:
            texts, k = [rag_context_string(q, None, self.fmt) for q in questions], 1
        else:
            k = _check_passages(questions, passages)
            texts = [
                self._fitted(q, p) for q, ps in zip(questions, passages, strict=True) for p in ps
            ]
        enc = self.tokenizer(  # type: ignore[operator]
            texts,
            max_length=self.fmt.max_combined_length,
            padding="max_length" if self.fmt.pad_to_max_length else "longest",
            truncation=True,
            return_tensors="pt",
        )
        return GenInputs(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), k)

    def _fitted(self, question: str, passage: Passage) -> str:
        """The input string of (question, passage), its passage cut to fit max_combined_length
        (when the question alone is too long, the tokenizer then cuts the end, as transformers)."""
        def length(p: Passage) -> int:
            return len(self.tokenizer(rag_context_string(question, p, self.fmt))["input_ids"])  # type: ignore[operator]

        if not self.fmt.cut_passage:
            return rag_context_string(question, passage, self.fmt)
        fitted = fit_passage(passage, length, self.fmt.max_combined_length)
        return rag_context_string(question, fitted or passage, self.fmt)

    def build_targets(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(text_target=list(answers), padding="longest", return_tensors="pt")  # type: ignore[operator]
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode(self, inputs: GenInputs) -> Encoded:
        out = self.model.get_encoder()(  # type: ignore[operator]
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, return_dict=True
        )
        return Encoded(inputs, out.last_hidden_state)  # (B*k, S, d)

    def _start(self, enc: Encoded) -> StartCache:
        """The decoder-start step on every context row, run once (see :class:`StartCache`)."""
        if enc.start is None:
            assert enc.hidden is not None
            R = enc.hidden.shape[0]
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden),
                attention_mask=enc.inputs.attention_mask,
                decoder_input_ids=torch.full(
                    (R, 1), self.decoder_start_token_id, dtype=torch.long, device=enc.hidden.device
                ),
                cache=cache,
                use_cache=True,
            )
            layers = out.cache.self_attention_cache.layers
            cross = out.cache.cross_attention_cache.layers
            enc.start = StartCache(
                cross=[(layer.keys, layer.values) for layer in cross],
                own=[(layer.keys, layer.values) for layer in layers],
                next_logits=out.logits[:, -1],  # (R, V)
            )
        return enc.start

    def _logits(
        self, enc: Encoded, rows: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        assert enc.hidden is not None
        dec_in = target_ids.new_full(target_ids.shape, self.decoder_start_token_id)  # (M, T)
        dec_in[:, 1:] = target_ids[:, :-1]
        cache = None
        if not torch.is_grad_enabled() and not _is_identity(rows, enc.hidden.shape[0]):
            # rows repeat (hypotheses x passages): each context's cross-attention once, copied
            cache = self._start(enc).cache(rows, with_start=False)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden.index_select(0, rows)),
            attention_mask=enc.inputs.attention_mask.index_select(0, rows),
            decoder_input_ids=dec_in,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.logits  # (M, T, V)

    def start(self, enc: Encoded, expand: int) -> DecodeState:
        assert enc.hidden is not None
        first = self._start(enc)  # the start token, once per context row
        R = enc.hidden.shape[0]
        rows = torch.arange(R, device=enc.hidden.device).repeat_interleave(expand)  # (N,)
        return DecodeState(
            cache=first.cache(rows, with_start=True),
            last_tokens=rows.new_full((rows.numel(),), self.decoder_start_token_id),
            attention_mask=enc.inputs.attention_mask.index_select(0, rows),  # (N, S)
            hidden=enc.hidden.index_select(0, rows),  # (N, S, d)
            pending=F.log_softmax(first.next_logits.float(), -1).index_select(0, rows),
            context=rows,
        )

    def _forward_step(self, state: DecodeState) -> torch.Tensor:
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=state.hidden),
            attention_mask=state.attention_mask,
            decoder_input_ids=state.last_tokens[:, None],
            cache=state.cache,
            use_cache=True,
        )
        state.cache = out.cache
        return out.logits[:, -1]  # (N, V)

    def advance(self, state: DecodeState, next_tokens: torch.Tensor, reorder: torch.Tensor) -> None:
        """As :meth:`Generator.advance`; when every row keeps its context row (beams move within
        their own (question, passage)), only the decoder's own cache moves: the cross-attention
        keys/values, encoder output and mask are the same for every row of a context."""
        ctx = state.context
        if (
            ctx is not None
            and isinstance(state.cache, EncoderDecoderCache)
            and reorder.numel() == ctx.numel()
        ):
            rows = torch.arange(ctx.numel(), device=reorder.device)
            same_row = (reorder == rows).all()
            same_ctx = (ctx.index_select(0, reorder) == ctx).all()
            identity, same_context = torch.stack([same_row, same_ctx]).tolist()  # one host read
            if identity or same_context:
                if not identity:  # greedy never reorders: then nothing moves
                    state.cache.self_attention_cache.reorder_cache(reorder)
                state.last_tokens = next_tokens
                state.steps += 1
                return
        super().advance(state, next_tokens, reorder)


@dataclass(frozen=True)
class CausalFormat:
    """How a (question, passage) pair becomes a decoder-only prompt."""

    prompt_fn: PromptFn = field(default=default_prompt)  # (tokenizer, question, passage) -> str
    target_fn: TargetFn | None = None  # the answer as the prompt expects it; None: as given
    end_token_id: int | None = None  # ends a scored answer (a newline); None: the first EOS
    max_prompt_length: int = 2048  # a longer prompt has its passage cut (never the question)
    share_prefix: bool = True  # run the rows' common token prefix once (batch 1), not per row
    suffix_padding: float = 0.1  # rows' own suffixes batch together while pads add <= this share


class CausalGenerator(Generator):
    """A decoder-only generator: the passage goes into the prompt, the answer follows it."""

    forced_bos_token_id = None
    forced_eos_token_id = None

    def __init__(self, model: torch.nn.Module, tokenizer: object, fmt: CausalFormat | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.fmt = fmt or CausalFormat()
        gc = model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else tokenizer.eos_token_id  # type: ignore[attr-defined]
        self.eos_token_ids = _eos_ids(eos)
        pad = gc.pad_token_id if gc.pad_token_id is not None else tokenizer.pad_token_id  # type: ignore[attr-defined]
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])

    def _tokenize(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]  # type: ignore[operator]

    def build_inputs(
        self, questions: Sequence[str], passages: Sequence[Sequence[Passage]] | None
    ) -> GenInputs:
        if passages is None:
            pairs: list[tuple[str, Passage | None]] = [(q, None) for q in questions]
            k = 1
        else:
            k = _check_passages(questions, passages)
            pairs = [(q, p) for q, ps in zip(questions, passages, strict=True) for p in ps]
        ids = [self._prompt_ids(q, p) for q, p in pairs]
        longest = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):  # LEFT padding: the answer follows the prompt directly
            input_ids[i, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, longest - len(row) :] = 1
        return GenInputs(input_ids.to(self.device), mask.to(self.device), k)

    def _prompt_ids(self, question: str, passage: Passage | None) -> list[int]:
        """The prompt's token ids, its passage cut to fit max_prompt_length (see the top)."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        limit = self.fmt.max_prompt_length

        def ids_of(p: Passage | None) -> list[int]:
            text = self.fmt.prompt_fn(self.tokenizer, question, p)
            return self._tokenize([text], add_special_tokens=not has_template)[0]

        short = passage is None or len(passage.title) + len(passage.text) <= limit * TOKEN_CHARS
        if short and len(ids := ids_of(passage)) <= limit:  # fits: as it is (most prompts)
            return ids
        fitted = passage
        if passage is not None:
            fitted = fit_passage(passage, lambda p: len(ids_of(p)), limit)
            fitted = fitted or Passage(passage.id, "", "", passage.source)  # for the error below
        ids = ids_of(fitted)
        if len(ids) > limit:
            raise MarginError(
                f"the question and the prompt template alone are {len(ids)} tokens, over "
                f"max_prompt_length={limit}; shorten the question or raise max_prompt_length"
            )
        return ids

    def build_targets(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The answers written as generation writes them: the prompt's target form (e.g. a
        leading space after ``Answer:``) and the token decoding stops at, so a scored answer and
        the same answer decoded get the same log-probability."""
        fn, end = self.fmt.target_fn, self.fmt.end_token_id
        texts = [fn(self.tokenizer, a) for a in answers] if fn else list(answers)
        end = self.eos_token_ids[0] if end is None else end
        ids = [row + [end] for row in self._tokenize(texts, False)]
        longest = max(len(r) for r in ids)
        target = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):
            target[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return target.to(self.device), mask.to(self.device)

    def encode(self, inputs: GenInputs) -> Encoded:
        rows = unpadded_rows(inputs.input_ids, inputs.attention_mask)
        shared = common_prefix_length(rows) if self.fmt.share_prefix else 0
        ids, mask = prefix_layout(rows, shared, self.pad_token_id)  # (R, S)
        R, S = ids.shape
        prefix: list[KV] = []
        if shared:  # the common prefix once, batch 1
            prefix, _ = self._extend(ids[:1, :shared], mask[:1, :shared], prefix)
        # each row's own suffix on top of it, in groups of similar length (little padding)
        own = [len(r) - shared for r in rows]
        parts = []
        for group in length_groups(own, self.fmt.suffix_padding):
            g = torch.tensor(group, device=ids.device)
            w = max(own[i] for i in group)  # the group's suffix width: columns S-w .. S-1
            cols = torch.cat([torch.arange(shared), torch.arange(S - w, S)]).to(ids.device)
            gmask = mask[g][:, cols]  # (n, shared + w), [prefix][pad][suffix] for these rows
            parts.append((g, *self._extend(ids[g][:, S - w :], gmask, prefix)))
        layers, logits = _scatter_rows(parts, shared, R, S)
        prompt = PromptCache(
            layers=layers,
            mask=mask,
            lengths=mask.sum(-1),
            last_tokens=ids[:, -1],  # the suffix is right-aligned: never a pad
            next_logits=logits,  # (R, V)
        )
        return Encoded(inputs, prompt=prompt)

    def _extend(
        self, ids: torch.Tensor, mask: torch.Tensor, past: list[KV]
    ) -> tuple[list[KV], torch.Tensor]:
        """Run ``ids`` (n, w) after the cached ``past`` positions (1 row, P positions, shared).

        ``mask`` (n, P+w) covers both. Returns the cache over all P+w positions, per layer
        (n, h, P+w, d_head), and the logits (n, V) after the last position: only that position
        goes through the output layer.
        """
        n = ids.shape[0]
        past_n = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in past]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=self._positions(mask)[:, mask.shape[1] - ids.shape[1] :],
            cache=DynamicCache(ddp_cache_data=past_n) if past else DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
        return [(layer.keys, layer.values) for layer in out.cache.layers], out.logits[:, -1]

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        """Position ids that count real tokens only, as ``model.generate`` computes them."""
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def _logits(
        self, enc: Encoded, rows: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        prompt = enc.prompt
        assert prompt is not None
        first = prompt.next_logits.index_select(0, rows)[:, None]  # (M, 1, V) predicts y_0
        M, T = target_ids.shape
        if T == 1:
            return first
        # y_0 .. y_{T-2} read on top of the cached prompt rows predict y_1 .. y_{T-1}
        pmask = prompt.mask.index_select(0, rows)  # (M, S)
        mask = torch.cat([pmask, pmask.new_ones(M, T - 1)], 1)  # (M, S+T-1)
        steps = torch.arange(T - 1, device=rows.device)
        positions = prompt.lengths.index_select(0, rows)[:, None] + steps  # (M, T-1)
        out = self.model(
            input_ids=target_ids[:, :-1],
            attention_mask=mask,
            position_ids=positions,
            cache=prompt.select(rows, room=T - 1),
            use_cache=True,
        )
        return torch.cat([first.to(out.logits.dtype), out.logits], 1)  # (M, T, V)

    def start(self, enc: Encoded, expand: int) -> DecodeState:
        prompt = enc.prompt
        assert prompt is not None
        R = prompt.mask.shape[0]
        rows = torch.arange(R, device=prompt.mask.device).repeat_interleave(expand)  # (N,)
        first = F.log_softmax(prompt.next_logits.float(), -1).index_select(0, rows)  # (N, V)
        return DecodeState(
            cache=prompt.select(rows),
            last_tokens=prompt.last_tokens.index_select(0, rows),
            attention_mask=prompt.mask.index_select(0, rows),  # (N, S)
            positions=prompt.lengths.index_select(0, rows) - 1,  # of the last prompt token
            pending=first,
        )

    def _forward_step(self, state: DecodeState) -> torch.Tensor:
        assert state.positions is not None
        out = self.model(
            input_ids=state.last_tokens[:, None],
            attention_mask=state.attention_mask,
            position_ids=state.positions[:, None],
            cache=state.cache,
            use_cache=True,
        )
        state.cache = out.cache
        return out.logits[:, -1]  # (N, V)


# -- shared prompt prefix (causal) --------------------------------------------------------------


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens (R rows of (n_r,)), whatever side it was padded on."""
    return [ids[m.bool()] for ids, m in zip(input_ids, attention_mask, strict=True)]


def common_prefix_length(rows: Sequence[torch.Tensor]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own.

    The cap keeps a last token per row to run, whose output predicts that row's next token.
    """
    n = min(len(r) for r in rows) - 1
    if n <= 0:
        return 0
    head = torch.stack([r[:n] for r in rows])  # (R, n)
    same = (head == head[:1]).all(0)  # (n,)
    return n if bool(same.all()) else int(same.int().argmin())  # the first position that differs


def length_groups(lengths: Sequence[int], slack: float) -> list[list[int]]:
    """Row indices in groups, longest first, so that padding every row of a group to its longest
    adds at most ``slack`` x the group's real tokens (one group when the lengths are close)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else []
        real = sum(lengths[j] for j in group) + lengths[i]
        if group and lengths[group[0]] * (len(group) + 1) <= (1 + slack) * real:
            group.append(i)
        else:
            groups.append([i])
    return groups


def _scatter_rows(
    parts: Sequence[tuple[torch.Tensor, list[KV], torch.Tensor]], shared: int, R: int, S: int
) -> tuple[list[KV], torch.Tensor]:
    """Put the caches and logits of row groups back in row order, in one (R, S) layout.

    ``parts`` holds (rows (n,), cache (n, h, shared + w, d_head) per layer, logits (n, V)) per
    group. A group of suffix width w computed the columns [prefix][last w]; the columns between
    are pads of each of its rows (masked) and stay zero.
    """
    if len(parts) == 1:  # one group of every row: already the full layout, maybe reordered
        rows, kv, logits = parts[0]
        if _is_identity(rows, R):
            return kv, logits
        order = torch.argsort(rows)
        return [(k[order], v[order]) for k, v in kv], logits[order]
    logits = parts[0][2].new_empty(R, parts[0][2].shape[-1])  # (R, V)
    for rows, _, lg in parts:
        logits[rows] = lg
    layers = []
    for i, (k0, v0) in enumerate(parts[0][1]):
        keys = k0.new_zeros(R, k0.shape[1], S, k0.shape[3])  # (R, h, S, d_head)
        values = v0.new_zeros(R, v0.shape[1], S, v0.shape[3])
        for rows, kv, _ in parts:
            k, v = kv[i]  # (n, h, shared + w, d_head)
            w = k.shape[2] - shared
            keys[rows, :, :shared], values[rows, :, :shared] = k[:, :, :shared], v[:, :, :shared]
            keys[rows, :, S - w :], values[rows, :, S - w :] = k[:, :, shared:], v[:, :, shared:]
        layers.append((keys, values))
    return layers, logits


def prefix_layout(
    rows: Sequence[torch.Tensor], shared: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask (R, S) laid out ``[shared prefix][pad ...][own suffix]``, S the longest row.

    With ``shared=0`` this is plain left padding. Pads sit between prefix and suffix, so the
    prefix is the same columns in every row and its cache can be computed once.
    """
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_token_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    mask[:, :shared] = 1
    ids[:, :shared] = rows[0][:shared]
    for i, row in enumerate(rows):
        own = len(row) - shared  # >= 1 when shared comes from common_prefix_length
        ids[i, S - own :] = row[shared:]
        mask[i, S - own :] = 1
    return ids, mask
