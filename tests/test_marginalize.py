"""The marginalisation math against hand arithmetic and naive per-passage loops."""

from __future__ import annotations

import math

import pytest
import torch

from margin.marginalize import (
    doc_log_prior,
    doc_scores,
    label_smoothed_nll_loss,
    marginal_logprob,
    nll_loss,
    rag_sequence_logprob,
    rag_token_logprob,
    rag_token_next_logprobs,
    scores_log_prior,
    scores_prior,
    sequence_doc_posterior,
    token_doc_posterior,
)

# Two passages, a two-token target, worked by hand:
#   p(z|x)       = [0.75, 0.25]
#   p(y_1|x,z)   = [0.5, 0.1],  p(y_2|x,z) = [0.2, 0.8]
# RAG-Sequence: 0.75 * 0.5 * 0.2 + 0.25 * 0.1 * 0.8 = 0.075 + 0.02 = 0.095
# RAG-Token:   (0.75 * 0.5 + 0.25 * 0.1) * (0.75 * 0.2 + 0.25 * 0.8) = 0.4 * 0.35 = 0.14
# Posterior (Sequence): p(z|x,y) = [0.075, 0.02] / 0.095 = [0.78947.., 0.21052..]
# Posterior (Token, token 2): [0.15, 0.2] / 0.35 = [0.428571.., 0.571428..]
PRIOR = torch.log(torch.tensor([[0.75, 0.25]]))
TOK = torch.log(torch.tensor([[[0.5, 0.2], [0.1, 0.8]]]))  # (B=1, k=2, T=2)
MASK = torch.ones(1, 2)


def test_two_passage_example_by_hand():
    assert rag_sequence_logprob(PRIOR, TOK, MASK).exp().item() == pytest.approx(0.095)
    assert rag_token_logprob(PRIOR, TOK, MASK).exp().item() == pytest.approx(0.14)
    post = sequence_doc_posterior(PRIOR, TOK, MASK)[0]
    assert post.tolist() == pytest.approx([0.075 / 0.095, 0.02 / 0.095])
    tok_post = token_doc_posterior(PRIOR, TOK)[0, :, 1]
    assert tok_post.tolist() == pytest.approx([0.15 / 0.35, 0.2 / 0.35])
    # a one-token target: the two models coincide (Sec. 2.1, FEVER)
    one = torch.ones(1, 1)
    assert rag_sequence_logprob(PRIOR, TOK[..., :1], one).exp().item() == pytest.approx(0.4)
    assert rag_token_logprob(PRIOR, TOK[..., :1], one).exp().item() == pytest.approx(0.4)


def _random(B=3, k=4, T=5, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    prior = torch.log_softmax(torch.randn(B, k, generator=g), -1)
    vocab = torch.log_softmax(torch.randn(B, k, T, V, generator=g), -1)
    target = torch.randint(V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    tok = vocab.gather(-1, target[:, None, :, None].expand(-1, k, -1, 1))[..., 0]
    return prior, vocab, target, mask, tok


def test_against_naive_loops():
    prior, vocab, target, mask, tok = _random()
    B, k, T, V = vocab.shape
    seq, tokm = rag_sequence_logprob(prior, tok, mask), rag_token_logprob(prior, tok, mask)
    nxt = rag_token_next_logprobs(prior, vocab[:, :, 2])  # (B, V)
    for b in range(B):
        n = int(mask[b].sum())
        p_seq = sum(
            math.exp(prior[b, z]) * math.prod(math.exp(tok[b, z, i]) for i in range(n))
            for z in range(k)
        )
        p_tok = math.prod(
            sum(math.exp(prior[b, z] + tok[b, z, i]) for z in range(k)) for i in range(n)
        )
        assert seq[b].exp().item() == pytest.approx(p_seq, rel=1e-5)
        assert tokm[b].exp().item() == pytest.approx(p_tok, rel=1e-5)
        for v in range(V):
            want = sum(math.exp(prior[b, z] + vocab[b, z, 2, v]) for z in range(k))
            assert nxt[b, v].exp().item() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(nxt.exp().sum(-1), torch.ones(B))  # a distribution


def test_padding_is_exact_even_with_garbage():
    prior, _, _, mask, tok = _random()
    garbage = tok.clone()
    garbage[mask[:, None, :].expand_as(tok) == 0] = float("-inf")  # -inf, not just any number
    for mode in ("sequence", "token"):
        a = marginal_logprob(mode, prior, tok, mask)
        b = marginal_logprob(mode, prior, garbage, mask)
        assert torch.equal(a, b) and torch.isfinite(a).all()
    # masking the tail equals truncating the target
    short = marginal_logprob("sequence", prior[2:], tok[2:, :, :1], mask[2:, :1])
    assert torch.equal(short, marginal_logprob("sequence", prior[2:], tok[2:], mask[2:]))


def test_grads_flow_to_the_question_embedding():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, generator=g, requires_grad=True)
    docs = torch.randn(2, 3, 8, generator=g)
    prior = doc_log_prior(q, docs)
    ref = torch.log_softmax(torch.einsum("bd,bkd->bk", q, docs), -1)
    torch.testing.assert_close(prior, ref)
    tok = torch.log_softmax(torch.randn(2, 3, 4, 5, generator=g), -1)[..., 0]
    for mode in ("sequence", "token"):
        q.grad = None
        nll_loss(mode, doc_log_prior(q, docs), tok, torch.ones(2, 4)).backward()
        assert q.grad is not None and q.grad.abs().sum() > 0


def test_the_scaled_prior_by_hand():
    """p(z|x) ∝ exp(s · d(z)ᵀq(x)): q = (1, 0), passages (1, 0) and (0, 1), s = ln 3 gives
    scores (ln 3, 0) and prior (3/4, 1/4)."""
    q = torch.tensor([[1.0, 0.0]])  # (B=1, d=2)
    docs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, k=2, d=2)
    scale = math.log(3)
    torch.testing.assert_close(doc_scores(q, docs, scale), torch.tensor([[scale, 0.0]]))
    prior = torch.tensor([[0.75, 0.25]])
    torch.testing.assert_close(doc_log_prior(q, docs, scale).exp(), prior)
    torch.testing.assert_close(scores_prior(doc_scores(q, docs, scale)), prior)
    torch.testing.assert_close(scores_log_prior(torch.tensor([[scale, 0.0]])), prior.log())
    assert torch.equal(doc_log_prior(q, docs), scores_log_prior(doc_scores(q, docs)))  # s = 1


def test_nll_reductions_and_label_smoothing():
    prior, vocab, target, mask, tok = _random()
    per = nll_loss("token", prior, tok, mask, reduction="none")
    assert torch.allclose(per, -rag_token_logprob(prior, tok, mask))
    assert torch.allclose(nll_loss("token", prior, tok, mask, "sum"), per.sum())
    assert torch.allclose(nll_loss("token", prior, tok, mask, "mean"), per.mean())
    with pytest.raises(ValueError):
        nll_loss("token", prior, tok, mask, "avg")  # type: ignore[arg-type]
    for mode in ("sequence", "token"):
        plain = nll_loss(mode, prior, tok, mask, "none")
        eps0 = label_smoothed_nll_loss(mode, prior, vocab, target, mask, 0.0, "none")
        torch.testing.assert_close(plain, eps0)
        # epsilon = 1 leaves only the smoothing term; check it by a loop for RAG-Token
        only = label_smoothed_nll_loss(mode, prior, vocab, target, mask, 1.0, "none")
        V = vocab.shape[-1]
        if mode == "token":
            marg = torch.logsumexp(prior[:, :, None, None] + vocab, 1).sum(-1)  # (B, T)
            torch.testing.assert_close(only, -(marg * mask).sum(-1) / V)
        else:
            per_doc = (vocab.sum(-1) * mask[:, None]).sum(-1) + V * prior
            torch.testing.assert_close(only, -torch.logsumexp(per_doc, -1) / V)
