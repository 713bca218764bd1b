"""The evaluation grid: what ``margin eval`` runs (:class:`EvalConfig`), its points
(:class:`RunSpec`: one retriever, k, mode and decoding) and the checks made before anything runs.

Comma lists of retrievers, k, modes and decodings make one run per combination
(:func:`plan_runs`); :func:`run_settings` is what makes two runs comparable, the settings a run's
``run.json`` records. Nothing here loads a model or writes a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from margin._io import check_out_dir
from margin.devices import resolve_device
from margin.errors import MarginError
from margin.evaluation.examples import FORMATS, TASKS
from margin.rag import DECODINGS, MODES

RETRIEVERS = ("dense", "dense-frozen", "bm25", "none")


@dataclass(frozen=True)
class EvalConfig:
    """What ``margin eval`` runs; each CLI flag sets one field."""

    task: str = "qa"  # qa, generation or fever
    data: str = ""  # the examples file
    format: str = "auto"  # its format: auto, dpr-tsv, dpr-jsonl, kilt or jsonl
    model: str = "default"  # 'default', a margin checkpoint or a transformers RAG directory
    index: str = "auto"  # dense index DIR, 'default', or 'auto' (the model's own, else 'default')
    bm25_index: str = "default"  # BM25 index directory for --retriever bm25 ('default' corpus)
    retrievers: tuple[str, ...] = ("dense",)  # dense, dense-frozen, bm25, none; several: ablation
    ks: tuple[int, ...] = (5,)  # passages per question; several: a sweep and its plot
    modes: tuple[str, ...] = ()  # token and/or sequence; empty: the model's own default
    decodings: tuple[str, ...] = ("greedy",)  # greedy, beam, thorough, fast
    beams: int = 4  # beams for beam, thorough and fast decoding
    max_new_tokens: int | None = None  # longest answer in tokens; the model's default if None
    limit: int | None = None  # evaluate the first N examples only
    batch_size: int = 8  # questions per generation batch
    out: str = "eval"  # output directory
    seed: int = 0  # torch/numpy/random seed, set before each run
    regex: bool = False  # gold answers are regular expressions (CuratedTrec)
    progress: bool = True  # progress bar with ETA on stderr
    device: str = "auto"  # where the networks run: auto (CUDA if any, else CPU), cpu, cuda[:N]


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid: which retriever, how many passages, which decoding."""

    retriever: str  # one of RETRIEVERS
    k: int  # passages per question; 0 for closed book
    mode: str  # token or sequence; "none" for closed book
    decoding: str  # greedy, beam, thorough, fast; "score" for FEVER

    @property
    def name(self) -> str:
        if self.retriever == "none":
            return f"none-{self.decoding}"
        return f"{self.retriever}-k{self.k}-{self.mode}-{self.decoding}"


# ----------------------------------------------------------------------------- planning


def check_config(cfg: EvalConfig) -> None:
    """Refuse bad options before anything is loaded or written."""
    _choices("task", (cfg.task,), TASKS)
    _choices("format", (cfg.format,), FORMATS)
    _choices("retriever", cfg.retrievers, RETRIEVERS)
    _choices("mode", cfg.modes, MODES)
    _choices("decoding", cfg.decodings, DECODINGS)
    if not cfg.retrievers or not cfg.ks or not cfg.decodings:
        raise MarginError("give at least one retriever, one k and one decoding")
    counts = [("k", min(cfg.ks)), ("beams", cfg.beams), ("batch size", cfg.batch_size)]
    if cfg.max_new_tokens is not None:  # None: the model's default; 0 is a mistake, not None
        counts.append(("max_new_tokens", cfg.max_new_tokens))
    for name, value in counts:
        if value < 1:
            raise MarginError(f"{name} must be at least 1, got {value}")
    if not cfg.data:
        raise MarginError("no data file given; pass --data FILE")
    check_out_dir(cfg.out)
    resolve_device(cfg.device)


def plan_runs(cfg: EvalConfig, default_mode: str = "token") -> list[RunSpec]:
    """Every (retriever, k, mode, decoding) combination, in the order given.

    Closed book ignores k and mode. Thorough and Fast decoding are RAG-Sequence's (Sec. 2.5), so
    they are skipped for RAG-Token; FEVER scores its labels and ignores the decoding.
    """
    modes = cfg.modes or (default_mode,)
    decodings = ("score",) if cfg.task == "fever" else cfg.decodings
    runs: list[RunSpec] = []
    for retriever in cfg.retrievers:
        if retriever == "none":
            runs += [RunSpec("none", 0, "none", d) for d in decodings]
            continue
        for k in cfg.ks:
            for mode in modes:
                runs += [
                    RunSpec(retriever, k, mode, d) for d in decodings
                    if not (mode == "token" and d in ("thorough", "fast"))
                ]
    runs = list(dict.fromkeys(runs))
    if not runs:
        raise MarginError(
            "thorough and fast decoding are RAG-Sequence's (Sec. 2.5); add --mode sequence, "
            "or use greedy/beam with RAG-Token"
        )
    return runs


def run_settings(cfg: EvalConfig, run: RunSpec) -> dict[str, Any]:
    """What makes two runs comparable (not ``limit`` or ``batch_size``: a rerun may extend)."""
    index = {"dense": cfg.index, "dense-frozen": cfg.index, "bm25": cfg.bm25_index}
    return {
        "task": cfg.task, "data": str(Path(cfg.data).resolve()), "format": cfg.format,
        "model": cfg.model, "index": index.get(run.retriever), **asdict(run),
        "beams": 1 if run.decoding == "greedy" else cfg.beams,
        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "regex": cfg.regex,
    }


def _choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    for value in values:
        if value not in allowed:
            raise MarginError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
