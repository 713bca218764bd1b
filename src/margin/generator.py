"""One generator interface over seq2seq (BART, T5) and decoder-only (Llama, SmolLM2) models.

RAG's generator p_theta(y_i | x, z, y_<i) only needs three things from a language model (Sec. 2):
turn each (question, passage) pair into model inputs, score given target tokens under every pair
in one batched forward, and extend hypotheses one token at a time with a KV cache for the paper's
decoding (Sec. 2.5). Both kinds of model sit behind that one surface, so the marginalisation
(margin.marginalize) and the decoding (margin.decoding) never ask which kind they drive.

Rows are question-major: row ``b * k + z`` holds question b with its z-th passage, exactly like
transformers' RAG ``context_input_ids``. Passages and document scores are given by the caller;
nothing here retrieves.

How inputs and targets are tokenised:

- Seq2seq: the input is ``prefix + title + " / " + text + " // " + question`` as transformers'
  ``RagRetriever.postprocess_docs`` builds it (title stripped of one leading and one trailing
  double quote, then every double space replaced by one), truncated to ``max_combined_length``.
  Targets are ``tokenizer(text_target=answer)`` (BART: ``<s> answer </s>``); the decoder reads
  ``[decoder_start] + target[:-1]`` as in ``BartForConditionalGeneration(labels=...)``.
- Causal: the prompt is ``prompt_fn(tokenizer, question, passage)``, tokenised without special
  tokens when the tokenizer has a chat template (the template writes its own) and with them
  otherwise, LEFT-padded. Targets are ``tokenizer(answer, add_special_tokens=False) + [eos]``,
  read right after the prompt. Position ids count real tokens only, as ``model.generate`` does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from margin.errors import MarginError
from margin.passages import Passage

PromptFn = Callable[[object, str, Passage | None], str]


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
class Encoded:
    """The per-(question, passage) work done once and reused by scoring and decoding.

    Seq2seq: the encoder's output. Causal: the prompt tokens (the prefix every pass reads).
    """

    inputs: GenInputs
    hidden: torch.Tensor | None = None  # (B*k, S, d) seq2seq encoder output; None for causal


@dataclass
class DecodeState:
    """Incremental decoding state for N = B*k*expand rows (row ``(b*k + z) * expand + j``)."""

    cache: Cache  # the model's own KV cache object, reordered in place for beam search
    last_tokens: torch.Tensor  # (N,) the token the next step reads
    attention_mask: torch.Tensor  # (N, S) seq2seq: encoder mask; causal: mask over prompt+generated
    hidden: torch.Tensor | None = None  # (N, S, d) seq2seq encoder output, one copy per row
    positions: torch.Tensor | None = None  # (N,) causal: position id of last_tokens
    pending: torch.Tensor | None = None  # (N, V) causal: log-probs from the prefill, used once
    steps: int = 0  # tokens generated so far


@dataclass(frozen=True)
class Seq2SeqFormat:
    """How a (question, passage) pair becomes one encoder input (transformers' RAG conventions)."""

    prefix: str = ""  # prepended to every input (T5 task prefixes; transformers' generator prefix)
    title_sep: str = " / "  # between the passage title and its text
    doc_sep: str = " // "  # between the passage text and the question
    max_combined_length: int = 300  # truncate each input to this many tokens
    pad_to_max_length: bool = False  # pad every row to max_combined_length, as transformers does


def rag_context_string(question: str, passage: Passage | None, fmt: Seq2SeqFormat) -> str:
    """The seq2seq input string of transformers' ``RagRetriever.postprocess_docs``."""
    if passage is None:
        return (fmt.prefix + question).replace("  ", " ")
    title = passage.title.removeprefix('"').removesuffix('"')
    out = fmt.prefix + title + fmt.title_sep + passage.text + fmt.doc_sep + question
    return out.replace("  ", " ")


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
        """The once-per-row context pass (seq2seq encoder); reused by scoring and decoding."""

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
        """log p(y_i|x,z,y_<i) (M, T) of targets (M, T) under context rows (M,); 0 where masked."""
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
        state.cache.reorder_cache(reorder)
        state.attention_mask = state.attention_mask.index_select(0, reorder)
        if state.hidden is not None:
            state.hidden = state.hidden.index_select(0, reorder)
        if state.positions is not None:
            state.positions = state.positions.index_select(0, reorder) + 1
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
                rag_context_string(q, p, self.fmt)
                for q, ps in zip(questions, passages, strict=True)
                for p in ps
            ]
        enc = self.tokenizer(  # type: ignore[operator]
            texts,
            max_length=self.fmt.max_combined_length,
            padding="max_length" if self.fmt.pad_to_max_length else "longest",
            truncation=True,
            return_tensors="pt",
        )
        return GenInputs(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), k)

    def build_targets(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(text_target=list(answers), padding="longest", return_tensors="pt")  # type: ignore[operator]
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode(self, inputs: GenInputs) -> Encoded:
        out = self.model.get_encoder()(  # type: ignore[operator]
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, return_dict=True
        )
        return Encoded(inputs, out.last_hidden_state)  # (B*k, S, d)

    def _logits(
        self, enc: Encoded, rows: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        assert enc.hidden is not None
        dec_in = target_ids.new_full(target_ids.shape, self.decoder_start_token_id)  # (M, T)
        dec_in[:, 1:] = target_ids[:, :-1]
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden.index_select(0, rows)),
            attention_mask=enc.inputs.attention_mask.index_select(0, rows),
            decoder_input_ids=dec_in,
            use_cache=False,
        )
        return out.logits  # (M, T, V)

    def start(self, enc: Encoded, expand: int) -> DecodeState:
        assert enc.hidden is not None
        hidden = enc.hidden.repeat_interleave(expand, 0)  # (N, S, d)
        mask = enc.inputs.attention_mask.repeat_interleave(expand, 0)  # (N, S)
        start = mask.new_full((hidden.shape[0],), self.decoder_start_token_id)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return DecodeState(cache=cache, last_tokens=start, attention_mask=mask, hidden=hidden)

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


@dataclass(frozen=True)
class CausalFormat:
    """How a (question, passage) pair becomes a decoder-only prompt."""

    prompt_fn: PromptFn = field(default=default_prompt)  # (tokenizer, question, passage) -> str
    max_prompt_length: int = 2048  # longer prompts are a MarginError, never silently cut


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
        fn = self.fmt.prompt_fn
        if passages is None:
            texts, k = [fn(self.tokenizer, q, None) for q in questions], 1
        else:
            k = _check_passages(questions, passages)
            texts = [
                fn(self.tokenizer, q, p)
                for q, ps in zip(questions, passages, strict=True)
                for p in ps
            ]
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        ids = self._tokenize(texts, add_special_tokens=not has_template)
        longest = max(len(r) for r in ids)
        if longest > self.fmt.max_prompt_length:
            raise MarginError(
                f"a prompt is {longest} tokens, over max_prompt_length="
                f"{self.fmt.max_prompt_length}; use shorter passages or raise max_prompt_length"
            )
        input_ids = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):  # LEFT padding: the answer follows the prompt directly
            input_ids[i, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, longest - len(row) :] = 1
        return GenInputs(input_ids.to(self.device), mask.to(self.device), k)

    def build_targets(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [row + [self.eos_token_ids[0]] for row in self._tokenize(list(answers), False)]
        longest = max(len(r) for r in ids)
        target = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):
            target[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return target.to(self.device), mask.to(self.device)

    def encode(self, inputs: GenInputs) -> Encoded:
        return Encoded(inputs)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        """Position ids that count real tokens only, as ``model.generate`` computes them."""
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def _logits(
        self, enc: Encoded, rows: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        prompt = enc.inputs.input_ids.index_select(0, rows)  # (M, S)
        pmask = enc.inputs.attention_mask.index_select(0, rows)
        ids = torch.cat([prompt, target_ids], 1)  # (M, S+T)
        mask = torch.cat([pmask, torch.ones_like(target_ids, dtype=pmask.dtype)], 1)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=self._positions(mask), use_cache=False
        )
        S, T = prompt.shape[1], target_ids.shape[1]
        return out.logits[:, S - 1 : S + T - 1]  # (M, T, V): position S-1+i predicts y_i

    def start(self, enc: Encoded, expand: int) -> DecodeState:
        ids, mask = enc.inputs.input_ids, enc.inputs.attention_mask  # (R, S)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=self._positions(mask),
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        cache.batch_repeat_interleave(expand)
        first = F.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(expand, 0)  # (N, V)
        mask = mask.repeat_interleave(expand, 0)
        positions = (mask.sum(-1) - 1).clamp(min=0)  # (N,) position of the last prompt token
        last = ids[:, -1].repeat_interleave(expand, 0)
        return DecodeState(cache, last, mask, positions=positions, pending=first)

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
