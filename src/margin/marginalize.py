"""The latent-passage marginalisation of RAG (Lewis et al., 2020, Sec. 2), as small pure functions.

RAG treats the retrieved passage z as a latent variable and sums it out over the top-k passages.
Everything here works on log-probabilities that the caller has already computed (the document
prior from the retriever, the per-token log-probabilities from the generator), so the math can be
read, tested and reused without a model in sight. All sums over z are ``logsumexp`` in log space.

Shapes: ``B`` questions, ``k`` passages per question, ``T`` target tokens, ``V`` vocabulary.
Masked (padding) target positions contribute exactly 0 to every log-likelihood.

Example (two passages, a one-token target; the numbers are worked out in tests/test_marginalize.py):

    >>> import torch
    >>> from margin.marginalize import rag_sequence_logprob
    >>> prior = torch.log(torch.tensor([[0.75, 0.25]]))         # p(z|x)
    >>> tok = torch.log(torch.tensor([[[0.5], [0.1]]]))         # p(y_1|x,z)
    >>> round(rag_sequence_logprob(prior, tok, torch.ones(1, 1)).exp().item(), 3)
    0.4
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Mode = Literal["sequence", "token"]
Reduction = Literal["mean", "sum", "none"]


def doc_scores(
    question_emb: torch.Tensor, doc_embs: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """The logits of the prior p_eta(z|x) ∝ exp(s · d(z)ᵀ q(x)) (Sec. 2.2): (B, k).

    ``question_emb`` (B, d) stays in the autograd graph so the question encoder is trained
    (Sec. 2.4); ``doc_embs`` (B, k, d) are the frozen passage vectors returned by the index.
    ``scale`` s is 1 for DPR as in the paper; cosine encoders need a larger one (margin.rag).
    """
    docs = doc_embs.to(device=question_emb.device, dtype=question_emb.dtype)
    return torch.einsum("bd,bkd->bk", question_emb, docs) * scale  # (B, k)


def doc_log_prior(
    question_emb: torch.Tensor, doc_embs: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """log p_eta(z|x) over the top-k passages: p_eta(z|x) ∝ exp(s · d(z)ᵀ q(x)) (Sec. 2.2).

    ``question_emb`` (B, d), ``doc_embs`` (B, k, d) as in :func:`doc_scores` -> (B, k).
    """
    return scores_log_prior(doc_scores(question_emb, doc_embs, scale))


def scores_log_prior(doc_scores: torch.Tensor) -> torch.Tensor:
    """log p_eta(z|x) from document scores (B, k) already computed: their log-softmax over z
    (also the prior of BM25 retrieval, whose scores are the logits, and of cached scores)."""
    return F.log_softmax(doc_scores, dim=-1)


def scores_prior(doc_scores: torch.Tensor) -> torch.Tensor:
    """p_eta(z|x) from document scores (B, k): their softmax over z (rows sum to 1)."""
    return F.softmax(doc_scores, dim=-1)


def _masked(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the padding positions of (B, k, T) log-probs, exactly (no 0 * -inf = nan)."""
    keep = mask.to(torch.bool)[:, None, :]  # (B, 1, T)
    return token_logprobs.masked_fill(~keep, 0.0)


def rag_sequence_logprob(
    doc_logprior: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """RAG-Sequence: log p(y|x) = logsumexp_z [log p(z|x) + Σ_i log p(y_i|x,z,y_<i)] (Sec. 2.1).

    doc_logprior (B, k), token_logprobs (B, k, T), mask (B, T) -> (B,).
    """
    seq = _masked(token_logprobs, mask).sum(dim=-1)  # (B, k) log p(y|x,z)
    return torch.logsumexp(doc_logprior + seq, dim=-1)


def rag_token_logprob(
    doc_logprior: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """RAG-Token: log p(y|x) = Σ_i logsumexp_z [log p(z|x) + log p(y_i|x,z,y_<i)] (Sec. 2.1).

    doc_logprior (B, k), token_logprobs (B, k, T), mask (B, T) -> (B,).
    """
    per_token = torch.logsumexp(doc_logprior[:, :, None] + token_logprobs, dim=1)  # (B, T)
    return per_token.masked_fill(~mask.to(torch.bool), 0.0).sum(dim=-1)


def rag_token_next_logprobs(
    doc_logprior: torch.Tensor, step_logprobs: torch.Tensor
) -> torch.Tensor:
    """The RAG-Token next-token distribution of Sec. 2.5, a marginal over passages:

    log p'(y_i|x,y_<i) = logsumexp_z [log p(z|x) + log p(y_i|x,z,y_<i)].
    doc_logprior (B, k), step_logprobs (B, k, V) -> (B, V).
    """
    return torch.logsumexp(doc_logprior[:, :, None] + step_logprobs, dim=1)


def sequence_doc_posterior(
    doc_logprior: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Provenance for RAG-Sequence: p(z|x,y) ∝ p(z|x) Π_i p(y_i|x,z,y_<i). (B, k), rows sum to 1."""
    joint = doc_logprior + _masked(token_logprobs, mask).sum(dim=-1)  # (B, k)
    return F.softmax(joint, dim=-1)


def token_doc_posterior(doc_logprior: torch.Tensor, token_logprobs: torch.Tensor) -> torch.Tensor:
    """Provenance for RAG-Token, per token: p(z|x,y_i,y_<i) ∝ p(z|x) p(y_i|x,z,y_<i).

    doc_logprior (B, k), token_logprobs (B, k, T) -> (B, k, T); sums to 1 over k at every position.
    """
    return F.softmax(doc_logprior[:, :, None] + token_logprobs, dim=1)


def marginal_logprob(
    mode: Mode, doc_logprior: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log p(y|x) under RAG-Sequence or RAG-Token. (B,)"""
    if mode == "sequence":
        return rag_sequence_logprob(doc_logprior, token_logprobs, mask)
    if mode == "token":
        return rag_token_logprob(doc_logprior, token_logprobs, mask)
    raise ValueError(f"unknown RAG mode {mode!r}; use 'sequence' or 'token'")


def _reduce(loss: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")


def nll_loss(
    mode: Mode,
    doc_logprior: torch.Tensor,
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The training objective of Sec. 2.4: Σ_j -log p(y_j|x_j), marginalised over top-k passages.

    ``reduction`` "mean" averages the per-example sequence NLL over the batch, "sum" adds them
    (transformers' ``reduce_loss=True``), "none" returns (B,).
    """
    return _reduce(-marginal_logprob(mode, doc_logprior, token_logprobs, mask), reduction)


def label_smoothed_nll_loss(
    mode: Mode,
    doc_logprior: torch.Tensor,
    vocab_logprobs: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``(1 - ε)·NLL + (ε / V)·smooth`` with transformers' RAG label smoothing, for parity.

    vocab_logprobs (B, k, T, V), target_ids (B, T), mask (B, T). The smoothing term is the negated
    marginal of Σ_v log p(v) in place of log p(y_i): for RAG-Token Σ_i Σ_v logsumexp_z[log p(z|x) +
    log p(v|x,z,y_<i)]; for RAG-Sequence logsumexp_z[V·log p(z|x) + Σ_i Σ_v log p(v|x,z,y_<i)]
    (transformers adds the prior to every vocabulary entry of one position, hence V·log p(z|x)).
    """
    V = vocab_logprobs.shape[-1]
    keep = mask.to(torch.bool)  # (B, T)
    token_logprobs = vocab_logprobs.gather(
        -1, target_ids[:, None, :, None].expand(-1, vocab_logprobs.shape[1], -1, 1)
    ).squeeze(-1)  # (B, k, T)
    nll = -marginal_logprob(mode, doc_logprior, token_logprobs, mask)  # (B,)
    if mode == "token":
        marg = torch.logsumexp(doc_logprior[:, :, None, None] + vocab_logprobs, dim=1)  # (B, T, V)
        smooth = marg.sum(-1).masked_fill(~keep, 0.0).sum(-1)  # (B,)
    elif mode == "sequence":
        per_doc = _masked(vocab_logprobs.sum(-1), keep).sum(-1)  # (B, k)
        smooth = torch.logsumexp(per_doc + V * doc_logprior, dim=-1)  # (B,)
    else:
        raise ValueError(f"unknown RAG mode {mode!r}; use 'sequence' or 'token'")
    loss = (1.0 - epsilon) * nll - (epsilon / V) * smooth
    return _reduce(loss, reduction)
