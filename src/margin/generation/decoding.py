"""The paper's decoding (Sec. 2.5), batched over questions, passages and beams at once.

- RAG-Token is ordinary beam search whose next-token distribution is the marginal
  p'(y_i|x,y_<i) = Σ_z p(z|x) p(y_i|x,z,y_<i): every step runs the generator on
  (questions x passages x beams) rows in one forward and sums the passages out; each hypothesis
  keeps its per-passage token scores from the search, for its marginal score and provenance.
- RAG-Sequence runs one beam search per passage (all questions x passages x beams batched) and
  pools each question's distinct hypotheses Y. Thorough Decoding scores every y in Y under every
  passage: pairs the passage's own beam produced reuse the beam's score, and only the missing
  pairs get one extra teacher-forced pass, on the encoder outputs the beam search already has.
  Fast Decoding skips the extra pass and takes p(y|x,z) ≈ 0 where z's beam did not produce y.

Nothing retrieves again and no Python loop runs per question around a model call. The beam search
is the one transformers 5.x runs (top 2·beams continuations, finished hypotheses ranked by
Σ log p / len^length_penalty, the same ``early_stopping`` heuristics), so with the same inputs
the two produce the same tokens; tests/test_transformers_parity.py holds us to it.

Scores: log p(y|x,z) is the generator's own log-probability of the generated tokens. A token
forced by ``forced_bos_token_id`` is part of the prompt and is not scored (transformers'
``exclude_bos_score``); a forced EOS at the length limit is scored with the model's probability.
The pad token is never generated unless it is also an EOS token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from margin.errors import MarginError
from margin.generation.generator import Encoded, Generator, GenInputs
from margin.marginalize import (
    rag_sequence_logprob,
    rag_token_logprob,
    rag_token_next_logprobs,
    scores_log_prior,
    sequence_doc_posterior,
    token_doc_posterior,
)

_NEG = -1.0e9  # transformers' "impossible" score: large but finite, so sums stay ordered


@dataclass(frozen=True)
class DecodeConfig:
    """Options of the paper's decoding; defaults follow transformers' beam search."""

    num_beams: int = 4  # beams per question (RAG-Token) or per passage (RAG-Sequence); 1 = greedy
    max_new_tokens: int = 32  # generated tokens at most, EOS included
    min_new_tokens: int = 0  # EOS is banned before this many tokens
    length_penalty: float = 1.0  # finished beams rank by Σ log p / len ** length_penalty
    early_stopping: bool | Literal["never"] = False  # transformers' beam-search stopping rule
    num_return_sequences: int = 1  # size of the n-best list per question


@dataclass(frozen=True)
class Hypothesis:
    """One answer with its marginal score and provenance."""

    token_ids: tuple[int, ...]  # generated tokens (no prompt/decoder start), EOS kept if produced
    text: str  # decoded, special tokens skipped
    logprob: float  # log p(y|x) marginalised under the mode (Fast: over passages whose beam had y)
    doc_posterior: tuple[float, ...]  # p(z|x,y) for the k passages (RAG-Token: per-token average)
    token_docs: tuple[int, ...] | None  # RAG-Token: argmax_z p(z|x,y_i,y_<i) per token


@dataclass(frozen=True)
class Decoded:
    """The decoding of one question: an n-best list, best first."""

    nbest: tuple[Hypothesis, ...]

    @property
    def best(self) -> Hypothesis:
        return self.nbest[0]


@dataclass
class _Beams:
    """Finished hypotheses of G beam-search groups, best first."""

    tokens: torch.Tensor  # (G, nb, L) padded with pad_token_id
    lengths: torch.Tensor  # (G, nb) generated tokens, EOS included; 0 for an unfilled slot
    scores: torch.Tensor  # (G, nb) Σ processed log p / len ** length_penalty
    raw: torch.Tensor  # (G, nb) Σ raw model log p (forced BOS excluded)
    filled: torch.Tensor  # (G, nb) bool, False where no hypothesis finished in that slot
    track: torch.Tensor | None = None  # (G, nb, L, D) per-token values of ``track``, if given

    def cpu(self) -> _Beams:
        fields = (self.tokens, self.lengths, self.scores, self.raw, self.filled, self.track)
        return _Beams(*(t.cpu() if t is not None else None for t in fields))


def process_logits(
    raw: torch.Tensor, t: int, gen: Generator, cfg: DecodeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the logits processors at step t; return (processed, raw-as-scored) (..., V)."""
    proc = raw.clone()
    eos = list(gen.eos_token_ids)
    if gen.pad_token_id not in eos:
        proc[..., gen.pad_token_id] = float("-inf")
    if t < cfg.min_new_tokens and eos:
        proc[..., eos] = float("-inf")
    scored = raw
    if t == 0 and gen.forced_bos_token_id is not None:
        proc = torch.full_like(raw, float("-inf"))
        proc[..., gen.forced_bos_token_id] = 0.0
        scored = torch.zeros_like(raw)  # a forced BOS is prompt, not prediction
    if t == cfg.max_new_tokens - 1 and gen.forced_eos_token_id is not None:
        proc = torch.full_like(raw, float("-inf"))
        proc[..., gen.forced_eos_token_id] = 0.0
    return proc, scored


def beam_search(
    next_logprobs: Callable[[], torch.Tensor],
    advance: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None],
    groups: int,
    gen: Generator,
    cfg: DecodeConfig,
    track: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    drop_finished: bool = True,
) -> _Beams:
    """Batched beam search over G independent groups of ``num_beams`` running hypotheses.

    The callbacks see only the A groups still computed (all G at first), in group order:
    ``next_logprobs()`` gives (A, nb, V) log-probs of the next token of every running beam;
    ``advance(tokens (A', nb), parents (A', nb), kept (A',) or None)`` keeps the groups at
    positions ``kept`` (increasing; None when every group is kept) and extends beam j of each
    kept group from its beam ``parents[a, j]`` with ``tokens[a, j]``. Mirrors transformers'
    ``GenerationMixin._beam_search``.
    ``track(parents (A, K), tokens (A, K))``, optional, gives D values (A, K, D) for every
    candidate of a step; each hypothesis carries its own along like its tokens (RAG-Token: the
    token's log-prob under every passage, so no second pass is needed for provenance).

    ``drop_finished``: a group that can no longer improve (transformers' stopping heuristic; in
    greedy search, one whose hypothesis ended) takes no further part in the result, so once a
    quarter of the computed groups are done they are dropped from the batch: a batch of short
    answers no longer runs as long as its longest one. Off, every group runs to the end.

    On a GPU a step is dozens of small kernels, so the step asks the device as little as it can:
    rows are picked with ``gather`` (one kernel each), the groups still computed are indexed only
    once one was dropped, and the host reads the device once a step (the stopping flags).
    """
    nb, L, lp, dev = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty, gen.device
    eos = torch.tensor(gen.eos_token_ids, dtype=torch.long, device=dev)
    K = max(2, 1 + len(gen.eos_token_ids)) * nb  # candidates kept per group and step
    run_tok = torch.full((groups, nb, L), gen.pad_token_id, dtype=torch.long, device=dev)
    run_score = torch.zeros(groups, nb, device=dev)
    run_score[:, 1:] = _NEG  # only the first beam expands at step 0
    run_raw = torch.zeros(groups, nb, device=dev)
    fin_tok = run_tok.clone()
    fin_score = torch.full((groups, nb), _NEG, device=dev)
    fin_raw = torch.zeros(groups, nb, device=dev)
    fin_len = torch.zeros(groups, nb, dtype=torch.long, device=dev)
    finished = torch.zeros(groups, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(groups, 1, dtype=torch.bool, device=dev)
    top_nb = (torch.arange(K, device=dev) < nb)[None, :]  # only the top nb candidates may finish
    run_trk = fin_trk = cand_trk = None  # (G, nb, L, D) tracked values, once D is known
    active: torch.Tensor | None = None  # the groups the callbacks compute; None: all G

    for t in range(L):
        raw = _scatter_groups(next_logprobs(), active, groups)  # (G, nb, V)
        V = raw.shape[-1]
        proc, scored = process_logits(raw, t, gen, cfg)
        acc = (proc + run_score[:, :, None]).view(groups, nb * V)
        cand_score, flat = acc.topk(K, dim=-1)  # (G, K)
        parent, tok = flat // V, flat % V
        cand_raw = run_raw.gather(1, parent) + scored.view(groups, nb * V).gather(1, flat)
        cand_tok = _rows(run_tok, parent)  # (G, K, L)
        cand_tok[:, :, t] = tok
        hits = tok == eos[0] if eos.numel() == 1 else torch.isin(tok, eos)  # (G, K)
        if t + 1 >= L:
            hits = torch.ones_like(hits)
        if track is not None:
            picked = (parent, tok) if active is None else (parent[active], tok[active])
            vals = _scatter_groups(track(*picked), active, groups)  # (G, K, D)
            if run_trk is None:
                run_trk = vals.new_zeros(groups, nb, L, vals.shape[-1])
                fin_trk = run_trk.clone()
            cand_trk = _rows(run_trk, parent)  # (G, K, L, D)
            cand_trk[:, :, t] = vals

        # running beams for the next step: the best nb candidates that did not finish
        unfinished = torch.where(hits, cand_score + _NEG, cand_score)  # = + hits * _NEG
        keep = unfinished.topk(nb, dim=-1).indices  # (G, nb)
        run_tok, run_raw, run_score = _rows(cand_tok, keep), cand_raw.gather(1, keep), \
            unfinished.gather(1, keep)
        if cand_trk is not None:
            run_trk = _rows(cand_trk, keep)
        next_parent, next_tok = parent.gather(1, keep), tok.gather(1, keep)

        # finished beams: merge new EOS hypotheses (length-penalised) into the best nb so far
        new_score = cand_score / float(t + 1) ** lp
        if cfg.early_stopping is True:
            new_score = torch.where(finished.all(-1, keepdim=True), new_score + _NEG, new_score)
        new_score = torch.where(improvable, new_score, new_score + _NEG)
        did_finish = hits & top_nb
        new_score = torch.where(did_finish, new_score, new_score + _NEG)
        m_score = torch.cat([fin_score, new_score], 1)  # (G, nb + K)
        best = m_score.topk(nb, dim=-1).indices  # (G, nb)
        fin_score = m_score.gather(1, best)
        fin_tok = _rows(torch.cat([fin_tok, cand_tok], 1), best)
        if cand_trk is not None:
            fin_trk = _rows(torch.cat([fin_trk, cand_trk], 1), best)
        fin_raw = torch.cat([fin_raw, cand_raw], 1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(tok, t + 1)], 1).gather(1, best)
        finished = torch.cat([finished, did_finish], 1).gather(1, best)

        # stop when no group can improve (transformers' heuristics), or everyone hit the limit
        best_len = L if (cfg.early_stopping == "never" and lp > 0) else t + 1
        best_possible = run_score[:, :1] / float(best_len) ** lp  # (G, 1)
        worst = torch.where(finished, fin_score.min(-1, keepdim=True).values, _NEG)
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        done = ~(improvable[:, 0] if active is None else improvable[active, 0])
        # what the host must know, read in one transfer (each read waits for the device)
        flags = torch.stack([improvable.any(), finished.all(), hits.all()]).long()
        can_improve, all_finished, all_hit, n_done = torch.cat([flags, done.sum()[None]]).tolist()
        if not can_improve or (all_finished and cfg.early_stopping is True) or all_hit:
            break
        computed = groups if active is None else active.numel()
        kept = None
        if drop_finished and n_done * 4 >= computed:
            kept = torch.nonzero(~done).flatten()
            active = kept if active is None else active[kept]
        if active is None:
            advance(next_tok, next_parent, None)
        else:
            advance(next_tok[active], next_parent[active], kept)

    fin_len = torch.where(finished, fin_len, 0)
    return _Beams(fin_tok, fin_len, fin_score, fin_raw, finished, fin_trk)


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[g, index[g, j]]`` for every group g (values (G, n, ...), index (G, m)): one
    ``gather`` rather than advanced indexing, which costs a GPU more kernels."""
    shape = (*index.shape, *values.shape[2:])
    index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(shape)
    return values.gather(1, index)


def _scatter_groups(values: torch.Tensor, active: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Values of the computed groups (A, ...) in a (G, ...) tensor; zeros for dropped groups,
    whose candidates are never kept (they cannot improve). ``active`` None: every group."""
    if active is None or values.shape[0] == groups:
        return values
    full = values.new_zeros(groups, *values.shape[1:])
    full[active] = values
    return full


def check_decode_inputs(
    gen: Generator, inputs: GenInputs, doc_scores: torch.Tensor, cfg: DecodeConfig
) -> None:
    """Refuse, in one line each, decoding inputs and options that cannot work."""
    if tuple(doc_scores.shape) != (inputs.batch_size, inputs.n_docs):
        raise MarginError(
            f"doc_scores has shape {tuple(doc_scores.shape)}, expected "
            f"({inputs.batch_size}, {inputs.n_docs}); pass one score per (question, passage)"
        )
    if cfg.num_beams < 1 or cfg.max_new_tokens < 1 or cfg.num_return_sequences < 1:
        raise MarginError("num_beams, max_new_tokens and num_return_sequences must be >= 1")
    if cfg.num_return_sequences > cfg.num_beams:
        raise MarginError(
            f"num_return_sequences={cfg.num_return_sequences} exceeds num_beams={cfg.num_beams}; "
            "raise num_beams or lower num_return_sequences"
        )
    if not gen.eos_token_ids:
        raise MarginError("the generator has no EOS token id; set generation_config.eos_token_id")


def _score_mask(tokens: torch.Tensor, lengths: torch.Tensor, gen: Generator) -> torch.Tensor:
    """Which generated positions count in log p(y|x,z): real tokens, minus a forced BOS."""
    mask = torch.arange(tokens.shape[-1])[None, :] < lengths[:, None]  # (M, L)
    if gen.forced_bos_token_id is not None:
        mask[:, 0] = False
    return mask


@torch.no_grad()
def decode_rag_token(
    gen: Generator,
    inputs: GenInputs,
    doc_scores: torch.Tensor,
    cfg: DecodeConfig,
    on_token: Callable[[list[int]], None] | None = None,
    enc: Encoded | None = None,
) -> list[Decoded]:
    """RAG-Token decoding (Sec. 2.5): beam search on the passage-marginal next-token distribution.

    ``doc_scores`` (B, k) are the retriever's inner products d(z)ᵀq(x); p(z|x) is their softmax.
    The search carries each hypothesis's per-passage token log-probs p(y_i|x,z,y_<i) along with
    its tokens, so the marginal log p(y|x) and the per-token provenance need no second pass.

    ``on_token`` (greedy only) is called after every step with the token each question's
    running hypothesis took, for streaming; the final tokens come from the returned hypotheses
    (a question that already finished keeps receiving tokens that are not part of its answer).
    ``enc``: ``gen.encode(inputs)`` already computed (read, never modified); encoded here if None.
    """
    check_decode_inputs(gen, inputs, doc_scores, cfg)
    B, k, nb, dev = inputs.batch_size, inputs.n_docs, cfg.num_beams, gen.device
    prior = scores_log_prior(doc_scores.float()).to(dev)  # (B, k)
    enc = enc if enc is not None else gen.encode(inputs)
    state = gen.start(enc, expand=nb)  # rows (A, k, nb) for the A questions still decoding
    z_base = torch.arange(k, device=dev)[None, :, None] * nb  # (1, k, 1)
    z = torch.arange(k, device=dev)[None, None, :]  # (1, 1, k)
    live = [prior.repeat_interleave(nb, 0)]  # the prior of every beam (A*nb, k) still decoding
    last: list[torch.Tensor] = []  # the step's per-passage log-probs, read by track()
    arange: dict[int, torch.Tensor] = {}  # arange(A) for each A seen: built once, not per step

    def questions(A: int) -> torch.Tensor:
        if A not in arange:
            arange[A] = torch.arange(A, device=dev)
        return arange[A]

    def next_logprobs() -> torch.Tensor:
        A = live[0].shape[0] // nb
        step = gen.step(state).view(A, k, nb, -1).transpose(1, 2)  # (A, nb, k, V)
        last[:] = [step]
        marg = rag_token_next_logprobs(live[0], step.flatten(0, 1))
        return F.log_softmax(marg, -1).view(A, nb, -1)  # (A, nb, V), as transformers re-normalises

    def track(parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        a = questions(parents.shape[0])[:, None, None]
        return last[0][a, parents[:, :, None], z, tokens[:, :, None]]  # (A, K, k) log p(y_t|x,z)

    def advance(tokens: torch.Tensor, parents: torch.Tensor, kept: torch.Tensor | None) -> None:
        groups = questions(tokens.shape[0]) if kept is None else kept
        rows = (groups[:, None, None] * (k * nb) + z_base + parents[:, None, :]).flatten()
        # beams move within their own (question, passage); greedy with nobody dropped: not at all
        moves = "any" if kept is not None else "none" if nb == 1 else "within_context"
        gen.advance(state, tokens[:, None, :].expand(-1, k, nb).flatten(), rows, moves=moves)
        if kept is not None:
            live[0] = live[0].view(-1, nb, k)[kept].flatten(0, 1)
        if on_token is not None and nb == 1:
            on_token(tokens[:, 0].tolist())

    # streaming reports a token for every question at every step: keep them all in the batch
    beams = beam_search(next_logprobs, advance, B, gen, cfg, track,
                        drop_finished=on_token is None).cpu()
    assert beams.track is not None
    R = cfg.num_return_sequences
    return token_decoded(gen, prior.cpu(), beams.tokens[:, :R], beams.lengths[:, :R],
                         beams.filled[:, :R], beams.track[:, :R])


def token_decoded(
    gen: Generator,
    prior: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    filled: torch.Tensor,
    track: torch.Tensor,
) -> list[Decoded]:
    """RAG-Token hypotheses as answers: their marginal log p(y|x) (Sec. 2.1) and provenance
    from the per-passage token scores the search kept.

    ``prior`` (B, k) log p(z|x); ``tokens`` (B, R, L) and ``lengths`` (B, R) the R best
    hypotheses of each question, ``filled`` (B, R) which exist; ``track`` (B, R, L, k) their
    tokens' log p(y_i|x,z,y_<i). Also continuous batching's (margin.generation.continuous).
    """
    B, R = tokens.shape[:2]
    # per-passage token scores, kept by the search: log p(y_i|x,z,y_<i) (B*R, k, L)
    flat_mask = _score_mask(tokens.flatten(0, 1), lengths.flatten(), gen)  # (B*R, L)
    tok_lp = track.flatten(0, 1).transpose(1, 2)  # (B*R, k, L)
    tok_lp = tok_lp.masked_fill(~flat_mask[:, None, :], 0.0)
    pri = prior.repeat_interleave(R, 0)  # (B*R, k)
    logprob = rag_token_logprob(pri, tok_lp, flat_mask)  # (B*R,)
    tok_post = token_doc_posterior(pri, tok_lp)  # (B*R, k, L)
    seq_post = (tok_post * flat_mask[:, None]).sum(-1) / flat_mask.sum(-1).clamp(min=1)[:, None]
    out = []
    for b in range(B):
        hyps = []
        for r in range(R):
            i, n = b * R + r, int(lengths[b, r])
            if not bool(filled[b, r]):
                continue
            ids = tuple(tokens[b, r, :n].tolist())
            hyps.append(
                Hypothesis(
                    token_ids=ids,
                    text=gen.decode(ids),
                    logprob=float(logprob[i]),
                    doc_posterior=tuple(seq_post[i].tolist()),
                    token_docs=tuple(tok_post[i, :, :n].argmax(0).tolist()),
                )
            )
        out.append(Decoded(tuple(hyps)))
    return out


def _distinct(
    tokens: torch.Tensor, q: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct hypotheses per question, in first-occurrence order (transformers' dedup order).

    tokens (N, L), q (N,) question index, valid (N,). Returns (unique_id (N,), first (U,)): the
    id of every hypothesis and the row where each distinct one first occurs.
    """
    keyed = torch.cat([q[:, None], tokens], 1)[valid]  # (N', 1+L)
    _, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    rows = torch.arange(tokens.shape[0])[valid]
    first = torch.full((int(inverse.max()) + 1,), tokens.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    order = torch.argsort(first)  # distinct hypotheses by first occurrence
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    uid = torch.full((tokens.shape[0],), -1, dtype=torch.long)
    uid[valid] = rank[inverse]
    return uid, first[order]


@torch.no_grad()
def decode_rag_sequence(
    gen: Generator,
    inputs: GenInputs,
    doc_scores: torch.Tensor,
    cfg: DecodeConfig,
    thorough: bool = True,
    enc: Encoded | None = None,
) -> list[Decoded]:
    """RAG-Sequence decoding (Sec. 2.5): Thorough (default) or Fast.

    One beam search per (question, passage), all batched; each question's distinct hypotheses
    are scored by logsumexp_z [log p(z|x) + log p(y|x,z)] and ranked. ``enc``: as in
    :func:`decode_rag_token`.
    """
    check_decode_inputs(gen, inputs, doc_scores, cfg)
    B, k, nb = inputs.batch_size, inputs.n_docs, cfg.num_beams
    G = B * k
    prior = scores_log_prior(doc_scores.float())  # (B, k)
    enc = enc if enc is not None else gen.encode(inputs)
    state = gen.start(enc, expand=nb)  # rows (A, nb) for the A (question, passage) groups left

    def next_logprobs() -> torch.Tensor:
        step = gen.step(state)  # (A*nb, V)
        return step.view(step.shape[0] // nb, nb, -1)

    def advance(tokens: torch.Tensor, parents: torch.Tensor, kept: torch.Tensor | None) -> None:
        groups = torch.arange(tokens.shape[0], device=tokens.device) if kept is None else kept
        moves = "any" if kept is not None else "none" if nb == 1 else "within_context"
        gen.advance(state, tokens.flatten(), (groups[:, None] * nb + parents).flatten(), moves)

    beams = beam_search(next_logprobs, advance, G, gen, cfg).cpu()
    prior = prior.cpu()
    flat_tok = beams.tokens.flatten(0, 1)  # (G*nb, L) rows (b, z, j)
    flat_len = beams.lengths.flatten()
    q = torch.arange(B).repeat_interleave(k * nb)  # question of every beam hypothesis
    z = torch.arange(k).repeat_interleave(nb).repeat(B)  # passage of every beam hypothesis
    uid, first = _distinct(flat_tok, q, beams.filled.flatten())
    U = first.numel()
    hyp_tok, hyp_len, hyp_q = flat_tok[first], flat_len[first], q[first]  # (U, L), (U,), (U,)

    # log p(y|x,z) for every (distinct y, passage z): the beam's own score where z produced y
    seq_lp = torch.full((U, k), float("-inf"))
    got = uid >= 0
    seq_lp[uid[got], z[got]] = beams.raw.flatten()[got]
    if thorough:  # one extra teacher-forced pass for exactly the missing pairs
        miss_u, miss_z = torch.nonzero(torch.isinf(seq_lp), as_tuple=True)
        if miss_u.numel():
            tgt = hyp_tok[miss_u]
            mask = _score_mask(tgt, hyp_len[miss_u], gen)
            rows = (hyp_q[miss_u] * k + miss_z).to(gen.device)
            lp = gen.score(enc, rows, tgt.to(gen.device), mask.to(gen.device))  # (M, L)
            seq_lp[miss_u, miss_z] = lp.sum(-1).cpu()
    ones = torch.ones(U, 1)
    marg = rag_sequence_logprob(prior[hyp_q], seq_lp[:, :, None], ones)  # (U,)
    post = sequence_doc_posterior(prior[hyp_q], seq_lp[:, :, None], ones)  # (U, k)

    # rank each question's hypotheses: place them in a (B, max per question) table
    count = torch.bincount(hyp_q, minlength=B)
    slot = torch.arange(U) - (torch.cumsum(count, 0) - count)[hyp_q]
    table = torch.full((B, int(count.max())), float("-inf"))
    table[hyp_q, slot] = marg
    idx = torch.full((B, table.shape[1]), -1, dtype=torch.long)
    idx[hyp_q, slot] = torch.arange(U)
    R = min(cfg.num_return_sequences, table.shape[1])
    top = table.topk(R, dim=-1).indices  # (B, R)
    out = []
    for b in range(B):
        hyps = []
        for r in range(min(R, int(count[b]))):
            u = int(idx[b, top[b, r]])
            ids = tuple(hyp_tok[u, : int(hyp_len[u])].tolist())
            hyps.append(
                Hypothesis(
                    token_ids=ids,
                    text=gen.decode(ids),
                    logprob=float(marg[u]),
                    doc_posterior=tuple(post[u].tolist()),
                    token_docs=None,
                )
            )
        out.append(Decoded(tuple(hyps)))
    return out


def decode(
    gen: Generator,
    inputs: GenInputs,
    doc_scores: torch.Tensor,
    cfg: DecodeConfig,
    method: Literal["token", "thorough", "fast"],
    on_token: Callable[[list[int]], None] | None = None,
    enc: Encoded | None = None,
) -> list[Decoded]:
    """Decode with RAG-Token ("token") or RAG-Sequence ("thorough" or "fast" decoding).

    ``on_token``: RAG-Token greedy streaming hook, see :func:`decode_rag_token`. ``enc``: the
    inputs already encoded (``gen.encode(inputs)``), so several decodings of the same prompts
    pay for the encoder or the prompt's prefill once.
    """
    if method == "token":
        return decode_rag_token(gen, inputs, doc_scores, cfg, on_token, enc)
    if method in ("thorough", "fast"):
        return decode_rag_sequence(
            gen, inputs, doc_scores, cfg, thorough=method == "thorough", enc=enc
        )
    raise MarginError(f"unknown decoding {method!r}; use 'token', 'thorough' or 'fast'")
