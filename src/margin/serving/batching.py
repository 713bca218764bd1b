"""Micro-batching: concurrent requests share one model call, run by one worker thread.

A RAG forward pass on a batch of questions costs little more than on one (the generator runs
questions x passages rows at once, margin.generation.decoding), so a service that answers each
request on
its own wastes the machine under load. The batcher queues requests; its single worker takes the
oldest one and, for up to ``max_wait_ms``, gathers the queued requests that can share its model
call (same key: same index, mode, k, ...) until ``max_batch`` items. Only that worker touches the
model, so the model needs no locks and is never run by two threads at once. A job's failure is its
own: when a batch's call fails, each of its jobs is run again alone, and only those that fail
alone get the error.

    >>> batcher = MicroBatcher(lambda key, items: [x * 2 for x in items])
    >>> batcher.submit("double", [1, 2]).result()
    [2, 4]
    >>> batcher.close()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from margin.errors import MarginError

log = logging.getLogger("margin.serving.batching")
RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]  # (key, items) -> one result per item


@dataclass(frozen=True)
class BatchConfig:
    """How long and how large a batch may grow."""

    max_batch: int = 8  # items (questions) per model call at most; 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long the oldest request waits for others to join its batch
    max_pending: int = 256  # queued requests at most; beyond it submit() refuses (server busy)


class BatcherBusy(MarginError):
    """The queue is full: the caller should answer 503 and the client retry later."""


@dataclass(eq=False)
class _Job:
    key: Hashable  # jobs with equal keys may share a model call
    items: list[Any]  # the job's items, contiguous in the batch
    future: Future  # resolves to the job's results, one per item


class JobQueue:
    """What every batcher has in front of its worker: a bounded queue of jobs, the one thread
    that takes them (``_work``, the subclass's), and a clean close. A subclass sets its own
    state, then calls ``_thread.start()``."""

    job_type: Callable[[Hashable, list[Any], Future], Any] = _Job

    def __init__(self, max_pending: int, name: str):
        self.max_pending = max_pending
        self._pending: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def submit(self, key: Hashable, items: Sequence[Any]) -> Future:
        """Queue ``items`` to run together with others of the same ``key``; a Future of results.

        Cancelling the Future before the worker takes the job drops the job.
        """
        job = self.job_type(key, list(items), Future())
        with self._cond:
            if self._closed:
                raise MarginError("the batcher is closed; the server is shutting down")
            if len(self._pending) >= self.max_pending:
                raise BatcherBusy(
                    f"{len(self._pending)} requests are already queued; retry in a moment"
                )
            self._pending.append(job)
            self._cond.notify()
        return job.future

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (the service is ready)."""
        return self._thread.is_alive() and not self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, cancel those still queued, and let the worker finish its work."""
        with self._cond:
            self._closed = True
            while self._pending:
                self._pending.popleft().future.cancel()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _work(self) -> None:
        raise NotImplementedError


class MicroBatcher(JobQueue):
    """A queue of jobs and the one thread that runs them in batches through ``run``."""

    def __init__(self, run: RunBatch, config: BatchConfig | None = None, name: str = "batcher"):
        self.run = run
        self.config = config or BatchConfig()
        if self.config.max_batch < 1:
            raise MarginError(f"max_batch must be at least 1, got {self.config.max_batch}")
        super().__init__(self.config.max_pending, name)
        self.batches_run = 0  # model calls made (for tests and benchmarks)
        self.items_run = 0  # items answered
        self._thread.start()

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        """Wait for a job, then gather same-key jobs for up to max_wait_ms or max_batch items."""
        cfg = self.config
        with self._cond:
            first = None
            while first is None:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._pending.popleft()
                if not first.future.set_running_or_notify_cancel():
                    first = None  # cancelled while queued (its client gave up)
            batch, size = [first], len(first.items)
            deadline = time.monotonic() + cfg.max_wait_ms / 1000
            while size < cfg.max_batch:
                size = self._take_matching(first.key, batch, size)
                left = deadline - time.monotonic()
                if size >= cfg.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _take_matching(self, key: Hashable, batch: list[_Job], size: int) -> int:
        """Move queued jobs with ``key`` that still fit into ``batch`` (queue order kept)."""
        keep: deque[_Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            fits = job.key == key and size + len(job.items) <= self.config.max_batch
            if fits and job.future.set_running_or_notify_cancel():
                batch.append(job)
                size += len(job.items)
            elif fits:
                continue  # cancelled: drop it
            else:
                keep.append(job)
        self._pending = keep
        return size

    def _run(self, batch: list[_Job]) -> None:
        """One model call for the batch; if it fails, each job again on its own, so that a job
        that cannot be run (a prompt too long, say) fails alone and the others are answered."""
        try:
            results = self._call(batch)
        except Exception as exc:
            if len(batch) == 1:  # the worker survives; the caller sees the error
                batch[0].future.set_exception(exc)
                return
            log.info("a batch of %d jobs failed (%s); running each alone", len(batch), exc)
            for job in batch:
                self._run([job])
            return
        start = 0
        for job in batch:
            job.future.set_result(results[start : start + len(job.items)])
            start += len(job.items)

    def _call(self, batch: list[_Job]) -> list[Any]:
        items = [item for job in batch for item in job.items]
        results = list(self.run(batch[0].key, items))
        if len(results) != len(items):
            raise RuntimeError(f"run returned {len(results)} results for {len(items)} items")
        self.batches_run += 1
        self.items_run += len(items)
        return results
