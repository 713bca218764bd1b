"""The passage KV cache: a causal prompt's prefix and passage are run once per passage, not per ask.

Why: margin's causal prompt is ``template prefix + passage + question`` (the few-shot
instruction and demonstrations, ~300 tokens on the default model, then ``Context: Title: ...``,
then ``Question: ...\\nAnswer:``). In a decoder the keys and values of a position depend only on
the tokens up to it, so the KV of the prefix and of the passage does not depend on the question:
a passage retrieved before (a popular passage, the same question asked again, the server's
traffic) needs only its question's tokens run. :class:`PassageCache` keeps those KV blocks, LRU,
bounded in bytes; :func:`encode_cached` is ``CausalGenerator.encode`` on top of it.

What makes it exact. Each row of a prompt carries a :class:`HeadSpan`: the row's token ids split
at ``prefix | passage | question``. ``CausalGenerator.build_inputs`` finds the split from the
rendered prompt (the passage part ends at the newline before the question) and keeps it only if
the ids of the prompt cut there, tokenised alone, ARE the first ids of the whole prompt's
(a BPE merge across the cut would change them; then the row has no span and the batch takes the
uncached path). The cache's keys are those token ids themselves (and the model's weights, below),
so whatever decided the text (the template, the index, a passage cut to fit the prompt) is in the
key; two indexes holding the same passage share its entry, and nothing stale can be read.

The model is in the key as a weights stamp (:func:`weights_stamp`): every parameter's storage and
version counter, which every in-place update bumps (optimizer steps, ``load_state_dict``), so a
cache on a generator that is being trained never hands out KV of older weights. The cache is
only read and written with autograd off and the model in eval mode.

The arithmetic of a cached row is always the same, cold or warm: the template prefix runs alone
(batch 1), each passage runs alone on top of it (batch 1), and the rows' questions run batched on
the stacked (prefix + passage) blocks, laid out ``[head][pad ...][question]``. So a cold and a
warm cache give bit-identical logits (tests/test_passage_cache.py); against the uncached
``encode`` (which runs passage and question in one batched forward) the logits agree to float
rounding (the same matmuls in other shapes), and the decoded answers are the same.

Memory: one cached token costs layers x 2 x kv_heads x head_dim x 4 bytes (fp32); on the default
SmolLM2-135M (30 layers, 3 KV heads of 64) that is 46,080 bytes, so a 150-token passage is
6.9 MB and the ~300-token template prefix, stored once, 14 MB (docs/performance.md).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from margin.generation.kv_cache import KV, PromptCache, scatter_rows, unpadded_rows

Extend = Callable[[torch.Tensor, torch.Tensor, list[KV]], tuple[list[KV], torch.Tensor]]


@dataclass(frozen=True)
class HeadSpan:
    """Where a causal prompt row's ids split: ``ids[:prefix]`` the template before the passage,
    ``ids[prefix:head]`` the passage, ``ids[head:]`` the question (at least one token each)."""

    prefix: int  # tokens before the passage (the shared template prefix)
    head: int  # tokens before the question (prefix + passage)


class PassageCache:
    """KV blocks of token spans, least recently used evicted first, at most ``max_bytes``.

    Safe to share between threads (``margin serve`` prefills on two workers).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, list[KV]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> list[KV] | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return kv

    def put(self, key: tuple, kv: list[KV]) -> None:
        """Keep ``kv`` (per layer (1, h, n, d_head)) unless it alone is over the bound."""
        size = kv_bytes(kv)
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            while self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= kv_bytes(old)
            self._entries[key] = kv
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def kv_bytes(kv: Sequence[KV]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def weights_stamp(model: torch.nn.Module) -> int:
    """A number that changes when any parameter is replaced or written in place."""
    return hash(tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters()))


def usable(model: torch.nn.Module, spans: Sequence[HeadSpan | None] | None) -> bool:
    """Whether a batch may go through the cache: inference, and every row split exactly."""
    return (
        spans is not None
        and all(s is not None for s in spans)
        and not torch.is_grad_enabled()
        and not model.training
    )


def encode_cached(
    extend: Extend,
    cache: PassageCache,
    stamp: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    spans: Sequence[HeadSpan],
    pad_token_id: int,
) -> PromptCache:
    """Every row's prompt into a :class:`PromptCache`, its prefix and passage from ``cache``.

    ``extend(ids (n, w), mask (n, P+w), past)`` is ``CausalGenerator._extend``: it runs ids after
    the cached positions ``past`` (1 or n rows) and returns the KV over all P+w positions and the
    logits after the last one. Rows are laid out ``[prefix + passage][pad ...][question]``.
    """
    rows = unpadded_rows(input_ids, attention_mask)
    heads = [_head(extend, cache, stamp, r, s) for r, s in zip(rows, spans, strict=True)]
    R, dev = len(rows), input_ids.device
    Sh = max(s.head for s in spans)  # the head block's width
    tails = [r[s.head :] for r, s in zip(rows, spans, strict=True)]
    w = max(len(t) for t in tails)
    S = Sh + w
    ids = torch.full((R, S), pad_token_id, dtype=torch.long, device=dev)
    mask = torch.zeros((R, S), dtype=torch.long, device=dev)
    for i, (r, s, t) in enumerate(zip(rows, spans, tails, strict=True)):
        ids[i, : s.head], mask[i, : s.head] = r[: s.head], 1
        ids[i, S - len(t) :], mask[i, S - len(t) :] = t, 1
    past = []  # per layer the heads, stacked and zero-padded: (R, h, Sh, d_head)
    for layer in range(len(heads[0])):
        k0 = heads[0][layer][0]
        keys = k0.new_zeros(R, k0.shape[1], Sh, k0.shape[3])
        values = torch.zeros_like(keys)
        for i, kv in enumerate(heads):
            n = kv[layer][0].shape[2]
            keys[i, :, :n], values[i, :, :n] = kv[layer][0][0], kv[layer][1][0]
        past.append((keys, values))
    parts = []
    for group in _tail_groups([len(t) for t in tails]):
        g = torch.tensor(group, device=dev)
        wg = len(tails[group[0]])
        cols = torch.cat([torch.arange(Sh), torch.arange(S - wg, S)]).to(dev)
        group_past = [(k.index_select(0, g), v.index_select(0, g)) for k, v in past]
        parts.append((g, *extend(ids[g][:, S - wg :], mask[g][:, cols], group_past)))
    layers, logits = scatter_rows(parts, Sh, R, S)
    return PromptCache(layers, mask, mask.sum(-1), ids[:, -1], logits)


def _tail_groups(lengths: list[int]) -> list[list[int]]:
    """Rows grouped by their question's length (no padding within a group), longest first."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [groups[n] for n in sorted(groups, reverse=True)]


def _head(
    extend: Extend, cache: PassageCache, stamp: int, row: torch.Tensor, span: HeadSpan
) -> list[KV]:
    """The KV (per layer (1, h, span.head, d_head)) of a row's prefix and passage: the prefix
    alone at batch 1, the passage alone on top of it, each from ``cache`` when it was seen."""
    prefix_ids = tuple(row[: span.prefix].tolist())
    passage_ids = tuple(row[span.prefix : span.head].tolist())
    prefix = _block(extend, cache, (stamp, prefix_ids), row[: span.prefix], [])
    passage = _block(extend, cache, (stamp, prefix_ids, passage_ids), row[: span.head], prefix)
    return [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in
            zip(prefix, passage, strict=True)]


def _block(
    extend: Extend, cache: PassageCache, key: tuple, ids: torch.Tensor, past: list[KV]
) -> list[KV]:
    """The KV of ``ids``' positions after ``past`` (1 row): run once, then read from ``cache``."""
    kv = cache.get(key)
    if kv is None:
        P = past[0][0].shape[2] if past else 0
        new = ids[None, P:]  # (1, n)
        out, _ = extend(new, torch.ones((1, len(ids)), dtype=torch.long, device=ids.device), past)
        kv = [(k[:, :, P:].clone(), v[:, :, P:].clone()) for k, v in out]  # (1, h, n, d_head)
        cache.put(key, kv)
    return kv
