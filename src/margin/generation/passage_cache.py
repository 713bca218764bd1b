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

How a batch runs. Each distinct block is looked up once. A template prefix that missed runs
alone (batch 1); the passages that missed run together, one forward per group of similar length
on top of their prefix (a passage retrieved for several questions of the batch runs once), and
go into the cache; then the rows' questions run batched on the (prefix + passage) blocks, laid
out ``[head][pad ...][question]`` straight into the buffers the questions' KV is written into.
A warm cache hands back the bits the cold one computed and used, so asking the same batch again
gives bit-identical logits (tests/test_passage_cache.py). A passage's KV carries the float
rounding of the batch it first missed in, as the uncached ``encode``'s rows carry their batch's:
against the uncached path, and between two histories of the cache, the logits agree to float
rounding (the tests: atol 1e-5) and the decoded tokens are the same.

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
from transformers.cache_utils import Cache

from margin.generation.kv_cache import (
    KV,
    GrowingCache,
    PromptCache,
    length_groups,
    prefix_layout,
    run_suffixes,
    scatter_rows,
    unpadded_rows,
)

# The questions' padding allowance: a question is a few tokens reading a long head, so a padded
# question token costs far less than another forward over the heads.
QUESTION_SLACK = 0.5
Extend = Callable[[torch.Tensor, torch.Tensor, list[KV] | Cache], tuple[list[KV], torch.Tensor]]


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

    def evict(self, drop: Callable[[tuple], bool]) -> int:
        """Remove the entries whose key ``drop`` accepts; how many. ``evict(is_passage)`` keeps
        the template prefixes (a process that has answered before, asked of new passages)."""
        with self._lock:
            gone = [key for key in self._entries if drop(key)]
            for key in gone:
                self.bytes -= kv_bytes(self._entries.pop(key))
        return len(gone)


def is_passage(key: tuple) -> bool:
    """Whether a cache key is a passage's block (weights, prefix ids, passage ids), not a
    template prefix's (weights, prefix ids)."""
    return len(key) == 3


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
    slack: float = 0.1,
) -> PromptCache:
    """Every row's prompt into a :class:`PromptCache`, its prefix and passage from ``cache``.

    ``extend(ids (n, w), mask (n, P+w), past)`` is ``CausalGenerator._extend``: it runs ids after
    the cached positions ``past`` (1 row's KV, shared by all n, or a ready cache of n rows) and
    returns the KV over all P+w positions and the logits after the last one. Rows are laid out
    ``[prefix + passage][pad ...][question]``. ``slack``: the share of padding a batched forward
    may add (:func:`length_groups`).
    """
    rows = unpadded_rows(input_ids, attention_mask)
    keys, blocks = _heads(extend, cache, stamp, rows, spans, slack)
    R, dev = len(rows), input_ids.device
    Sh = max(s.head for s in spans)  # the head block's width
    tails = [r[s.head :] for r, s in zip(rows, spans, strict=True)]
    S = Sh + max(len(t) for t in tails)
    ids = torch.full((R, S), pad_token_id, dtype=torch.long, device=dev)
    mask = torch.zeros((R, S), dtype=torch.long, device=dev)
    for i, (r, s, t) in enumerate(zip(rows, spans, tails, strict=True)):
        ids[i, : s.head], mask[i, : s.head] = r[: s.head], 1
        ids[i, S - len(t) :], mask[i, S - len(t) :] = t, 1
    parts = []
    for group in length_groups([len(t) for t in tails], max(slack, QUESTION_SLACK)):
        group = sorted(group)  # rows in order: one group needs no reordering afterwards
        g = torch.tensor(group, device=dev)
        w = max(len(tails[i]) for i in group)
        # the group's heads, written once into buffers with room for its questions
        heads = _stacked([[blocks[key] for key in keys[i]] for i in group], Sh, w)
        cols = torch.cat([torch.arange(Sh), torch.arange(S - w, S)]).to(dev)
        past = GrowingCache.over(heads, Sh)  # the questions' KV is written into its room
        parts.append((g, *extend(ids[g][:, S - w :], mask[g][:, cols], past)))
    layers, logits = scatter_rows(parts, Sh, R, S)
    return PromptCache(layers, mask, mask.sum(-1), ids[:, -1], logits)


def _heads(
    extend: Extend,
    cache: PassageCache,
    stamp: int,
    rows: Sequence[torch.Tensor],
    spans: Sequence[HeadSpan],
    slack: float,
) -> tuple[list[tuple[tuple, tuple]], dict[tuple, list[KV]]]:
    """Each row's (prefix key, passage key) and every key's KV block (per layer (1, h, n, d)).

    Each distinct block is looked up once. A prefix that missed runs alone (batch 1); the
    passages that missed run together on top of their prefix, in groups of similar length, and
    go into ``cache``: a passage's KV is the bits of the batch where it first missed.
    """
    keys: list[tuple[tuple, tuple]] = []
    blocks: dict[tuple, list[KV]] = {}
    missed: dict[tuple, dict[tuple, torch.Tensor]] = {}  # prefix key -> passage key -> its row
    for row, span in zip(rows, spans, strict=True):
        prefix_key = (stamp, tuple(row[: span.prefix].tolist()))
        passage_key = (*prefix_key, tuple(row[span.prefix : span.head].tolist()))
        keys.append((prefix_key, passage_key))
        if prefix_key not in blocks:
            blocks[prefix_key] = _block(extend, cache, prefix_key, row[: span.prefix])
        waiting = missed.setdefault(prefix_key, {})
        if passage_key in blocks or passage_key in waiting:
            continue
        if (kv := cache.get(passage_key)) is not None:
            blocks[passage_key] = kv
        else:
            waiting[passage_key] = row[: span.head]  # its prefix, then the passage
    for prefix_key, waiting in missed.items():
        if not waiting:
            continue
        prefix = blocks[prefix_key]
        P = prefix[0][0].shape[2]
        names, heads = list(waiting), list(waiting.values())
        ids, mask = prefix_layout(heads, P, pad_token_id=0)  # pads are masked
        for g, out, _ in run_suffixes(extend, ids, mask, P, prefix, slack):
            width = out[0][0].shape[2]  # P + the group's longest passage
            for j, i in enumerate(g.tolist()):
                at = width - (len(heads[i]) - P)  # the passage, right-aligned
                kv = [(k[j : j + 1, :, at:].clone(), v[j : j + 1, :, at:].clone()) for k, v in out]
                blocks[names[i]] = kv
                cache.put(names[i], kv)
    return keys, blocks


def _block(extend: Extend, cache: PassageCache, key: tuple, ids: torch.Tensor) -> list[KV]:
    """The KV (per layer (1, h, n, d_head)) of a prompt prefix ``ids`` (n,), run alone once,
    then read from ``cache``."""
    kv = cache.get(key)
    if kv is None:
        ones = torch.ones((1, len(ids)), dtype=torch.long, device=ids.device)
        out, _ = extend(ids[None], ones, [])
        kv = [(k.clone(), v.clone()) for k, v in out]
        cache.put(key, kv)
    return kv


def _stacked(heads: Sequence[Sequence[list[KV]]], width: int, room: int) -> list[KV]:
    """Rows' blocks (each row: its prefix's then its passage's KV) laid end to end, per layer
    ``(n, h, width + room, d_head)``: a row's blocks from column 0, zeros after them to
    ``width`` (pads, masked), the last ``room`` columns left for the questions. A prefix that
    every row shares (the usual case) is written once for all of them."""
    shared = all(row[0] is heads[0][0] for row in heads)
    out = []
    for layer in range(len(heads[0][0])):
        k0 = heads[0][0][layer][0]
        keys = k0.new_empty(len(heads), k0.shape[1], width + room, k0.shape[3])
        values = torch.empty_like(keys)
        P = k0.shape[2] if shared else 0
        if shared:
            keys[:, :, :P], values[:, :, :P] = k0, heads[0][0][layer][1]
        keys[:, :, P:width], values[:, :, P:width] = 0, 0
        for j, row in enumerate(heads):
            at = P
            for block in row[1:] if shared else row:
                k, v = block[layer]
                n = k.shape[2]
                keys[j, :, at : at + n], values[j, :, at : at + n] = k[0], v[0]
                at += n
        out.append((keys, values))
    return out
