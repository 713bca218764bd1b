"""Refreshing an index: re-encode its passages with a changed passage encoder into a new index.

The paper keeps the document encoder fixed during training because "updating the document
encoder is costly, as it requires periodically updating the document index" (Sec. 2.4, and REALM
before it). margin lets the passage encoder learn (``margin train-retriever --passage-encoder
train``); every stored vector d(z) is then stale, and so is the index. :func:`refresh_index`
re-encodes every passage of an index, in the same order with the same ids, titles, texts and
sources, into a NEW index directory of the same kind and settings, through the build machinery
(:func:`margin.retrieval.build.build_index`): written atomically, resumable after a kill, with the
new encoder's fingerprint in its manifest. The result is the index a fresh build of the same
passages with the new encoder gives. BM25 has no passage encoder and needs no refresh.

:class:`BackgroundRefresh` runs that refresh in a separate OS process (``margin index refresh``)
while training continues on the old index; the trainer collects the new index with
:meth:`~BackgroundRefresh.poll` between optimizer steps and swaps it in there, so a step never
mixes vectors of two encoders (the server's hot swap gives the same guarantee per request).

>>> refresh_index("wiki-index", "run/passage-encoder", "wiki-index-step1000")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from margin.errors import MarginError
from margin.retrieval.build import build_index
from margin.retrieval.index import IndexConfig
from margin.retrieval.manifest import MANIFEST, Encoder, Manifest, config_of, work_dir
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index
from margin.retrieval.store import PassageStore

READ_CHUNK = 10_000  # passages read from the old store at a time (bounds memory, not speed)

log = logging.getLogger("margin")


def refresh_index(
    index: str | Path,
    encoder: str | Path | Encoder,
    out: str | Path,
    *,
    batch_size: int = 64,
    progress: bool = True,
    device: str = "cpu",
) -> Manifest:
    """Re-encode every passage of the index ``index`` with ``encoder`` into the new index ``out``.

    encoder: the new passage encoder, or a directory / ``"default"`` for
        :func:`~margin.retrieval.encoders.load_encoder`, loaded on ``device`` ("auto": a CUDA
        GPU when there is one, else the CPU).
    out: a new directory (or an empty one); run the same refresh again after a kill to resume it.
        If ``out`` already holds this very refresh, it is returned as it is; any other index
        there is refused, never replaced.

    The passages, their order, the kind and the index settings are the old index's, and the
    shard size too, so resuming and the result are those of ``build_index``.
    """
    index, out = Path(index), Path(out)
    source, target = index.resolve(), out.resolve()
    if target == source or source in target.parents:
        raise MarginError(
            f"--out {out} is the index being refreshed (or inside it); give a new directory"
        )
    old = open_index(index, mmap=True)
    if old.manifest.kind == "bm25":
        raise MarginError(
            f"{index} is a BM25 index: it has no passage encoder, so it needs no refresh"
        )
    if isinstance(encoder, str | Path):
        from margin.devices import resolve_device
        from margin.retrieval.encoders import load_encoder

        where = str(resolve_device(device))
        encoder = load_encoder(encoder, role="passage", device=where)
    done = _finished_refresh(out, old.manifest, encoder)
    if done is not None:
        log.info("%s already holds this refresh of %s; nothing to do", out, index)
        return done
    log.info("re-encoding %d passages of %s with %r into %s", len(old.store), index, encoder, out)
    return build_index(
        stream_passages(old.store),
        encoder,
        out,
        config=refreshed_config(old.manifest, encoder.dim),
        shard_size=old.manifest.shard_size,
        progress=progress,
        batch_size=batch_size,
        source=old.manifest.corpus,
    )


def stream_passages(store: PassageStore, chunk: int = READ_CHUNK) -> Iterator[Passage]:
    """Every passage of ``store`` in row order, ``chunk`` rows at a time."""
    for start in range(0, len(store), chunk):
        yield from store.get(np.arange(start, min(start + chunk, len(store))))


def refreshed_config(manifest: Manifest, dim: int) -> IndexConfig:
    """The old index's settings for the new vectors: all kept, except that IVF-PQ's
    sub-quantiser count (a divisor of the dimension) is derived again when the dimension
    changed."""
    config = config_of(manifest)
    assert isinstance(config, IndexConfig)  # BM25 was refused before
    old_dim = int(manifest.encoder["dim"]) if manifest.encoder else dim
    if config.kind == "ivfpq" and dim != old_dim:
        config = replace(config, pq_m=None)
    return config


def _finished_refresh(out: Path, old: Manifest, encoder: Encoder) -> Manifest | None:
    """``out``'s manifest if it is this refresh already done; None if ``out`` holds no index."""
    if not (out / MANIFEST).is_file():
        return None  # absent, empty, or not an index (build_index refuses the last)
    manifest = Manifest.read(out)
    fingerprint = (manifest.encoder or {}).get("fingerprint")
    if (manifest.corpus_checksum, manifest.kind, fingerprint) == (
        old.corpus_checksum,
        old.kind,
        encoder.fingerprint,
    ):
        return manifest
    raise MarginError(
        f"{out} already holds another index; give a new --out (or remove that index first)"
    )


# ----------------------------------------------------------------------------- in the background


REFRESH_STEP = re.compile(r"(index|encoder)-step(\d+)")  # what a refresh work folder holds


def prune_refreshes(work: Path, current: Path) -> None:
    """In a training run's refresh folder ``work``: remove the refreshed indexes older than
    ``current`` (the one in use) and the encoder snapshots they and it were encoded from (a
    saved model carries its index as hard links). Logs stay (refresh times). Nothing is removed
    unless ``current`` is one of ``work``'s indexes."""
    match = REFRESH_STEP.fullmatch(current.name)
    if current.parent != work or match is None or match[1] != "index" or not work.is_dir():
        return
    for path in work.iterdir():
        old = REFRESH_STEP.fullmatch(path.name)
        if old and path.is_dir() and (int(old[2]) < int(match[2]) or (
                old[1] == "encoder" and int(old[2]) == int(match[2]))):
            shutil.rmtree(path, ignore_errors=True)


class BackgroundRefresh:
    """One ``margin index refresh`` at a time in a background OS process, for a training loop.

    The trainer saves its passage encoder (``Encoder.save``) and calls ``start``; training goes
    on with the old index while the new one is encoded into ``work/index-step<step>`` (log:
    ``work/index-step<step>.log``). Between optimizer steps, and only there, it calls ``poll``;
    when that returns a path, the trainer opens it and uses it from the next step on. The next
    ``start`` re-encodes that new current index.

    >>> refresh = BackgroundRefresh(index_dir, run_dir / "refresh")  # doctest: +SKIP
    >>> refresh.start(run_dir / "passage-encoder-step100", step=100)  # doctest: +SKIP
    >>> new = refresh.poll()  # between steps: None, or the new index once  # doctest: +SKIP
    """

    def __init__(self, index: Path, work: Path, *, device: str = "cpu", threads: int | None = 1):
        self.index = Path(index)  # the current index: what the next start re-encodes
        self.work = Path(work)  # where new indexes and their logs are written
        self.device = device  # where the refresh process runs its encoder
        self.threads = threads  # CPU threads of the refresh process (None: torch's default), so
        # that it does not fight the training process for every core
        self._process: subprocess.Popen[bytes] | None = None
        self._out: Path | None = None  # the index the running (or unpolled) process writes
        self._log: Path | None = None

    @property
    def running(self) -> bool:
        """Is a refresh process still working?"""
        return self._process is not None and self._process.poll() is None

    def start(self, encoder_dir: Path, step: int) -> bool:
        """Start re-encoding the current index with the encoder saved in ``encoder_dir``.

        Returns False, and does nothing, while an earlier refresh is running or its result has
        not been collected by :meth:`poll` yet.
        """
        if self._process is not None:
            return False
        self.work.mkdir(parents=True, exist_ok=True)
        out = self.work / f"index-step{step}"
        command = [sys.executable, "-m", "margin.cli", "index", "refresh", "--device", self.device]
        for flag, path in (("--index", self.index), ("--encoder", encoder_dir), ("--out", out)):
            command += [flag, str(Path(path).resolve())]
        env = dict(os.environ)
        if self.threads is not None:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self._log = self.work / f"index-step{step}.log"
        with open(self._log, "wb") as log_file:  # the child keeps its own handle
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self._out = out
        log.info(
            "refreshing %s into %s in the background (pid %d)", self.index, out, self._process.pid
        )
        return True

    def poll(self) -> Path | None:
        """The newly completed index, exactly once; None while running or idle.

        A failed refresh raises MarginError with the process's last error line (its partial
        output removed); the next ``start`` may try again.
        """
        if self._process is None or self._process.poll() is None:
            return None
        code, out, log_path = self._process.returncode, self._out, self._log
        self._process = self._out = self._log = None
        assert out is not None and log_path is not None
        if code != 0 or not (out / MANIFEST).is_file():
            _remove(work_dir(out))
            raise MarginError(
                f"the background index refresh into {out} failed: {_last_line(log_path, code)} "
                f"(log: {log_path})"
            )
        self.index = out
        return out

    def close(self) -> None:
        """Stop a running refresh and remove its partial output (a finished index is kept)."""
        process, out = self._process, self._out
        self._process = self._out = self._log = None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if out is not None:
            _remove(work_dir(out))

    def __enter__(self) -> BackgroundRefresh:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _last_line(log_path: Path, code: int) -> str:
    """The refresh's error: the CLI's last ``margin: error:`` line, else its last line."""
    try:
        with open(log_path, "rb") as f:
            text = _tail(f).decode("utf-8", errors="replace")
    except OSError:
        text = ""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    errors = [
        line.removeprefix("margin: error:").strip()
        for line in lines
        if line.startswith("margin: error:")
    ]
    if errors:
        return errors[-1]
    if code < 0:
        return f"killed by signal {-code}"
    return lines[-1] if lines else f"exit code {code}"


def _tail(f: IO[bytes], size: int = 64 * 1024) -> bytes:
    """The last ``size`` bytes of a file (progress bars make logs long)."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - size))
    return f.read()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
