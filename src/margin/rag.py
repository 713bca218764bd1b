"""RAG: a retriever and a generator, with the latent passage summed out (Lewis et al., 2020).

This is the object users hold. It ties together the retriever p_eta(z|x)
(margin.retrieval.retriever), the generator p_theta(y_i|x,z,y_<i) (margin.generation.generator),
the two marginalisations (margin.marginalize) and the decoding procedures of Sec. 2.5
(margin.generation.decoding), and gives answers with provenance.

    >>> import margin
    >>> rag = margin.RAG.load(model="default", index="default")       # doctest: +SKIP
    >>> [a] = rag.ask(["Who wrote Hamlet?"], k=5, mode="token")        # doctest: +SKIP
    >>> a.answer, a.passages[0].title                                 # doctest: +SKIP

The document prior is recomputed in torch from the retrieved passage vectors, p(z|x) =
softmax_z(s · d(z)ᵀq(x)), so the question encoder receives gradient (Sec. 2.4); retrieval itself
stays outside autograd. ``s`` (``doc_score_scale``) is 1 for DPR as in the paper; cosine encoders
such as the default all-MiniLM-L6-v2 give inner products in [-1, 1], whose softmax over k passages
would be nearly uniform, so their models set a larger scale (documented in docs/models.md).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from margin.errors import MarginError
from margin.generation.decoding import DecodeConfig, Decoded, decode
from margin.generation.generator import Encoded, Generator, GenInputs
from margin.marginalize import doc_scores, nll_loss, scores_log_prior, scores_prior
from margin.model_config import ModelConfig
from margin.retrieval.encoders import Encoder
from margin.retrieval.passages import Passage
from margin.retrieval.retriever import Retrieved, RetrieverProtocol, check_questions

Mode = Literal["token", "sequence"]
Decoding = Literal["greedy", "beam", "thorough", "fast"]
MODES: tuple[str, ...] = ("token", "sequence")
LOSS_MODES: tuple[str, ...] = (*MODES, "both")  # RAG.loss also averages the two objectives
MAX_QUESTION_WORDS = 128  # longer questions are truncated (with a warning) to fit the context
MAX_QUESTION_CHARS = 1000  # and so are longer ones without spaces (as the server's request bound)
DECODINGS: tuple[str, ...] = ("greedy", "beam", "thorough", "fast")

log = logging.getLogger("margin")


@dataclass(frozen=True)
class Provenance:
    """One retrieved passage and what it contributed to an answer."""

    id: str  # passage id in the index
    title: str  # title of its document
    text: str  # the passage text
    source: str  # attribution (URL, licence)
    score: float  # retriever score d(z)ᵀq(x) (BM25 score for BM25)
    prior: float  # p(z|x)
    posterior: float  # p(z|x,y) given the answer (RAG-Token: averaged over its tokens)

    @property
    def passage(self) -> Passage:
        """The retrieved passage itself."""
        return Passage(self.id, self.title, self.text, self.source)

    def to_json(self, source: bool = True) -> dict[str, Any]:
        """The passage, its score, prior and posterior, as every output writes them
        (``source``: with its attribution, as answers show it; evaluation records leave it out)."""
        return self.passage.to_json(
            self.score, source=source, prior=self.prior, posterior=self.posterior
        )


@dataclass(frozen=True)
class Answer:
    """The answer to one question, with its marginal log-probability and its provenance."""

    question: str
    answer: str  # decoded text of the best hypothesis
    logprob: float  # marginal log p(answer|question) under ``mode``
    mode: str  # "token" or "sequence"
    decoding: str  # "greedy", "beam", "thorough" or "fast"
    passages: list[Provenance]  # the k retrieved passages, retriever order
    token_docs: list[tuple[str, int]] | None = None  # RAG-Token: (token text, supporting passage)
    nbest: list[tuple[str, float]] = field(default_factory=list)  # (text, marginal logprob)

    def to_json(self) -> dict:
        """The object ``margin ask --json`` prints."""
        out = {
            "question": self.question,
            "answer": self.answer,
            "logprob": self.logprob,
            "mode": self.mode,
            "decoding": self.decoding,
            "passages": [p.to_json() for p in self.passages],
        }
        if self.token_docs is not None:
            out["token_docs"] = [{"token": t, "passage": z} for t, z in self.token_docs]
        if len(self.nbest) > 1:
            out["nbest"] = [{"answer": t, "logprob": lp} for t, lp in self.nbest]
        return out


def decoding_method(mode: str, decoding: str) -> Literal["token", "thorough", "fast"]:
    """Map (mode, decoding) onto a procedure of Sec. 2.5.

    RAG-Token decodes by (greedy or beam) search on the marginal; RAG-Sequence by Thorough or
    Fast Decoding, where "greedy" and "beam" mean Thorough Decoding with 1 or several beams.
    """
    if mode not in MODES:
        raise MarginError(f"unknown mode {mode!r}; use 'token' or 'sequence'")
    if decoding not in DECODINGS:
        raise MarginError(f"unknown decoding {decoding!r}; use one of {', '.join(DECODINGS)}")
    if mode == "token":
        if decoding in ("thorough", "fast"):
            raise MarginError(
                f"'{decoding}' decoding is RAG-Sequence's (Sec. 2.5); use --mode sequence, "
                "or greedy/beam with RAG-Token"
            )
        return "token"
    return "fast" if decoding == "fast" else "thorough"


class RAG:
    """Retrieval-Augmented Generation: RAG-Sequence and RAG-Token over one retriever/generator."""

    def __init__(
        self,
        generator: Generator,
        retriever: RetrieverProtocol | None = None,
        question_encoder: Encoder | None = None,
        doc_score_scale: float = 1.0,
        default_decode: DecodeConfig | None = None,
        postprocess: Callable[[str], str] | None = None,
        default_mode: str = "token",
        default_k: int = 5,
        config: ModelConfig | None = None,
    ):
        self.generator = generator
        self.retriever = retriever
        self.question_encoder = question_encoder or (retriever.encoder if retriever else None)
        self.doc_score_scale = doc_score_scale  # s in p(z|x) ∝ exp(s · d(z)ᵀq(x))
        self.default_decode = default_decode or DecodeConfig()
        self.postprocess = postprocess  # cleans decoded text (e.g. a causal model's extra lines)
        self.default_mode = default_mode  # the mode the model was trained for
        self.default_k = default_k  # passages per question it was trained with
        # what a checkpoint of this model records besides the weights (margin.models.save_model)
        self.config = config if config is not None else ModelConfig()

    @classmethod
    def load(
        cls, model: str = "default", index: str | None = "auto", progress: bool = True,
        device: str | torch.device = "cpu",
    ) -> RAG:
        """Load a model (``"default"``, a margin checkpoint, a name installed by ``margin
        finetune`` or a transformers RAG directory) and an index: ``"auto"``, the index the
        model carries (``RAG.load("finetuned")``) or else the default one; ``"default"``; a
        directory, checked against the model's passage encoder; or None, no retriever. Its
        networks go on ``device`` ("auto": a CUDA GPU when there is one; see margin.devices)."""
        from margin.models import load_model

        return load_model(model, index, progress=progress, device=device)

    def with_retriever(
        self, retriever: RetrieverProtocol, doc_score_scale: float | None = None
    ) -> RAG:
        """The same model over another retriever: a new RAG sharing this one's generator,
        settings and config, that searches ``retriever`` and embeds questions with its question
        encoder (none for BM25). The index swap of Sec. 4.5 and the retriever ablation of Table 6;
        ``doc_score_scale`` replaces the model's (e.g. 1 for BM25 scores as logits)."""
        swapped = copy.copy(self)
        swapped.retriever = retriever
        swapped.question_encoder = retriever.encoder
        if doc_score_scale is not None:
            swapped.doc_score_scale = doc_score_scale
        return swapped

    def to(self, device: str | torch.device) -> RAG:
        """Move the generator and the question encoder(s) to ``device``, in place; returns self.

        The index stays where it is (FAISS and BM25 search on the CPU): questions are embedded on
        ``device`` and their vectors handed to the index, and the retrieved passages' vectors
        come back to ``device`` for the prior p(z|x).
        """
        from margin.devices import resolve_device

        target = resolve_device(device)
        self.generator.model.to(target)
        encoders = {id(e): e for e in (self.question_encoder,
                                       self.retriever.encoder if self.retriever else None) if e}
        for encoder in encoders.values():
            encoder.module.to(target)
        return self

    # -- retrieval and the document prior ------------------------------------------------------

    def retrieve(self, questions: Sequence[str], k: int) -> Retrieved:
        """Top-k passages for each question, with their stored vectors for the prior."""
        return self._retriever().retrieve(questions, k=k, with_vectors=True)

    def retrieve_scored(self, questions: Sequence[str], k: int) -> tuple[Retrieved, torch.Tensor]:
        """Top-k passages and their document scores (B, k), each question encoded once.

        As transformers' ``RagModel.forward``: q(x) is computed in torch (in the autograd graph
        unless the caller is under ``no_grad``), the index is searched with q(x) detached, and
        the scores s · d(z)ᵀq(x) come from the same q(x), so the question encoder still learns
        (Sec. 2.4). BM25 is searched with the question strings; its scores are the logits.
        """
        return self._retrieve_scored(check_questions(questions), k)

    def _retrieve_scored(self, questions: list[str], k: int) -> tuple[Retrieved, torch.Tensor]:
        """:meth:`retrieve_scored` of questions already checked (:func:`cut_questions`)."""
        retriever = self._retriever()
        if retriever.kind == "bm25" or self.question_encoder is None:
            hits = retriever.retrieve(questions, k=k, with_vectors=True)
            return hits, self._scores(None, hits)
        q = self.question_encoder.embed_queries(list(questions))  # (B, d)
        search = q.detach().float().cpu().numpy()  # (B, d) float32, outside autograd
        hits = retriever.retrieve_by_vector(search, k=k, with_vectors=True)
        return hits, self._scores(q, hits)

    def doc_scores(
        self, questions: Sequence[str], hits: Retrieved, vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores (B, k) whose softmax is p(z|x); differentiable w.r.t. the question encoder.

        Dense: s · d(z)ᵀq(x) with q(x) recomputed in torch (Sec. 2.4). BM25: the BM25 scores,
        constants for autograd (the paper's BM25 ablation has no retriever gradient). For hits
        retrieved here, :meth:`retrieve_scored` gives the same scores without encoding again.
        ``vectors`` (B, k, d): d(z) to score with instead of the hits' stored vectors, e.g. from
        a passage encoder being trained (margin.training.end2end), which then learns too.
        """
        if vectors is None and (hits.vectors is None or self.question_encoder is None):
            return self._scores(None, hits)
        if self.question_encoder is None:
            raise MarginError("passage vectors need a question encoder to score them against")
        q = self.question_encoder.embed_queries(list(questions))  # (B, d)
        if vectors is None:
            return self._scores(q, hits)
        return doc_scores(q, vectors, self.doc_score_scale)  # (B, k)

    def _scores(self, q: torch.Tensor | None, hits: Retrieved) -> torch.Tensor:
        """s · d(z)ᵀq(x) (B, k) from question vectors ``q`` (B, d); without them or the hits'
        vectors (BM25, cached scores), s times the retriever's scores."""
        if q is None or hits.vectors is None:
            return torch.as_tensor(hits.scores, dtype=torch.float32) * self.doc_score_scale
        return doc_scores(q, torch.as_tensor(hits.vectors), self.doc_score_scale)  # (B, k)

    def _retriever(self) -> RetrieverProtocol:
        if self.retriever is None:
            raise MarginError("this RAG has no retriever; load it with an index, or give passages")
        return self.retriever

    # -- answering -----------------------------------------------------------------------------

    def ask(
        self,
        questions: Sequence[str],
        k: int | None = None,
        mode: str | None = None,
        decoding: str = "greedy",
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        num_return_sequences: int = 1,
        on_token: Callable[[list[int]], None] | None = None,
    ) -> list[Answer]:
        """Retrieve k passages per question and answer, with provenance.

        ``k`` and ``mode`` default to the model's own (``default_k``, ``default_mode``).
        ``on_token`` streams RAG-Token greedy decoding: called after every step with the token
        id each question took (see :func:`margin.generation.decoding.decode_rag_token`).
        """
        questions = cut_questions(questions)
        k = _at_most_the_index(_given_or_default("k", k, self.default_k), self._retriever())
        mode = self.default_mode if mode is None else mode
        method = decoding_method(mode, decoding)
        with torch.no_grad():
            hits, scores = self._retrieve_scored(questions, k)
        return self.generate(
            questions, hits.passages, scores, mode=mode, decoding=decoding, num_beams=num_beams,
            max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
            retriever_scores=hits.scores.tolist(), method=method, on_token=on_token,
        )

    def generate(
        self,
        questions: Sequence[str],
        passages: Sequence[Sequence[Passage]],
        doc_scores: torch.Tensor,
        mode: str = "token",
        decoding: str = "greedy",
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        num_return_sequences: int = 1,
        retriever_scores: list[list[float]] | None = None,
        method: str | None = None,
        on_token: Callable[[list[int]], None] | None = None,
        encoded: Encoded | None = None,
    ) -> list[Answer]:
        """Answer with passages and document scores (B, k) given by the caller (no retrieval),
        as transformers' RAG accepts ``context_input_ids`` and ``doc_scores``.

        ``encoded``: :meth:`encode_prompts` of the same questions and passages, to decode them
        several ways (RAG-Token and RAG-Sequence, greedy and beam) while running the generator's
        encoder, or a causal generator's prompts, once.
        """
        method = method or decoding_method(mode, decoding)
        cfg = self._decode_config(decoding, num_beams, max_new_tokens, num_return_sequences)
        if encoded is not None:
            inputs = encoded.inputs
            if inputs.batch_size != len(questions) or inputs.n_docs != len(passages[0]):
                raise MarginError(
                    f"encoded prompts hold {inputs.batch_size} questions x {inputs.n_docs} "
                    f"passages, not {len(questions)} x {len(passages[0])}; pass the output of "
                    "encode_prompts for these questions and passages"
                )
        else:
            inputs = self.generator.build_inputs(list(questions), passages)
        doc_scores = doc_scores.detach().float()
        decoded = decode(self.generator, inputs, doc_scores, cfg, method, on_token, encoded)  # type: ignore[arg-type]
        prior = scores_prior(doc_scores).tolist()
        raw = retriever_scores or doc_scores.tolist()
        return [
            answer_of(q, ps, d, pr, rs, mode, decoding, self.generator, self.postprocess)
            for q, ps, d, pr, rs in zip(questions, passages, decoded, prior, raw, strict=True)
        ]

    @torch.no_grad()
    def encode_prompts(
        self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]
    ) -> Encoded:
        """The generator's encoding of every (question, passage) pair, for :meth:`generate`'s
        ``encoded``: the encoder output (seq2seq) or the prompts' KV cache (causal)."""
        return self.generator.encode(self.generator.build_inputs(list(questions), passages))

    def ask_closed_book(
        self,
        questions: Sequence[str],
        decoding: str = "greedy",
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
    ) -> list[Answer]:
        """The generator alone, on the same prompt minus the passage: the paper's closed-book
        baseline ("BART" in Tables 1-4). One context row per question with prior 1, so both
        modes reduce to plain greedy or beam search on the generator; no passages come back."""
        questions = cut_questions(questions)
        decoding_method("sequence", decoding)  # validates the name
        cfg = self._decode_config(decoding, num_beams, max_new_tokens, 1)
        inputs = self.generator.build_inputs(questions, None)  # (B rows, k=1)
        decoded = decode(self.generator, inputs, torch.zeros(len(questions), 1), cfg, "token")
        clean = self.postprocess or (lambda text: text)
        return [
            Answer(q, clean(d.best.text), d.best.logprob, "none", decoding, [],
                   nbest=[(clean(h.text), h.logprob) for h in d.nbest])
            for q, d in zip(questions, decoded, strict=True)
        ]

    def _decode_config(
        self, decoding: str, num_beams: int | None, max_new_tokens: int | None, n_return: int
    ) -> DecodeConfig:
        beams = _given_or_default("num_beams", num_beams, max(self.default_decode.num_beams, 1))
        return DecodeConfig(
            num_beams=1 if decoding == "greedy" else beams,
            max_new_tokens=_given_or_default(
                "max_new_tokens", max_new_tokens, self.default_decode.max_new_tokens),
            min_new_tokens=self.default_decode.min_new_tokens,
            length_penalty=self.default_decode.length_penalty,
            early_stopping=self.default_decode.early_stopping,
            num_return_sequences=n_return,
        )

    # -- training ------------------------------------------------------------------------------

    def loss(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        k: int | None = None,
        mode: str | None = None,
        hits: Retrieved | None = None,
        reduction: str = "mean",
        passage_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Negative marginal log-likelihood −log p(y|x) of the answers (Sec. 2.4), batched.

        ``k`` and ``mode`` default to the model's own (``default_k``, ``default_mode``), as in
        :meth:`ask`. Gradient reaches the generator and, through the document prior, the question
        encoder. Pass ``hits`` to reuse a retrieval (e.g. cached while the question encoder is
        frozen), and with them ``passage_vectors`` (B, k, d) to score them with d(z) computed by
        the caller (a passage encoder being trained: :meth:`doc_scores`).
        ``mode="both"`` is the mean of the RAG-Token and RAG-Sequence NLLs, from one forward
        (not in the paper, which trains one model per mode: for one model decoded both ways).
        """
        mode = self.default_mode if mode is None else mode
        if mode not in LOSS_MODES:
            raise MarginError(f"unknown mode {mode!r}; use 'token', 'sequence' or 'both'")
        k = _given_or_default("k", k, self.default_k)
        questions = cut_questions(questions)
        if len(answers) != len(questions):
            raise MarginError(f"got {len(questions)} questions but {len(answers)} answers")
        if hits is None:
            if passage_vectors is not None:
                raise MarginError("passage_vectors score given hits; pass the hits too")
            hits, scores = self._retrieve_scored(questions, k)
        else:
            scores = self.doc_scores(questions, hits, passage_vectors)
        doc_logprior = scores_log_prior(scores)  # (B, k)
        inputs: GenInputs = self.generator.build_inputs(list(questions), hits.passages)
        target_ids, target_mask = self.generator.build_targets(list(answers))  # (B, T)
        tok = self.generator.token_logprobs(inputs, target_ids, target_mask)  # (B, k, T)
        if mode == "both":
            token = nll_loss("token", doc_logprior, tok, target_mask, reduction)
            return 0.5 * (token + nll_loss("sequence", doc_logprior, tok, target_mask, reduction))
        return nll_loss(mode, doc_logprior, tok, target_mask, reduction)  # type: ignore[arg-type]


def answer_of(
    question: str,
    passages: Sequence[Passage],
    decoded: Decoded,
    prior: list[float],
    raw_scores: list[float],
    mode: str,
    decoding: str,
    gen: Generator,
    postprocess: Callable[[str], str] | None = None,
) -> Answer:
    best = decoded.best
    clean = postprocess or (lambda text: text)
    provenance = [
        Provenance(p.id, p.title, p.text, p.source, float(s), float(pz), float(post))
        for p, s, pz, post in zip(passages, raw_scores, prior, best.doc_posterior, strict=True)
    ]
    token_docs = None
    if best.token_docs is not None:
        pieces = [gen.decode([t]) for t in best.token_ids]
        token_docs = [(t, int(z)) for t, z in zip(pieces, best.token_docs, strict=True)]
    return Answer(
        question=question,
        answer=clean(best.text),
        logprob=best.logprob,
        mode=mode,
        decoding=decoding,
        passages=provenance,
        token_docs=token_docs,
        nbest=[(clean(h.text), h.logprob) for h in decoded.nbest],
    )


def _given_or_default(name: str, value: int | None, default: int) -> int:
    """``value`` if the caller gave one, else the model's ``default``. A given value must be at
    least 1: 0 is the caller's mistake, not "unset" (``k=0`` is not silently ``default_k``)."""
    if value is None:
        return default
    if value < 1:
        raise MarginError(f"{name} must be at least 1, got {value}")
    return value


def _at_most_the_index(k: int, retriever: RetrieverProtocol) -> int:
    """``k``, or every passage of an index that holds fewer (with a one-line warning): the
    marginals of Sec. 2.1 sum over whichever top-k passages there are, so fewer are fine."""
    n = len(retriever)
    if k <= n:
        return k
    log.warning("the index holds %d passages, fewer than k=%d; using %d (pass --k %d to silence "
                "this)", n, k, n, n)
    return n


def cut_questions(questions: Sequence[str]) -> list[str]:
    """Non-blank questions, each cut to MAX_QUESTION_WORDS words and MAX_QUESTION_CHARS
    characters (warning) so prompts fit."""
    out = check_questions(questions)
    for i, q in enumerate(out):
        words = q.split()
        if len(words) > MAX_QUESTION_WORDS:
            warnings.warn(
                f"question {i + 1} has {len(words)} words; truncated to the first "
                f"{MAX_QUESTION_WORDS} to fit the model's context",
                UserWarning,
                stacklevel=3,
            )
            out[i] = " ".join(words[:MAX_QUESTION_WORDS])
        if len(out[i]) > MAX_QUESTION_CHARS:
            warnings.warn(
                f"question {i + 1} has {len(out[i])} characters; truncated to "
                f"{MAX_QUESTION_CHARS} to fit the model's context",
                UserWarning,
                stacklevel=3,
            )
            out[i] = _cut(out[i], MAX_QUESTION_CHARS)
    return out


def _cut(text: str, max_chars: int) -> str:
    """``text``'s first ``max_chars`` characters, ending at a space when it has one."""
    head = text[: max_chars + 1]
    space = max(head.rfind(c) for c in " \t\n")
    return head[:space].rstrip() if space > 0 else head[:max_chars]
