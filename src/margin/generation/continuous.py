"""Continuous batching's decode side: greedy RAG-Token questions that join and leave one running
batch of causal rows between decoding steps.

Why: ``decode_rag_token`` decodes a fixed batch from its first step to its last, so a question
that arrives meanwhile waits for the whole batch. A server that keeps the model busy instead
lets a newcomer's k (question, passage) rows join the batch at the next step and lets a finished
question's rows leave at once (margin.serving.continuous runs that loop). These pieces make it:

- :func:`regroup`: one causal :class:`DecodeState` out of rows of several. Each part's KV cache
  drops the leading columns none of its kept rows uses, is LEFT-padded to the common length
  (zeros, masked), and the parts are stacked along the batch: one copy per layer, into buffers
  with spare positions and spare rows. Position ids count real tokens only, so a row computes
  what it computed alone; only float rounding of the wider matmuls differs
  (tests/test_continuous_batching.py: the same tokens as ``RAG.ask``, log-probabilities to 1e-5).
- :func:`leave` and :func:`join`: the same, in place, copying only the rows that move. A whole
  regroup copies every running row's KV (40 rows of ~390 positions: ~0.7 GB on the default
  model, about half a decoding step's time on a CPU), and questions join and leave at most
  steps. Leaving rows' places are filled by kept rows from the end; joining rows go into the
  spare rows, right-aligned to the running cache length when they are no wider than it.
  :func:`worth_regrouping` says when a whole copy is due anyway: no room for the next
  position, or too many leading columns that no row uses any more.
- :class:`GreedyToken`: one question's RAG-Token greedy search. It is ``beam_search`` with one
  beam, step by step: the next-token distribution is the passage marginal
  log p'(y_i|x,y_<i) = logsumexp_z [log p(z|x) + log p(y_i|x,z,y_<i)] (Sec. 2.1, re-normalised as
  ``decode_rag_token`` does), the same logits processing (``process_logits``: pad banned, EOS banned
  before ``min_new_tokens``), the same ``topk`` over the running score, and the hypothesis ends
  at the first EOS or at ``max_new_tokens``. It keeps each token's per-passage log-probs, so its
  answer, marginal and provenance come from :func:`token_decoded`, as ``decode_rag_token``'s do.

Greedy only: a beam reorders its rows every step and compares hypotheses across them, so beam
search and RAG-Sequence's Thorough/Fast decoding keep running whole batches (``decode``).

    state = regroup([(running, keep_rows), (newcomers, torch.arange(n))], capacity=40)
    order = leave(state, keep)  # row j is now the row that was order[j]
    if not join(state, newcomers, rows):  # wider than the running cache, or too many rows
        state = regroup([(state, torch.arange(len(order))), (newcomers, rows)], capacity=40)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from margin.generation.decoding import DecodeConfig, Decoded, process_logits, token_decoded
from margin.generation.generator import DecodeState, Generator
from margin.generation.kv_cache import DEFAULT_ROOM, GrowingCache, GrowingLayer
from margin.marginalize import rag_token_next_logprobs

RUNNING_ROOM = 64  # the running batch's spare positions: a full copy at most every 64 steps


@torch.no_grad()
def regroup(
    parts: Sequence[tuple[DecodeState, torch.Tensor]], room: int = DEFAULT_ROOM,
    capacity: int = 0,
) -> DecodeState:
    """One causal decoding state holding rows ``rows`` of each part's state, parts in order.

    Every part must be between steps (after ``Generator.advance``: its cache holds L positions,
    its mask L + 1, the last column the token the next step reads). The parts' states are not
    modified; the result's cache is new, with ``room`` spare positions and room for at least
    ``capacity`` rows (spare rows that :func:`join` fills).
    """
    picked = []  # per part: (state, rows, first used column, used width)
    for state, rows in parts:
        picked.append((state, rows, *_used(state.attention_mask.index_select(0, rows))))
    W = max(width for *_, width in picked)  # the common cache length
    N = sum(rows.numel() for _, rows, _, _ in picked)
    layers0 = parts[0][0].cache.layers
    mask = parts[0][0].attention_mask.new_zeros(N, W + 1)  # (N, W + 1)
    buffers = []
    for i in range(len(layers0)):
        k0 = layers0[i].keys
        keys = k0.new_empty(max(N, capacity), k0.shape[1], W + room, k0.shape[3])
        values = torch.empty_like(keys)  # (N + spare, h, W + room, d_head)
        at = 0
        for state, rows, first, width in picked:
            n, layer = rows.numel(), state.cache.layers[i]
            for src, dst in ((layer.keys, keys), (layer.values, values)):
                dst[at : at + n, :, : W - width].zero_()  # left padding: masked, finite
                out = dst[at : at + n, :, W - width : W]
                torch.index_select(src[:, :, first:], 0, rows, out=out)
            at += n
        buffers.append((keys, values))
    at = 0
    for state, rows, first, width in picked:
        n = rows.numel()
        mask[at : at + n, W - width :] = state.attention_mask.index_select(0, rows)[:, first:]
        at += n

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(s, name).index_select(0, r) for s, r, *_ in picked])

    return DecodeState(
        cache=GrowingCache.over(buffers, W, rows=N),
        last_tokens=cat("last_tokens"),  # (N,)
        attention_mask=mask,
        positions=cat("positions"),  # (N,) real tokens before each row's next one
    )


@torch.no_grad()
def leave(state: DecodeState, keep: torch.Tensor) -> torch.Tensor:
    """Keep rows ``keep`` (m,), ascending, of a state from :func:`regroup`, in place.

    The kept rows at or past m move into the places of the rows that left below m; only they
    are copied. Returns ``order`` (m,): row j now holds the row that was ``order[j]``.
    """
    m = keep.numel()
    moved = keep[keep >= m]  # (j,) kept rows past the new end
    hole = torch.ones(m, dtype=torch.bool, device=keep.device)
    hole[keep[keep < m]] = False
    holes = hole.nonzero().squeeze(1)  # (j,) places below m whose rows left
    order = torch.arange(m, device=keep.device)
    order[holes] = moved
    for layer in _owned(state):
        L = layer.keys.shape[2]
        for buf in (layer._k, layer._v):
            live = buf[:, :, :L]
            live.index_copy_(0, holes, live.index_select(0, moved))
        layer.rows = m
        layer._view(L)
    state.attention_mask = state.attention_mask.index_select(0, order)
    state.last_tokens = state.last_tokens.index_select(0, order)
    state.positions = state.positions.index_select(0, order)
    return order


@torch.no_grad()
def join(state: DecodeState, other: DecodeState, rows: torch.Tensor) -> bool:
    """Append rows ``rows`` of ``other`` to a state from :func:`regroup`, in place, in its
    spare rows, right-aligned to its cache length: only they are copied. Whether they fit
    (spare rows enough, used width at most the state's cache length); if not, nothing changed.
    """
    layers = _owned(state)
    mask = other.attention_mask.index_select(0, rows)
    first, width = _used(mask)
    n, m, L = state.last_tokens.numel(), rows.numel(), layers[0].keys.shape[2]
    if n + m > layers[0]._k.shape[0] or width > L:
        return False
    for layer, theirs in zip(layers, other.cache.layers, strict=True):
        for src, buf in ((theirs.keys, layer._k), (theirs.values, layer._v)):
            buf[n : n + m, :, : L - width].zero_()  # left padding: masked, finite
            torch.index_select(src[:, :, first:], 0, rows, out=buf[n : n + m, :, L - width : L])
        layer.rows = n + m
        layer._view(L)
    padded = mask.new_zeros(m, L + 1)
    padded[:, L - width :] = mask[:, first:]
    state.attention_mask = torch.cat([state.attention_mask, padded])
    state.last_tokens = torch.cat([state.last_tokens, other.last_tokens.index_select(0, rows)])
    state.positions = torch.cat([state.positions, other.positions.index_select(0, rows)])
    return True


def worth_regrouping(state: DecodeState) -> bool:
    """Whether a running state should be copied afresh (:func:`regroup`) before its next step:
    its cache has no room for the next position, or an eighth of it (32 positions at least)
    is leading columns that no row uses any more (the rows that needed them left)."""
    layer = state.cache.layers[0]
    L = layer.keys.shape[2]
    first, _ = _used(state.attention_mask)
    return L + 1 > layer._k.shape[2] or first >= max(32, L // 8)  # type: ignore[union-attr]


def _used(mask: torch.Tensor) -> tuple[int, int]:
    """The first cache column any row of ``mask`` (n, L + 1) uses, and the used width."""
    used = mask.any(0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1] - 1
    return first, mask.shape[1] - 1 - first


def _owned(state: DecodeState) -> list[GrowingLayer]:
    layers = state.cache.layers
    if not all(isinstance(x, GrowingLayer) and x._owns_views() for x in layers):
        raise ValueError("leave/join need a state whose cache regroup() built")
    return layers  # type: ignore[return-value]


class GreedyToken:
    """One question's greedy RAG-Token search, advanced one step at a time by the caller."""

    def __init__(self, gen: Generator, doc_logprior: torch.Tensor, cfg: DecodeConfig):
        """``doc_logprior`` (k,) log p(z|x) of the question's k passages; ``cfg`` its decoding
        (``num_beams`` 1)."""
        self.gen, self.cfg = gen, cfg
        self.prior = doc_logprior.float()[None]  # (1, k)
        self.k = self.prior.shape[1]
        self.score = torch.zeros(1, 1, device=self.prior.device)  # Σ processed log p'
        self.tokens: list[int] = []  # generated so far, EOS kept
        self.track: list[torch.Tensor] = []  # per token: log p(y_i|x,z,y_<i) (k,)
        self.done = False
        eos = gen.eos_token_ids
        self._eos = torch.tensor(eos, dtype=torch.long, device=self.prior.device)
        self._candidates = max(2, 1 + len(eos))  # beam_search's K for one beam

    def step(self, step_logprobs: torch.Tensor) -> int:
        """Take the next token from the question's k rows' log-probs (k, V); returns it."""
        t, cfg = len(self.tokens), self.cfg
        marg = rag_token_next_logprobs(self.prior, step_logprobs[None])  # (1, V)
        raw = F.log_softmax(marg, -1)[:, None]  # (1, 1, V) as decode_rag_token re-normalises
        proc, _ = process_logits(raw, t, self.gen, cfg)
        acc = (proc + self.score[:, :, None]).view(1, -1)  # (1, V)
        cand_score, tok = acc.topk(self._candidates, dim=-1)  # (1, K)
        token = int(tok[0, 0])
        self.score = cand_score[:, :1]
        self.tokens.append(token)
        self.track.append(step_logprobs[:, token])  # (k,)
        self.done = bool(torch.isin(tok[0, 0], self._eos)) or t + 1 >= cfg.max_new_tokens
        return token

    def decoded(self) -> Decoded:
        """The finished hypothesis with its marginal and provenance (``decode_rag_token``'s)."""
        L, n = self.cfg.max_new_tokens, len(self.tokens)
        tokens = torch.full((1, 1, L), self.gen.pad_token_id, dtype=torch.long)
        tokens[0, 0, :n] = torch.tensor(self.tokens, dtype=torch.long)
        track = torch.zeros(1, 1, L, self.k)  # (1, 1, L, k)
        track[0, 0, :n] = torch.stack(self.track).float().cpu()
        lengths = torch.tensor([[n]])
        [out] = token_decoded(self.gen, self.prior.cpu(), tokens, lengths,
                              torch.ones(1, 1, dtype=torch.bool), track)
        return out
