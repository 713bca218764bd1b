"""The causal generator: a decoder-only model (Llama, SmolLM2) reads the passage in its prompt,
and the answer follows the prompt.

How inputs and targets are tokenised: the prompt is ``prompt_fn(tokenizer, question, passage)``,
tokenised without special tokens when the tokenizer has a chat template (the template writes its
own) and with them otherwise, LEFT-padded. Targets are ``tokenizer(answer,
add_special_tokens=False) + [eos]``, read right after the prompt. Position ids count real tokens
only, as ``model.generate`` does.

A prompt over ``max_prompt_length`` has its passage cut
(margin.generation.generator.fit_passage), never the question or the template; one whose
question and template alone are over it is an error (the answer would follow no question).

Why the causal prompt is run once, into a KV cache (:class:`PromptCache`): a decoder-only model
reads the passage as prompt, and the prompt (~340 tokens for the default few-shot prompt) is far
longer than an answer. ``encode`` runs every row's prompt once; scoring a target then runs only
the target tokens on a copy of the cached rows, and decoding starts from the same cache. The rows
of a batch usually share a long token prefix (the instruction and the few-shot demonstrations),
so that prefix is run ONCE (batch 1) and the rows' own suffixes run on top of it, laid out as
``[prefix][pad ...][suffix]``: the pads are masked and position ids count real tokens only, so
every row computes what its unpadded prompt alone computes (tests/test_generator.py checks it).

Why that prefix's KV is kept between calls (``prefix_cache``): the prefix is the template, the
same for every question (218 tokens on the default model, about a fifth of an ask's prefill), so
at inference it is run once per generator and its KV read again by every later ``encode`` whose
rows share exactly the same prefix ids. The same forward on the same ids and weights gives the
same bits, so answers are identical with and without it (tests/test_prefix_cache.py). Training
never reads it: see :meth:`CausalGenerator._prefix_kv`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache

from margin.errors import MarginError
from margin.generation.attention import use_grouped_sdpa
from margin.generation.generator import (
    TOKEN_CHARS,
    DecodeState,
    Encoded,
    Generator,
    GenInputs,
    _check_passages,
    _eos_ids,
    fit_passage,
)
from margin.generation.kv_cache import (
    KV,
    PromptCache,
    common_prefix_length,
    prefix_layout,
    run_suffixes,
    scatter_rows,
    unpadded_rows,
)
from margin.generation.passage_cache import (
    HeadSpan,
    PassageCache,
    encode_cached,
    usable,
    weights_stamp,
)
from margin.retrieval.passages import Passage

PREFIX_CACHE_BYTES = 64 * 2**20  # KV of recent shared prompt prefixes kept (default model: ~6)

PromptFn = Callable[[object, str, Passage | None], str]
TargetFn = Callable[[object, str], str]  # (tokenizer, answer) -> the text that follows the prompt


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


@dataclass(frozen=True)
class CausalFormat:
    """How a (question, passage) pair becomes a decoder-only prompt."""

    prompt_fn: PromptFn = field(default=default_prompt)  # (tokenizer, question, passage) -> str
    target_fn: TargetFn | None = None  # the answer as the prompt expects it; None: as given
    end_token_id: int | None = None  # ends a scored answer (a newline); None: the first EOS
    max_prompt_length: int = 2048  # a longer prompt has its passage cut (never the question)
    share_prefix: bool = True  # run the rows' common token prefix once (batch 1), not per row
    suffix_padding: float = 0.1  # rows' own suffixes batch together while pads add <= this share
    passage_cache_mb: float = 0.0  # KV of seen prompt prefixes and passages, LRU (MiB); 0: off


class CausalGenerator(Generator):
    """A decoder-only generator: the passage goes into the prompt, the answer follows it."""

    forced_bos_token_id = None
    forced_eos_token_id = None

    def __init__(self, model: torch.nn.Module, tokenizer: object, fmt: CausalFormat | None = None):
        self.model, self.tokenizer = model, tokenizer
        use_grouped_sdpa(model)  # no per-head key/value copies in masked attention (same results)
        self.fmt = fmt or CausalFormat()
        gc = model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else tokenizer.eos_token_id  # type: ignore[attr-defined]
        self.eos_token_ids = _eos_ids(eos)
        pad = gc.pad_token_id if gc.pad_token_id is not None else tokenizer.pad_token_id  # type: ignore[attr-defined]
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self.passage_cache: PassageCache | None = None
        self._stamp: int | None = None
        self.set_passage_cache(int(self.fmt.passage_cache_mb * 2**20))
        # the shared prompt prefix's KV, kept at inference (see the top); None: run every time
        self.prefix_cache: PassageCache | None = PassageCache(PREFIX_CACHE_BYTES)
        self._prefix_lock = threading.Lock()  # one fill at a time (the server's two workers)
        self._prefix_numerics: tuple | None = None

    def set_passage_cache(self, max_bytes: int) -> None:
        """Keep the KV of up to ``max_bytes`` of seen prompt prefixes and passages (LRU) for
        later prompts (margin.generation.passage_cache); 0 turns the cache off."""
        self.passage_cache = PassageCache(max_bytes) if max_bytes > 0 else None

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
        prompts = [self._prompt_ids(q, p) for q, p in pairs]
        ids = [row for row, _ in prompts]
        spans = None
        if self.passage_cache is not None and passages is not None:
            refs: dict[str, list[int]] = {}  # per question: its prompt's head, passage empty
            spans = [
                self._head_span(q, p, row, refs)
                for (q, _), (row, p) in zip(pairs, prompts, strict=True)
            ]
        longest = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):  # LEFT padding: the answer follows the prompt directly
            input_ids[i, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, longest - len(row) :] = 1
        return GenInputs(input_ids.to(self.device), mask.to(self.device), k, spans)

    def _head_ids(self, question: str, passage: Passage) -> list[int]:
        """The ids of the prompt up to the newline before the question (empty if none)."""
        text = self.fmt.prompt_fn(self.tokenizer, question, passage)
        at = text.rfind(question)
        cut = text.rfind("\n", 0, at) + 1 if at > 0 else 0
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        return self._tokenize([text[:cut]], not has_template)[0] if cut > 0 else []

    def _head_span(
        self, question: str, passage: Passage | None, ids: list[int], refs: dict[str, list[int]]
    ) -> HeadSpan | None:
        """Where the prompt ``ids`` split into template prefix | passage | question, or None.

        The head (prefix + passage) ends at the newline before the question; it is kept only
        when its ids, tokenised alone, are the first ids of the whole prompt (no BPE merge
        across the cut), so its cached KV is exactly the whole prompt's. The prefix is what the
        head shares with the same prompt's head over an empty passage.
        """
        if passage is None:
            return None
        head = self._head_ids(question, passage)
        if question not in refs:
            refs[question] = self._head_ids(question, Passage(passage.id, "", "", passage.source))
        ref = refs[question]
        prefix = 0
        while prefix < min(len(ref), len(head) - 1) and ref[prefix] == head[prefix]:
            prefix += 1
        if prefix == 0 or not 0 < len(head) < len(ids) or ids[: len(head)] != head:
            return None
        return HeadSpan(prefix, len(head))

    def _prompt_ids(
        self, question: str, passage: Passage | None
    ) -> tuple[list[int], Passage | None]:
        """The prompt's token ids and its passage, cut to fit max_prompt_length (see the top)."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        limit = self.fmt.max_prompt_length

        def ids_of(p: Passage | None) -> list[int]:
            text = self.fmt.prompt_fn(self.tokenizer, question, p)
            return self._tokenize([text], add_special_tokens=not has_template)[0]

        short = passage is None or len(passage.title) + len(passage.text) <= limit * TOKEN_CHARS
        if short and len(ids := ids_of(passage)) <= limit:  # fits: as it is (most prompts)
            return ids, passage
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
        return ids, fitted

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
        cache = self.passage_cache
        if cache is not None and inputs.spans is not None and usable(self.model, inputs.spans):
            stamp = weights_stamp(self.model)
            if stamp != self._stamp:  # new weights: nothing cached before is theirs
                cache.clear()
                self._stamp = stamp
            prompt = encode_cached(
                self._extend, cache, stamp, inputs.input_ids, inputs.attention_mask,
                inputs.spans, self.pad_token_id,  # type: ignore[arg-type]
                self.fmt.suffix_padding,
            )
            return Encoded(inputs, prompt=prompt)
        rows = unpadded_rows(inputs.input_ids, inputs.attention_mask)
        shared = common_prefix_length(rows) if self.fmt.share_prefix else 0
        ids, mask = prefix_layout(rows, shared, self.pad_token_id)  # (R, S)
        R, S = ids.shape
        prefix: list[KV] = []
        if shared:  # the common prefix once, batch 1 (or its KV from an earlier call)
            prefix = self._prefix_kv(ids[:1, :shared], mask[:1, :shared])
        # each row's own suffix on top of it, in groups of similar length (little padding)
        parts = run_suffixes(self._extend, ids, mask, shared, prefix, self.fmt.suffix_padding)
        layers, logits = scatter_rows(parts, shared, R, S)
        prompt = PromptCache(
            layers=layers,
            mask=mask,
            lengths=mask.sum(-1),
            last_tokens=ids[:, -1],  # the suffix is right-aligned: never a pad
            next_logits=logits,  # (R, V)
        )
        return Encoded(inputs, prompt=prompt)

    def _prefix_kv(self, ids: torch.Tensor, mask: torch.Tensor) -> list[KV]:
        """The KV (per layer (1, h, P, d_head)) of the shared prompt prefix ``ids`` (1, P).

        At inference (autograd off, the model in eval mode) it is run once and then read from
        ``prefix_cache``, keyed by the ids. The cache holds KV of one :meth:`_numerics` (the
        weights, their dtype and device, autocast, the attention kernel, torch's threads) and
        is emptied when they change (an optimizer step, ``load_state_dict``, ``.to``), so a hit
        is the bits a new run would give. The kept tensors are never written: ``_extend``
        copies a past into a fresh ``DynamicCache`` before appending to it. Training (autograd
        on, or train mode) runs the prefix itself and empties the cache.
        """
        cache = self.prefix_cache
        if cache is None or torch.is_grad_enabled() or self.model.training:
            if cache is not None:
                cache.clear()
            return self._extend(ids, mask, [])[0]
        numerics, key = self._numerics(), tuple(ids[0].tolist())
        with self._prefix_lock:  # a second thread waits for the fill, then reads it
            if numerics != self._prefix_numerics:  # nothing kept before is for these weights
                cache.clear()
                self._prefix_numerics = numerics
            kv = cache.get(key)
            if kv is None:
                kv = self._extend(ids, mask, [])[0]
                cache.put(key, kv)
        return kv

    def _numerics(self) -> tuple:
        """What a forward's result depends on besides its ids (see :meth:`_prefix_kv`)."""
        device = self.device
        return (
            weights_stamp(self.model),  # every parameter's storage, in-place version and dtype
            str(device),
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
            getattr(self.model.config, "_attn_implementation", None),
            torch.get_num_threads(),
        )

    def _extend(
        self, ids: torch.Tensor, mask: torch.Tensor, past: list[KV] | Cache
    ) -> tuple[list[KV], torch.Tensor]:
        """Run ``ids`` (n, w) after the cached ``past`` positions: one row's KV (P positions,
        shared by all n), or a cache of n rows taken as it is (written into).

        ``mask`` (n, P+w) covers both. Returns the cache over all P+w positions, per layer
        (n, h, P+w, d_head), and the logits (n, V) after the last position: only that position
        goes through the output layer.
        """
        if isinstance(past, Cache):
            cache = past
        else:
            n = ids.shape[0]
            past_n = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in past]
            cache = DynamicCache(ddp_cache_data=past_n) if past else DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=self._positions(mask)[:, mask.shape[1] - ids.shape[1] :],
            cache=cache,
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
