"""Data-parallel fine-tuning over several processes (torch.distributed), started by ``torchrun``.

Why: fine-tuning (Sec. 2.4, margin.training.train) is one model replica per process; with W
processes each takes 1/W of every micro-batch, and the gradients are summed across processes
before the optimizer step, so every replica takes the step one process would take on the whole
micro-batch (the data order comes from the seed alone, margin.training.schedule.epoch_order).
The retrieval index is the large part: with ``--ray-retrieval`` every process searches one
shared copy per machine, a Ray actor (margin.retrieval.sharded.retrieval_actor, wired in by
:func:`with_ray_retrieval`), as transformers' Ray retriever does.

Why not ``torch.nn.parallel.DistributedDataParallel``: DDP wraps one ``forward`` per backward,
but a RAG loss runs the generator several times (the prompts once into a KV cache, then the
targets on it) and the question encoder beside it. Summing the gradients after ``backward``
(one flat all-reduce per step) is what DDP's reducer does, without that constraint.

How to run (two processes on one machine, gloo on CPU, NCCL on GPUs)::

    torchrun --nproc-per-node 2 -m margin.cli train --train nq.tsv --out run --ray-retrieval

``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (set by torchrun) start the process group;
rank 0 alone writes logs and checkpoints and runs dev evaluation. Without them, one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from margin.errors import MarginError
from margin.rag import RAG


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes logs and checkpoints (rank 0)."""
        return self.rank == 0

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This process's part of a micro-batch: every ``size``-th row from ``rank``."""
        return rows[self.rank :: self.size]


SINGLE = World()


def init_world() -> World:
    """The process group torchrun's environment describes, or :data:`SINGLE` without one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise MarginError(
            f"WORLD_SIZE={size} but {', '.join(missing)} unset; start the processes with "
            "`torchrun --nproc-per-node N -m margin.cli train ...`"
        )
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size())


def sum_gradients(params: Sequence[torch.nn.Parameter], world: World) -> None:
    """Sum every parameter's gradient over the processes, in place (one flat all-reduce).

    A parameter with no gradient here (its process had no rows in the step) counts as zeros.
    """
    if world.size <= 1 or not params:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def sum_value(value: float, world: World) -> float:
    """A float summed over the processes (the step's loss from each process's share)."""
    if world.size <= 1:
        return value
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(world: World) -> None:
    """Wait for every process (rank 0 saving a checkpoint the others must not outrun)."""
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def with_ray_retrieval(
    model: str, index: str, address: str | None, world: World = SINGLE, progress: bool = True
) -> RAG:
    """``model`` with its retrieval served by the machine's shared Ray actor over ``index``
    (margin.retrieval.sharded.retrieval_actor): the index is loaded once per machine, not per
    process."""
    from margin.models import check_index_encoder
    from margin.retrieval.retriever import resolve_index
    from margin.retrieval.sharded import RemoteRetriever, retrieval_actor

    if world.main:  # the default index is built (once) before any process opens it
        resolve_index(index, progress=progress)
    barrier(world)
    path = resolve_index(index, progress=False)
    rag = RAG.load(model=model, index=None, progress=progress)
    if rag.question_encoder is None:
        raise MarginError(f"{model} has no question encoder to search {path} with")
    remote = RemoteRetriever(retrieval_actor(path, address=address), rag.question_encoder)
    check_index_encoder(path, remote.index_encoder, rag.config.index_encoder_fingerprint, model)
    return rag.with_retriever(remote)
