"""The passage encoder trained inside RAG's loss, and the index kept up with it (``margin train
--passage-encoder train [--refresh-every N]``).

The paper trains the question encoder q(x) and the generator and keeps the document encoder d(z)
and its index fixed, because "updating the document encoder is costly, as it requires
periodically updating the document index" (Lewis et al., 2020, Sec. 2.4; REALM refreshes it
asynchronously). Here d(z) learns too. The prior is the paper's

    p_eta(z|x) ∝ exp(s · d(z)ᵀ q(x))   (Sec. 2.2)

and both towers are now in the autograd graph: the k passages are still found by the index (its
stored, stale vectors, outside autograd), but their document scores are recomputed from the
TRAINED passage encoder applied to each passage's title and text exactly as the index encoded
them (:meth:`~margin.retrieval.encoders.Encoder.embed_passages`), so the gradient of −log p(y|x)
reaches d(z) through p(z|x) (:class:`PassageTower`; ``RAG.loss(..., passage_vectors=...)``).
This is transformers' rag-end2end idea, inside the one training loop (margin.training.train).

Every stored vector d(z) is then stale, and so is which passages the index finds. With
``refresh_every`` N, every N steps a snapshot of the passage encoder re-encodes the index in a
background process (margin.retrieval.refresh.BackgroundRefresh) while training goes on with the
old index; the new index is swapped in between two optimizer steps once it is complete, so every
micro-batch of a step retrieves from one index. At the end of the run the index is re-encoded
once more with the final passage encoder (in this process), so the saved model, its question
encoder and its index belong together; without ``refresh_every`` that is the only refresh.

How stale it gets: each swap is logged with the steps the refresh took and the largest
|d_stored(z) − d_now(z)| over the passages of the last step, for the old index (stale for N
steps plus the refresh) and the new one (stale for the refresh's steps): docs/training.md.

A saved model (OUT/last, OUT/best) records its index's passage encoder fingerprint
(``index_encoder_fingerprint``, margin.models.save_model) and, when the index is a refreshed one,
carries it as ``DIR/index`` (hard links), which ``--model DIR`` opens by default. The passage
encoder's newest weights, ahead of every index, live in the training state (``OUT/state``) only.
Refreshed indexes and encoder snapshots are written under ``OUT/refresh/``; the state records the
index in use and a refresh not yet swapped in, so ``--resume`` continues on the same index and
finishes that refresh.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from margin._io import atomic_path
from margin.checkpoint import save_checkpoint
from margin.errors import MarginError
from margin.model_config import MODEL_INDEX
from margin.rag import RAG
from margin.retrieval.encoders import Encoder, load_encoder_from_spec
from margin.retrieval.passages import Passage
from margin.retrieval.reader import ensure_encoder_matches, open_index
from margin.retrieval.refresh import REFRESH_STEP, prune_refreshes
from margin.retrieval.retriever import Retrieved, Retriever


def load_passage_encoder(rag: RAG, device: str) -> Encoder:
    """A trainable copy of the passage encoder that built ``rag``'s index (its manifest's spec),
    checked to be the very weights the index holds vectors of."""
    retriever = rag.retriever
    built = None if retriever is None else retriever.index_encoder
    if retriever is None or built is None or not hasattr(retriever, "index"):
        raise MarginError("--passage-encoder train needs a dense index opened in this process; "
                          "drop it, or --retriever bm25 / --ray-retrieval")
    encoder = load_encoder_from_spec(dict(built["spec"], role="passage"), device=device)
    ensure_encoder_matches(retriever.index.manifest, encoder)
    return encoder


@dataclass
class _Pending:
    """A refresh started and not swapped in yet."""

    step: int  # the optimizer step whose passage encoder it re-encodes with
    encoder: Path  # that encoder's snapshot (OUT/refresh/encoder-step<step>)
    began: float  # when it started (perf_counter of this process)


class PassageTower:
    """The trained passage encoder d(z) of one run and the index kept up with it."""

    def __init__(self, encoder: Encoder, work: Path, refresh_every: int, device: str):
        self.encoder = encoder
        self.work = Path(work)  # OUT/refresh
        self.refresh_every = refresh_every
        self.device = device
        self.refresher: Any = None  # a BackgroundRefresh, made on the first refresh
        self.pending: _Pending | None = None
        self._last: tuple[list[Passage], np.ndarray, np.ndarray] | None = None  # last scored
        # hits: passages (B*k), rows (B, k) and stored vectors (B, k, d), to measure staleness

    # -- the document scores -------------------------------------------------------------------

    def vectors(self, hits: Retrieved) -> torch.Tensor:
        """d(z) of the hits' passages from the trained encoder, with gradient: (B, k, d)."""
        flat = [p for row in hits.passages for p in row]
        if hits.vectors is not None:
            self._last = (flat, hits.rows, hits.vectors)
        embedded = self.encoder.embed_passages(flat)  # (B*k, d)
        return embedded.view(len(hits.passages), -1, embedded.shape[-1])  # (B, k, d)

    # -- between steps: refresh and swap -------------------------------------------------------

    def after_step(self, rag: RAG, step: int, total: int, progress: bool = False
                   ) -> dict[str, Any] | None:
        """Start a background refresh every ``refresh_every`` steps, or after the last step
        re-encode here (:meth:`finish`); a log record when one started, was skipped or ended."""
        if step >= total:
            return self.finish(rag, step, progress)
        if not self.refresh_every or step % self.refresh_every:
            return None
        if self.pending is not None:
            return {"step": step, "refresh_skipped": "one still running"}
        snapshot = self.work / f"encoder-step{step}"
        with atomic_path(snapshot) as tmp:
            self.encoder.save(tmp)
        self._start(_index_path(rag), snapshot, step)
        return {"step": step, "refresh_started": str(snapshot)}

    def before_step(self, rag: RAG, step: int) -> dict[str, Any] | None:
        """Between two steps, and only there: swap in a refresh that has completed. Returns the
        swap's log record: the steps and seconds the refresh took, and how stale the old and the
        new index are on the last step's passages."""
        if self.refresher is None or self.pending is None:
            return None
        new = self.refresher.poll()
        if new is None:
            return None
        pending, self.pending = self.pending, None
        record = {"step": step, "index": str(new), "refresh_steps": step - pending.step,
                  "refresh_s": time.perf_counter() - pending.began}
        record.update(self._staleness(open_index(new)))
        swap_index(rag, Path(new))
        return record

    def finish(self, rag: RAG, step: int, progress: bool) -> dict[str, Any] | None:
        """After the last step: stop a refresh still running and re-encode the index with the
        final passage encoder here, so the saved model and its index belong together."""
        self.close()
        current = rag.retriever.index  # type: ignore[union-attr]
        if current.manifest.encoder["fingerprint"] == self.encoder.fingerprint:
            return None
        from margin.retrieval.refresh import refresh_index

        began = time.perf_counter()
        out = self.work / f"index-step{step}"
        refresh_index(current.path, self.encoder, out, progress=progress, device=self.device)
        record = {"step": step, "index": str(out), "refresh_steps": 0, "final": True,
                  "refresh_s": time.perf_counter() - began}
        record.update(self._staleness(open_index(out)))
        swap_index(rag, out)
        return record

    def close(self) -> None:
        """Stop a background refresh (its partial output removed); the snapshot stays."""
        if self.refresher is not None:
            self.refresher.close()
        self.pending = None

    def carried(self, rag: RAG) -> Path | None:
        """The index a saved model carries: the one in use when it is a refreshed one."""
        current = _index_path(rag)
        return current if current.parent == self.work else None

    # -- the training state --------------------------------------------------------------------

    def state(self, rag: RAG) -> dict[str, Any]:
        """What ``--resume`` needs: the index in use and the refresh not swapped in yet."""
        pending = None if self.pending is None else {"step": self.pending.step,
                                                      "encoder": str(self.pending.encoder)}
        return {"current_index": str(_index_path(rag)), "refresh_pending": pending}

    def resume(self, rag: RAG, record: dict[str, Any]) -> None:
        """Continue as the saved state left off: on its index, with its pending refresh running
        again (a killed refresh resumes; a finished one is taken as it is), and without what
        the steps after the save had written."""
        current = Path(record["current_index"])
        if current != _index_path(rag):
            if not (current / "manifest.json").is_file():
                raise MarginError(f"the index the run was using, {current}, is gone; resume "
                                  "needs it (or start a new --out)")
            swap_index(rag, current)
        pending = record.get("refresh_pending")
        for path in self.work.glob("*"):  # refreshes begun after the save are redone
            match = REFRESH_STEP.fullmatch(path.name.removeprefix(".").removesuffix(".building"))
            if match and int(match[2]) > record["step"]:
                shutil.rmtree(path, ignore_errors=True)
        if pending is not None and Path(pending["encoder"]).is_dir():
            self._start(current, Path(pending["encoder"]), int(pending["step"]))

    def prune(self, rag: RAG) -> None:
        """After a save: refreshed indexes older than the one in use, and their snapshots, go
        (margin.retrieval.refresh.prune_refreshes); the logs stay."""
        prune_refreshes(self.work, _index_path(rag))

    # -- inside --------------------------------------------------------------------------------

    def _start(self, index: Path, snapshot: Path, step: int) -> None:
        """Re-encode ``index`` (the one in use) with the encoder saved in ``snapshot``."""
        if self.refresher is None:
            self.refresher = make_refresher(index, self.work, self.device)
        self.refresher.index = index
        if not self.refresher.start(snapshot, step):
            raise MarginError(f"a refresh is already running in {self.work}")
        self.pending = _Pending(step, snapshot, time.perf_counter())

    def _staleness(self, new: Any) -> dict[str, float]:
        """max |d_stored − d_now| over the last scored passages: the old index's vectors
        (``stale_max_abs``) and ``new``'s (``fresh_max_abs``), d_now without dropout."""
        if self._last is None or new.dense is None:
            return {}
        passages, rows, stored = self._last
        now = self.encoder.encode_passages(passages).reshape(stored.shape)  # (B, k, d)
        fresh = new.dense.vectors(rows)  # (B, k, d): a refresh keeps every passage's row
        return {"stale_max_abs": float(np.abs(now - stored).max()),
                "fresh_max_abs": float(np.abs(now - fresh).max())}


def _index_path(rag: RAG) -> Path:
    return Path(rag.retriever.index.path)  # type: ignore[union-attr]


def swap_index(rag: RAG, path: Path) -> None:
    """Point ``rag`` at the index in ``path``, with the same question encoder (its dimension
    checked; its weights trained away from the index's on purpose)."""
    rag.retriever = Retriever(open_index(path), rag.question_encoder, check=False)


def make_refresher(index: Path, work: Path, device: str) -> Any:
    """The background refresher (a test may put a synchronous one in its place)."""
    from margin.retrieval.refresh import BackgroundRefresh

    return BackgroundRefresh(Path(index), work, device=device)


def save_with_index(rag: RAG, where: Path, tower: PassageTower | None, peft_model: Any,
                    mode: str, k: int) -> None:
    """``save_checkpoint`` of ``rag``, atomically; with a trained passage encoder whose index was
    refreshed, carrying that index as ``where/index`` (hard links): the one the model's question
    encoder belongs to, which ``--model where`` then opens by default."""
    carry = None if tower is None else tower.carried(rag)
    if carry is None:
        save_checkpoint(rag, where, peft_model, mode, k)
        return
    from margin.models import link_index

    with atomic_path(where) as tmp:
        save_checkpoint(rag, tmp, peft_model, mode, k)
        link_index(carry, open_index(carry).manifest, tmp / MODEL_INDEX)
