"""The KV caches the generators keep between passes, and how cached prompt rows are laid out.

- :class:`GrowingCache`: a KV cache that is copied once and grows in place, for scoring and
  decoding on cached prompts (below).
- :class:`PromptCache`: a causal model's prompts, run once (margin.generation.causal), laid out
  ``[shared prefix][pad ...][own suffix]`` by :func:`prefix_layout` so the shared prefix is run
  once for the whole batch.
- :class:`StartCache`: a seq2seq model's decoder-start step, run once per context row
  (margin.generation.seq2seq).

Why a cache that grows in place: RAG scores and decodes B questions x k passages (x hypotheses, x
beams) rows on top of the cached prompts (:class:`PromptCache`). transformers' ``DynamicCache``
built from given keys/values copies them (``torch.cat`` onto an empty tensor), and then copies
the whole cache again at every step to append one position. Each copy lands in freshly allocated
memory. On the default model, Thorough Decoding's scoring pass at batch 8 spent about half its
time in ``index_select`` and ``cat``. That pass runs 105 rows of a 389-token prompt.
:class:`GrowingLayer` gathers the rows once, straight into a buffer with spare positions. New
positions are written into that buffer; ``keys``/``values`` are views of its filled part, so
attention reads exactly what ``DynamicLayer`` would hand it.

Example::

    cache = GrowingCache(prompt_layers, rows=torch.tensor([0, 0, 3]), room=8)
    out = model(input_ids=targets, cache=cache, use_cache=True)  # no copy of the prompt rows
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

DEFAULT_ROOM = 16  # spare positions beyond the cached ones (a short answer fits)
KV = tuple[torch.Tensor, torch.Tensor]  # one layer's cached (keys, values), (n, h, S, d_head)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` over a buffer with spare positions; ``update`` writes into them.

    ``keys``/``values`` (n, h, S, d_head) are always views of the buffers' first S positions.
    When the room runs out, the buffers are reallocated with ``room`` more spare positions.
    Anything that replaces ``keys``/``values`` from outside (transformers' ``crop``,
    ``batch_select_indices``) is adopted on the next update.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor | None = None,
        room: int = DEFAULT_ROOM,
    ):
        super().__init__()
        self.room = max(int(room), 0)
        self.device, self.is_initialized = keys.device, True
        self._k = _gathered(keys, rows, self.room)
        self._v = _gathered(values, rows, self.room)
        self._view(keys.shape[-2])

    def _view(self, length: int) -> None:
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def _owns_views(self) -> bool:
        return (
            self.keys is not None
            and self.keys.data_ptr() == self._k.data_ptr()
            and self.keys.shape[0] == self._k.shape[0]
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        length = self.keys.shape[-2]
        if not self._owns_views() or length + new > self._k.shape[-2]:
            room = new + max(self.room, DEFAULT_ROOM)
            self._k = _gathered(self.keys, None, room)
            self._v = _gathered(self.values, None, room)
        self._k[:, :, length : length + new] = key_states
        self._v[:, :, length : length + new] = value_states
        self._view(length + new)
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` (beam reordering, or finished rows leaving), with the room."""
        length = self.keys.shape[-2]
        room = self._k.shape[-2] - length if self._owns_views() else self.room
        idx = beam_idx.to(self.device)
        self._k = _gathered(self.keys, idx, room)
        self._v = _gathered(self.values, idx, room)
        self._view(length)


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`GrowingLayer`: rows ``rows`` (all if None) of the given
    per-layer (keys, values) (R, h, S, d_head), copied once; the given tensors are never written."""

    def __init__(
        self,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rows: torch.Tensor | None = None,
        room: int = DEFAULT_ROOM,
    ):
        Cache.__init__(self, layers=[GrowingLayer(k, v, rows, room) for k, v in layers])

    @classmethod
    def over(cls, buffers: Sequence[KV], length: int) -> GrowingCache:
        """A cache over per-layer (keys, values) buffers (n, h, length + room, d_head) that the
        caller filled up to ``length``, taken as they are (no copy); the rest is room."""
        cache = cls([(k[:, :, :0], v[:, :, :0]) for k, v in buffers], room=0)
        for layer, (k, v) in zip(cache.layers, buffers, strict=True):
            layer._k, layer._v, layer.room = k, v, k.shape[-2] - length  # type: ignore[union-attr]
            layer._view(length)  # type: ignore[union-attr]
        return cache


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
        pick = None if is_identity(rows, self.mask.shape[0]) else rows
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
        pick = None if is_identity(rows, self.next_logits.shape[0]) else rows
        own = GrowingCache(self.own, pick) if with_start else DynamicCache()
        return EncoderDecoderCache(own, GrowingCache(self.cross, pick, room=0))


# -- the shared prompt prefix layout of PromptCache (causal) -----------------------------------


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


def scatter_rows(
    parts: Sequence[tuple[torch.Tensor, list[KV], torch.Tensor]], shared: int, R: int, S: int
) -> tuple[list[KV], torch.Tensor]:
    """Put the caches and logits of row groups back in row order, in one (R, S) layout.

    ``parts`` holds (rows (n,), cache (n, h, shared + w, d_head) per layer, logits (n, V)) per
    group. A group of suffix width w computed the columns [prefix][last w]; the columns between
    are pads of each of its rows (masked) and stay zero.
    """
    if len(parts) == 1:  # one group of every row: already the full layout, maybe reordered
        rows, kv, logits = parts[0]
        if is_identity(rows, R):
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


def run_suffixes(
    extend: Callable[[torch.Tensor, torch.Tensor, list[KV]], tuple[list[KV], torch.Tensor]],
    ids: torch.Tensor,
    mask: torch.Tensor,
    shared: int,
    prefix: list[KV],
    slack: float,
) -> list[tuple[torch.Tensor, list[KV], torch.Tensor]]:
    """Each row's own suffix of a :func:`prefix_layout` batch ``ids``/``mask`` (R, S), run on
    top of the shared prefix's KV ``prefix`` (1 row, ``shared`` positions) in groups of similar
    length (:func:`length_groups`). ``extend(ids (n, w), mask (n, shared + w), prefix)`` runs one
    group. Per group: its rows (n,), the KV per layer (n, h, shared + w, d_head) and the logits
    after each row's last token (n, V): :func:`scatter_rows`'s parts."""
    R, S = ids.shape
    own = mask[:, shared:].sum(-1).tolist()  # each row's real suffix tokens
    parts = []
    for group in length_groups(own, slack):
        g = torch.tensor(group, device=ids.device)
        w = max(own[i] for i in group)  # the group's suffix width: columns S-w .. S-1
        cols = torch.cat([torch.arange(shared), torch.arange(S - w, S)]).to(ids.device)
        parts.append((g, *extend(ids[g][:, S - w :], mask[g][:, cols], prefix)))
    return parts


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


def _gathered(x: torch.Tensor, rows: torch.Tensor | None, room: int) -> torch.Tensor:
    """A new (M, h, S + room, d) buffer whose first S positions hold rows ``rows`` of ``x``
    (n, h, S, d), gathered straight into it (one copy)."""
    n, h, s, d = x.shape
    m = n if rows is None else rows.numel()
    buf = x.new_empty(m, h, s + room, d)
    if rows is None:
        buf[:, :, :s].copy_(x)
    elif x.requires_grad and torch.is_grad_enabled():  # training: out= is not differentiable
        buf[:, :, :s].copy_(x.index_select(0, rows))
    else:
        torch.index_select(x, 0, rows, out=buf[:, :, :s])
    return buf


def is_identity(order: torch.Tensor, n: int) -> bool:
    """Whether picking rows ``order`` (M,) out of ``n`` keeps every row, each where it is."""
    return order.numel() == n and torch.equal(order, torch.arange(n, device=order.device))
