"""The seq2seq generator: an encoder-decoder (BART as in the paper, Sec. 2.3, or T5) reads the
passage as encoder input.

How inputs and targets are tokenised: the input is ``prefix + title + " / " + text + " // " +
question`` as transformers' ``RagRetriever.postprocess_docs`` builds it (title stripped of one
leading and one trailing double quote, then every double space replaced by one), fitted to
``max_combined_length``. Targets are ``tokenizer(text_target=answer)`` (BART: ``<s> answer
</s>``); the decoder reads ``[decoder_start] + target[:-1]`` as in
``BartForConditionalGeneration(labels=...)``.

An input over ``max_combined_length`` has its passage cut
(margin.generation.generator.fit_passage); when the question and separators alone are over it,
the tokenizer cuts the end, as transformers does. ``Seq2SeqFormat(cut_passage=False)`` keeps
transformers' cut (checkpoints from transformers load with it, so margin reads their inputs token
for token as transformers does).

The decoder-start step runs once per context row (margin.generation.kv_cache.StartCache): its
cross-attention keys/values are copied to the beams and hypotheses of that row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from margin.generation.generator import (
    DecodeState,
    Encoded,
    Generator,
    GenInputs,
    Moves,
    _check_passages,
    _eos_ids,
    fit_passage,
)
from margin.generation.kv_cache import StartCache, is_identity
from margin.retrieval.passages import Passage


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
        if not torch.is_grad_enabled() and not is_identity(rows, enc.hidden.shape[0]):
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

    def advance(
        self, state: DecodeState, next_tokens: torch.Tensor, reorder: torch.Tensor,
        moves: Moves = "any",
    ) -> None:
        """As :meth:`Generator.advance`; when every row keeps its context row (beams move within
        their own (question, passage)), only the decoder's own cache moves: the cross-attention
        keys/values, encoder output and mask are the same for every row of a context. Unless
        ``moves`` says so, that is checked on the device (one host read)."""
        ctx = state.context
        if (
            ctx is not None
            and isinstance(state.cache, EncoderDecoderCache)
            and reorder.numel() == ctx.numel()
        ):
            if moves == "any":
                rows = torch.arange(ctx.numel(), device=reorder.device)
                same_row = (reorder == rows).all()
                same_ctx = (ctx.index_select(0, reorder) == ctx).all()
                identity, same_context = torch.stack([same_row, same_ctx]).tolist()  # host read
            else:
                identity, same_context = moves == "none", True
            if identity or same_context:
                if not identity:  # greedy never reorders: then nothing moves
                    state.cache.self_attention_cache.reorder_cache(reorder)
                state.last_tokens = next_tokens
                state.steps += 1
                return
        super().advance(state, next_tokens, reorder, moves)
