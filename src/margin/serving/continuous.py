"""Continuous batching: RAG-Token greedy requests join the running decode between steps.

The micro-batcher (margin.serving.batching) runs a batch from its first decoding step to its
last: a request that arrives meanwhile waits for the whole batch, and a batch's short answers
wait for its long ones. Here one worker thread keeps ONE running batch of (question, passage)
rows and, between two decoding steps:

1. admits queued requests while the batch has room (``max_rows`` rows; a request larger than
   that runs when the batch is empty, alone): their questions are retrieved and their prompts
   prefilled exactly as ``RAG.ask`` does (requests over the same index and k together, one
   retrieval and one prefill; the passage KV cache is used when it is on);
2. runs one step for every row at once: one forward of the running rows (a newcomer's first
   step comes from its prefill), then each question's greedy RAG-Token choice from its own k
   rows and passage prior (margin.generation.continuous.GreedyToken);
3. lets finished questions' rows leave and the newcomers' rows join
   (margin.generation.continuous.regroup), and answers every request whose questions are done.

The answers are ``RAG.ask``'s for each request alone: the same tokens, log-probabilities to float
rounding (tests/test_continuous_batching.py). Only RAG-Token greedy decoding of a causal model
runs here; beam search and RAG-Sequence reorder or re-score whole batches, and run on the
micro-batcher's own worker, so a slow one never holds a token request behind it.

A request's failure is its own: one that cannot be prefilled (a prompt too long, say) fails
alone, the others of its prefill group are prefilled again each alone; if a decoding step fails,
every request in the running batch is answered again alone by ``fallback`` (``RAG.ask``), as the
micro-batcher does, and only those that fail alone get the error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from margin.errors import MarginError
from margin.generation.causal import CausalGenerator
from margin.generation.continuous import GreedyToken, regroup
from margin.generation.decoding import check_decode_inputs
from margin.generation.generator import DecodeState, Generator
from margin.marginalize import scores_log_prior, scores_prior
from margin.rag import Answer, answer_of, cut_questions
from margin.retrieval.passages import Passage
from margin.serving.batching import JobQueue, RunBatch
from margin.serving.schemas import AskKey
from margin.serving.streaming import Question, TokenStream

log = logging.getLogger("margin.serving.continuous")


def decodes_continuously(generator: Generator) -> bool:
    """Whether the running batch can hold this generator's rows: a causal model's (a seq2seq
    model's rows would also carry their encoder outputs; they are micro-batched instead)."""
    return isinstance(generator, CausalGenerator)


def joins_running_batch(key: Any) -> bool:
    """Whether requests of ``key`` decode in the running batch: RAG-Token greedy asks."""
    return isinstance(key, AskKey) and key.mode == "token" and key.decoding == "greedy"


@dataclass(eq=False)
class _Job:
    """One request: its questions, and their answers as they finish."""

    key: AskKey
    items: list[Question]
    future: Future
    answers: list[Answer | None] = field(default_factory=list)


@dataclass(eq=False)
class _Decoding:
    """One question in the running batch: k rows, its search and what its answer shows."""

    job: _Job
    index: int  # its place among the job's questions
    question: str  # as checked (cut to fit) by RAG.ask's rules
    search: GreedyToken
    passages: Sequence[Passage]
    prior: list[float]  # p(z|x) of its k passages
    scores: list[float]  # their retriever scores
    stream: TokenStream | None


class ContinuousBatcher(JobQueue):
    """A queue of RAG-Token greedy requests and the one thread that decodes them as one batch."""

    job_type = _Job

    def __init__(self, generator: Generator, fallback: RunBatch, max_rows: int = 40,
                 max_pending: int = 256, name: str = "margin-token"):
        """``fallback(key, items)`` answers one request alone (``RAG.ask``) after a failed step."""
        if max_rows < 1:
            raise MarginError(f"max_running_rows must be at least 1, got {max_rows}")
        super().__init__(max_pending, name)
        self.generator, self.fallback = generator, fallback
        self.max_rows = max_rows
        self._state: DecodeState | None = None  # the running rows, question-major
        self._decoding: list[_Decoding] = []  # their questions, in row order
        self.steps_run = 0  # decoding steps run (for tests and benchmarks)
        self.items_run = 0  # questions answered
        self.joined = 0  # questions that joined a batch already decoding
        self._thread.start()

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        with torch.no_grad():
            while (newcomers := self._admit()) is not None:
                try:
                    self._step(newcomers)
                except Exception as exc:
                    self._recover(newcomers, exc)
        for job in {id(d.job): d.job for d in self._decoding}.values():
            _fail(job, MarginError("the server is shutting down"))

    def _admit(self) -> list[_Job] | None:
        """Queued requests that fit the batch's room, oldest first (waits while idle)."""
        with self._cond:
            while not self._decoding and not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            rows = sum(d.search.k for d in self._decoding)
            taken: list[_Job] = []
            while self._pending:
                job = self._pending[0]
                need = len(job.items) * job.key.k
                if rows + need > self.max_rows and (rows or taken):
                    break  # no room now; it joins when rows leave (queue order is kept)
                self._pending.popleft()
                if job.future.set_running_or_notify_cancel():  # else its client gave up
                    taken.append(job)
                    rows += need
            return taken

    def _step(self, newcomers: list[_Job]) -> None:
        """Prefill the newcomers, run one step for every row, let rows join and leave."""
        gen = self.generator
        parts: list[tuple[DecodeState, list[_Decoding]]] = []
        if self._state is not None:
            parts.append((self._state, self._decoding))
        parts += self._prefill(newcomers)
        if not parts:
            return
        if self._state is not None and len(parts) > 1:
            self.joined += sum(len(ds) for _, ds in parts[1:])
        kept_parts, finished = [], []
        for state, decoding in parts:
            logprobs = gen.step(state)  # (n, V): a forward, or a newcomer's prefill logits
            k_rows, tokens, keep = 0, [], []
            for d in decoding:
                token = d.search.step(logprobs[k_rows : k_rows + d.search.k])
                if d.stream is not None:
                    d.stream.push(token)
                tokens += [token] * d.search.k
                if d.search.done or d.job.future.done():
                    finished.append(d)
                else:
                    keep += range(k_rows, k_rows + d.search.k)
                k_rows += d.search.k
            n = state.last_tokens.numel()
            dev = state.last_tokens.device
            gen.advance(state, torch.tensor(tokens, device=dev), torch.arange(n, device=dev),
                        moves="none")  # greedy: no row moves here; finished rows leave below
            rows = torch.tensor(keep, dtype=torch.long, device=dev)
            kept_parts.append((state, rows, [d for d in decoding if d not in finished]))
        self.steps_run += 1
        live = [(s, r) for s, r, _ in kept_parts if r.numel()]
        if len(kept_parts) == 1 and live and live[0][1].numel() == live[0][0].last_tokens.numel():
            self._state = live[0][0]  # nobody joined or left: the cache grows in place
        else:
            self._state = regroup(live) if live else None
        self._decoding = [d for *_, ds in kept_parts for d in ds]
        for d in finished:
            self._finish(d)

    def _prefill(self, jobs: list[_Job]) -> list[tuple[DecodeState, list[_Decoding]]]:
        """Newcomers' prompts, those over the same index and k together; a group that fails is
        prefilled again request by request, so only a request that fails alone gets the error."""
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault((id(job.key.entry), job.key.k), []).append(job)
        out = []
        pending = list(groups.values())
        while pending:
            group = pending.pop(0)
            try:
                out.append(self._start(group))
            except Exception as exc:
                if len(group) == 1:
                    _fail(group[0], exc)
                else:
                    log.info("a prefill of %d requests failed (%s); each alone", len(group), exc)
                    pending[:0] = [[job] for job in group]
        return out

    def _start(self, jobs: list[_Job]) -> tuple[DecodeState, list[_Decoding]]:
        """``RAG.ask``'s steps before decoding, for requests sharing an index and k: check the
        questions, retrieve, the prior p(z|x), build and prefill the prompts."""
        gen, rag, k = self.generator, jobs[0].key.entry.rag, jobs[0].key.k
        if rag.generator is not gen:
            raise MarginError("this index's model is not the one the running batch decodes")
        asked = [(job, i, q) for job in jobs for i, q in
                 enumerate(cut_questions([item.text for item in job.items]))]
        questions = [q for _, _, q in asked]
        hits, scores = rag._retrieve_scored(questions, k)
        doc_scores = scores.detach().float()  # (B, k)
        inputs = gen.build_inputs(questions, hits.passages)
        configs = {}
        for job in jobs:
            job.answers = [None] * len(job.items)
            cfg = rag._decode_config("greedy", None, job.key.max_new_tokens, 1)
            check_decode_inputs(gen, inputs, doc_scores, cfg)
            configs[id(job)] = cfg
        log_prior = scores_log_prior(doc_scores).to(gen.device)  # (B, k)
        state = gen.start(gen.encode(inputs), expand=1)  # rows (B*k,), first step pending
        prior, raw = scores_prior(doc_scores).tolist(), hits.scores.tolist()
        decoding = [
            _Decoding(job, i, q, GreedyToken(gen, log_prior[b], configs[id(job)]),
                      hits.passages[b], prior[b], raw[b], job.items[i].stream)
            for b, (job, i, q) in enumerate(asked)
        ]
        return state, decoding

    def _finish(self, d: _Decoding) -> None:
        """Answer the question; complete its request when it was the request's last."""
        job = d.job
        if job.future.done():
            return
        try:
            rag = job.key.entry.rag
            job.answers[d.index] = answer_of(d.question, d.passages, d.search.decoded(), d.prior,
                                           d.scores, "token", "greedy", self.generator,
                                           rag.postprocess)
        except Exception as exc:
            _fail(job, exc)
            return
        if all(a is not None for a in job.answers):
            self.items_run += len(job.answers)
            job.future.set_result(job.answers)

    def _recover(self, newcomers: list[_Job], exc: Exception) -> None:
        """A step failed: answer every request in the batch again alone, through ``fallback``."""
        jobs = {id(d.job): d.job for d in self._decoding} | {id(j): j for j in newcomers}
        self._state, self._decoding = None, []
        live = [job for job in jobs.values() if not job.future.done()]
        log.info("a decoding step of %d requests failed (%s); each alone", len(live), exc)
        for job in live:
            try:
                results = list(self.fallback(job.key, job.items))
            except Exception as alone:
                _fail(job, alone)
            else:
                self.items_run += len(results)
                job.future.set_result(results)


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
