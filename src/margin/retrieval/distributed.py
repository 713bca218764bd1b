"""Index building on a Ray cluster: many encoder copies, one index directory.

Encoding is the slow part of building RAG's memory: DPR's 21M passages took hours on 8 GPUs
(Sec. 3 of the paper; App. C). This module spreads the encoding of an index build over the
workers of a Ray cluster (``ray.init()`` on this machine, or an existing cluster's address) and
keeps everything else exactly as :func:`margin.retrieval.build.build_index` does it:

1. The driver streams the corpus into shards of ``shard_size`` passages (one shard in memory at
   a time per queued task) and writes each shard's passages (Arrow) into the same work
   directory ``.<name>.building/``, with the same build plan, as a local build.
2. Each shard is sent to one of ``workers`` Ray actors. An actor builds its own encoder once
   (from the encoder's spec: it loads the same weights from disk; a worker whose weights
   fingerprint differs is refused) and returns the shard's vectors; the driver writes them as
   ``embeddings/shard-*.npy``, atomically, as they arrive (in any order).
3. When every shard is there, the search structure, the manifest and the final rename are those
   of the local build (:func:`margin.retrieval.build.finish_build`).

So a Ray build and a local build of the same corpus give the same directory (same ids and
checksums; vectors equal up to float rounding of the encoder), and either one resumes the other:
a finished shard is kept only if its passages match the corpus and its vectors are complete.
Workers that die mid-build (a killed process, a lost node) are restarted by Ray and their shards
retried (``max_restarts``); if the driver itself dies, run the same build again.

Memory on the driver is bounded by the shards in flight: at most ``workers * in_flight + 1``
shards of passages and their vectors, whatever the size of the corpus.

>>> build_index_ray("wiki.jsonl", encoder, "wiki-index", kind="ivfpq")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from margin.errors import MarginError, require
from margin.retrieval.bm25 import BM25Config
from margin.retrieval.build import (
    DEFAULT_SHARD_SIZE,
    discard_if_unstarted,
    encode_shard,
    finish_build,
    iter_shards,
    prepare_build,
    save_npy,
    shard_done,
    shard_paths,
)
from margin.retrieval.index import IndexConfig
from margin.retrieval.manifest import Encoder, Manifest, ShardInfo
from margin.retrieval.passages import Passage, read_corpus
from margin.retrieval.store import EMPTY_CHECKSUM, shard_name, write_shard

INSTALL = "pip install 'margin[ray]'"

log = logging.getLogger("margin")


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide a Ray build runs."""

    address: str | None = None  # cluster to join ("auto", "ray://head:10001"); None: local one
    workers: int | None = None  # encoder actors; None: one per CPU (GPU) of the cluster
    cpus_per_worker: float = 1.0  # CPUs each encoder actor reserves
    gpus_per_worker: float = 0.0  # GPUs each encoder actor reserves; >0 puts encoders on GPUs
    in_flight: int = 2  # shards queued per worker (bounds driver memory, keeps workers busy)
    max_restarts: int = 3  # a dead worker is restarted (and its shards retried) this often


def connect(address: str | None = None) -> Any:
    """The ``ray`` module, initialised: reuse a running session, else start/join a cluster.

    ``address=None`` starts a local cluster on this machine; ``"auto"`` joins the one started by
    ``ray start`` here; ``"ray://host:port"`` joins a remote one.
    """
    ray: Any = require("ray", INSTALL)
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError) as exc:
            raise MarginError(
                f"cannot reach the Ray cluster at {address!r} ({_first_line(exc)}); start it "
                "with `ray start --head` or pass --ray without an address for a local one"
            ) from None
    return ray


def build_index_ray(
    corpus: str | Path | Iterable[Passage],
    encoder: Encoder,
    out: str | Path,
    kind: str | None = None,
    config: IndexConfig | BM25Config | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int = 64,
    ray_config: RayConfig | None = None,
    encoder_factory: Callable[[], Encoder] | None = None,
    source: str | Path | None = None,
) -> Manifest:
    """Build (or resume) the index ``out`` as :func:`margin.retrieval.build.build_index` does,
    encoding
    the shards on Ray workers.

    encoder: the passage encoder, on the driver: its fingerprint, spec and dim go into the plan
        and the manifest (it encodes nothing here).
    encoder_factory: builds a worker's copy of the encoder, called once in each Ray actor;
        None: :func:`worker_encoder` on ``encoder.spec``, on the worker's GPU if it has one
        (the weights must be readable at the same path, or hub cache, on every node).
    source: as :func:`~margin.retrieval.build.build_index`'s, the folder or file read into
        ``corpus``.
    """
    ray_config = ray_config or RayConfig()
    if isinstance(config, BM25Config) or kind == "bm25":
        raise MarginError("a BM25 index needs no encoding; build it without --ray")
    if ray_config.in_flight < 1:
        raise MarginError(f"in_flight must be >= 1, got {ray_config.in_flight}")
    out, config, work = prepare_build(
        corpus, encoder, out, kind, config, shard_size, overwrite, source
    )
    assert isinstance(config, IndexConfig)
    if encoder_factory is None:
        encoder_factory = functools.partial(worker_encoder, dict(encoder.spec))
    try:
        passages = read_corpus(corpus) if isinstance(corpus, str | Path) else iter(corpus)
        shards = _encode_on_ray(
            ray_config, encoder_factory, encoder, work, passages, shard_size, batch_size, progress
        )
        return finish_build(work, out, shards, config, encoder, shard_size)
    except BaseException:
        discard_if_unstarted(work)
        raise


def _encode_on_ray(
    ray_config: RayConfig,
    encoder_factory: Callable[[], Encoder],
    encoder: Encoder,
    work: Path,
    passages: Iterable[Passage],
    shard_size: int,
    batch_size: int,
    progress: bool,
) -> list[ShardInfo]:
    """Connect to Ray (starting it if needed), encode every shard on a pool, disconnect."""
    started = not _ray_running()
    ray = connect(ray_config.address)
    try:
        pool = _EncoderPool(ray, ray_config, encoder_factory, encoder.fingerprint, encoder.dim)
        try:
            return _encode_shards(pool, work, passages, shard_size, batch_size, progress)
        finally:
            pool.close()
    finally:
        if started:
            ray.shutdown()


def _encode_shards(
    pool: _EncoderPool,
    work: Path,
    passages: Iterable[Passage],
    shard_size: int,
    batch_size: int,
    progress: bool,
) -> list[ShardInfo]:
    """Write every shard's passages, have the pool encode the unfinished ones, save the vectors."""
    from tqdm import tqdm

    shards: list[ShardInfo] = []
    kept = 0
    with tqdm(desc="indexing (ray)", unit=" passages", disable=not progress) as bar:
        for number, batch, before, after in iter_shards(
            iter(passages), shard_size, 0, EMPTY_CHECKSUM
        ):
            arrow, npy = shard_paths(work, number)
            shards.append(ShardInfo(shard_name(number, ""), len(batch), after))
            if shard_done(arrow, npy, before, after, len(batch)):
                kept += 1
                bar.update(len(batch))
                continue
            npy.unlink(missing_ok=True)  # its passages are about to change
            write_shard(arrow, batch, before)
            for path, vectors in pool.submit(npy, batch, batch_size):
                save_npy(path, vectors)
                bar.update(len(vectors))
        for path, vectors in pool.drain():
            save_npy(path, vectors)
            bar.update(len(vectors))
    if kept:
        log.info("reused %d finished shard(s) from the interrupted build in %s", kept, work)
    return shards


class _EncoderPool:
    """Ray actors holding one encoder each; shards go to the least busy one."""

    def __init__(
        self,
        ray: Any,
        config: RayConfig,
        factory: Callable[[], Encoder],
        fingerprint: str,
        dim: int,
    ):
        self.ray = ray
        self.in_flight = config.in_flight
        resources = ray.cluster_resources()
        per = "GPU" if config.gpus_per_worker > 0 else "CPU"
        size = config.gpus_per_worker if per == "GPU" else config.cpus_per_worker
        workers = config.workers or max(1, int(resources.get(per, 1) // size))
        actor = ray.remote(_EncoderWorker).options(
            num_cpus=config.cpus_per_worker,
            num_gpus=config.gpus_per_worker,
            max_restarts=config.max_restarts,
            max_task_retries=config.max_restarts,
        )
        self.workers = [actor.remote(factory, fingerprint, dim) for _ in range(workers)]
        self.load = [0] * workers  # tasks queued on each worker
        self.pending: dict[Any, tuple[Path, int]] = {}  # ref -> (npy path, worker)

    def submit(
        self, npy: Path, batch: Sequence[Passage], batch_size: int
    ) -> list[tuple[Path, np.ndarray]]:
        """Queue one shard; return the shards that finished while waiting for room."""
        finished = []
        while len(self.pending) >= self.in_flight * len(self.workers):
            finished.extend(self._wait())
        worker = int(np.argmin(self.load))
        ref = self.workers[worker].encode.remote(list(batch), batch_size)
        self.pending[ref] = (npy, worker)
        self.load[worker] += 1
        return finished

    def drain(self) -> list[tuple[Path, np.ndarray]]:
        """Wait for every queued shard."""
        finished = []
        while self.pending:
            finished.extend(self._wait())
        return finished

    def _wait(self) -> list[tuple[Path, np.ndarray]]:
        ray = self.ray
        done, _ = ray.wait(list(self.pending), num_returns=1)
        out = []
        for ref in done:
            npy, worker = self.pending.pop(ref)
            self.load[worker] -= 1
            try:
                vectors = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # raised in the worker: show its cause
                if isinstance(exc.cause, MarginError):
                    raise MarginError(str(exc.cause)) from None
                raise
            except ray.exceptions.RayActorError as exc:
                raise MarginError(
                    f"a Ray encoder worker died while encoding {npy.name} "
                    f"({_first_line(exc)}); run the same build again to resume it "
                    "(finished shards are kept)"
                ) from None
            out.append((npy, vectors))
        return out

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)


def worker_encoder(spec: dict[str, Any]) -> Encoder:
    """The encoder ``spec`` describes, on the worker's GPU when Ray gave it one, else its CPU.

    Resolved inside the worker: Ray sets CUDA_VISIBLE_DEVICES for each actor, so a worker
    without ``gpus_per_worker`` sees no GPU even on a GPU node.
    """
    from margin.devices import resolve_device
    from margin.retrieval.encoders import load_encoder_from_spec

    return load_encoder_from_spec(spec, device=str(resolve_device("auto")))


class _EncoderWorker:
    """A Ray actor: one copy of the passage encoder, built on first use in the worker."""

    def __init__(self, factory: Callable[[], Encoder], fingerprint: str, dim: int):
        self.factory, self.fingerprint, self.dim = factory, fingerprint, dim
        self.encoder: Encoder | None = None

    def encode(self, batch: list[Passage], batch_size: int) -> np.ndarray:
        """Vectors of one shard: (len(batch), dim) float32, as the local build computes them."""
        if self.encoder is None:
            encoder = self.factory()
            if encoder.fingerprint != self.fingerprint or encoder.dim != self.dim:
                raise MarginError(
                    f"a Ray worker loaded encoder {encoder.fingerprint[:12]} ({encoder.dim}-d), "
                    f"not the driver's {self.fingerprint[:12]} ({self.dim}-d); make the same "
                    "weights available on every node"
                )
            self.encoder = encoder
        return encode_shard(self.encoder, batch, batch_size)


def _ray_running() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]
