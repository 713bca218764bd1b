"""Continuous batching's decode side: greedy RAG-Token questions that join and leave one running
batch of causal rows between decoding steps.

Why: ``decode_rag_token`` decodes a fixed batch from its first step to its last, so a question
that arrives meanwhile waits for the whole batch. A server that keeps the model busy instead
lets a newcomer's k (question, passage) rows join the batch at the next step and lets a finished
question's rows leave at once (margin.serving.continuous runs that loop). Two pieces make it:

- :func:`regroup`: one causal :class:`DecodeState` out of rows of several. Each part's KV cache
  drops the leading columns none of its kept rows uses, is LEFT-padded to the common length
  (zeros, masked), and the parts are stacked along the batch: one copy per layer. Position ids
  count real tokens only, so a row computes what it computed alone; only float rounding of the
  wider matmuls differs (tests/test_continuous_batching.py: the same tokens as ``RAG.ask``,
  log-probabilities to 1e-5).
- :class:`GreedyToken`: one question's RAG-Token greedy search. It is ``beam_search`` with one
  beam, step by step: the next-token distribution is the passage marginal
  log p'(y_i|x,y_<i) = logsumexp_z [log p(z|x) + log p(y_i|x,z,y_<i)] (Sec. 2.1, re-normalised as
  ``decode_rag_token`` does), the same logits processing (``process_logits``: pad banned, EOS banned
  before ``min_new_tokens``), the same ``topk`` over the running score, and the hypothesis ends
  at the first EOS or at ``max_new_tokens``. It keeps each token's per-passage log-probs, so its
  answer, marginal and provenance come from :func:`token_decoded`, as ``decode_rag_token``'s do.

Greedy only: a beam reorders its rows every step and compares hypotheses across them, so beam
search and RAG-Sequence's Thorough/Fast decoding keep running whole batches (``decode``).

    state = regroup([(running, keep_rows), (newcomers, torch.arange(n))])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from margin.generation.decoding import DecodeConfig, Decoded, process_logits, token_decoded
from margin.generation.generator import DecodeState, Generator
from margin.generation.kv_cache import DEFAULT_ROOM, GrowingCache
from margin.marginalize import rag_token_next_logprobs


@torch.no_grad()
def regroup(
    parts: Sequence[tuple[DecodeState, torch.Tensor]], room: int = DEFAULT_ROOM
) -> DecodeState:
    """One causal decoding state holding rows ``rows`` of each part's state, parts in order.

    Every part must be between steps (after ``Generator.advance``: its cache holds L positions,
    its mask L + 1, the last column the token the next step reads). The parts' states are not
    modified; the result's cache is new, with ``room`` spare positions.
    """
    picked = []  # per part: (state, rows, first used column, used width)
    for state, rows in parts:
        mask = state.attention_mask.index_select(0, rows)  # (n, L + 1)
        used = mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1] - 1
        picked.append((state, rows, first, mask.shape[1] - 1 - first))
    W = max(width for *_, width in picked)  # the common cache length
    N = sum(rows.numel() for _, rows, _, _ in picked)
    layers0 = parts[0][0].cache.layers
    mask = parts[0][0].attention_mask.new_zeros(N, W + 1)  # (N, W + 1)
    buffers = []
    for i in range(len(layers0)):
        k0 = layers0[i].keys
        keys = k0.new_empty(N, k0.shape[1], W + room, k0.shape[3])  # (N, h, W + room, d_head)
        values = torch.empty_like(keys)
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
        cache=GrowingCache.over(buffers, W),
        last_tokens=cat("last_tokens"),  # (N,)
        attention_mask=mask,
        positions=cat("positions"),  # (N,) real tokens before each row's next one
    )


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
