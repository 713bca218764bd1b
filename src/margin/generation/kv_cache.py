"""A KV cache that is copied once and grows in place: for scoring and decoding on cached prompts.

Why: RAG scores and decodes B questions x k passages (x hypotheses, x beams) rows on top of the
cached prompts (margin.generation.generator.PromptCache). transformers' ``DynamicCache`` built from
given
keys/values copies them (``torch.cat`` onto an empty tensor), and then copies the whole cache
again at every step to append one position. Each copy lands in freshly allocated memory. On
the default model, Thorough Decoding's scoring pass at batch 8 spent about half its time in
``index_select`` and ``cat``. That pass runs 105 rows of a 389-token prompt. :class:`GrowingLayer`
gathers the rows once, straight into a buffer with spare positions. New positions are written
into that buffer; ``keys``/``values`` are views of its filled part, so attention reads exactly
what ``DynamicLayer`` would hand it.

Example::

    cache = GrowingCache(prompt_layers, rows=torch.tensor([0, 0, 3]), room=8)
    out = model(input_ids=targets, cache=cache, use_cache=True)  # no copy of the prompt rows
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

DEFAULT_ROOM = 16  # spare positions beyond the cached ones (a short answer fits)


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
