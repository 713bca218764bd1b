"""Evaluation: one harness for the paper's tasks (Sec. 3), their baselines and analyses.

Why one harness: the paper's numbers are comparisons (RAG-Token vs RAG-Sequence, dense vs BM25
vs closed book, k = 1..50, Thorough vs Fast), so every variant must read the same examples, score
them with the same metrics (margin.evaluation.metrics) and write the same files. ``margin eval`` is
a thin shell over :func:`run_eval`, which plans the grid (margin.evaluation.grid), runs it
(margin.evaluation.runs) and writes the summary (margin.evaluation.report).

What a run writes into its directory:

    predictions.jsonl  one JSON object per example (question, answer, gold, per-example metrics,
                       the passages with their priors), appended and fsynced batch by batch;
                       re-running with the same directory skips the ids already in it (a line
                       torn by a kill is dropped first)
    metrics.json       flat metrics (``exact_match``, ``f1``, ``answer_recall@5``, ``n``,
                       ``seconds_per_example``, ...) plus the settings used; atomic
    report.md          the same as a Markdown table, and the first predictions; atomic
    run.json           the settings; resuming into a directory with other settings is refused

Comma lists (several retrievers, k, modes or decodings) make one run per combination, each in
its own subdirectory (``dense-k5-token-greedy/``); ``--out`` then also gets a summary
``metrics.json`` (``{"runs": [...]}``), one ``report.md`` table (the paper's Table 6 ablation
when several retrievers are given) and, for several k, ``k_sweep.png`` (the paper's Figure 3).

Retrievers: ``dense`` is the model's own question encoder over ``index`` (the learned retriever
of a fine-tuned model), ``dense-frozen`` the index's original encoder, ``bm25`` BM25 over the same
corpus and ``none`` the closed-book generator (same prompt minus the passage). BM25 scores become
the prior as they are, p(z|x) = softmax(BM25(z, x)) (scale 1, the paper's "BM25 scores as logits",
Sec. 4.6): dense cosine scores need a scale (20 for the default model, see margin.rag), while
BM25's top-k scores already differ by whole units (about 1 to 3 between ranks 1 and 5 on the
default corpus), which gives a peaked but not one-hot prior.

FEVER is classification: each claim's three labels are scored as targets, log p(label|x)
marginalised under the mode, and the argmax taken (over SUPPORTS/REFUTES for the 2-way figure).

    >>> from margin.evaluation.evaluate import run_eval
    >>> from margin.evaluation.grid import EvalConfig
    >>> run_eval(EvalConfig(data="nq-dev.tsv", ks=(1, 5, 10), out="eval-nq"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from margin._io import write_json_atomic
from margin.errors import MarginError
from margin.evaluation.examples import Example, read_examples
from margin.evaluation.grid import EvalConfig, RunSpec, check_config, plan_runs, run_settings
from margin.evaluation.report import plot_k_sweep, summary_report
from margin.evaluation.runs import METRICS, PLOT, REPORT, check_settings, evaluate_runs, write_text
from margin.rag import RAG
from margin.retrieval.retriever import Retriever

BM25_DOC_SCORE_SCALE = 1.0  # BM25 scores are the prior's logits as they are (see above)


def run_eval(cfg: EvalConfig, rags: Mapping[str, RAG] | None = None) -> list[dict[str, Any]]:
    """Evaluate every run of the grid; return each run's metrics (what its metrics.json holds).

    ``rags`` maps retriever names to ready RAG objects (tests pass tiny ones); missing ones are
    loaded from ``cfg``. The examples are read, and the options checked (every k against its
    retriever's index, every run directory's settings), before anything is written, so a
    mistake leaves ``cfg.out`` untouched and the corrected command starts afresh.
    """
    check_config(cfg)
    cfg = _resolve_index(cfg)
    examples = read_examples(cfg.data, cfg.format, cfg.task, cfg.limit, regex=cfg.regex)
    _check_unique_ids(examples, cfg.data)
    plan_runs(cfg, default_mode="sequence")  # refuse an empty grid before loading anything
    rags = dict(rags or {})
    missing = set(cfg.retrievers) - set(rags)
    if missing:
        rags.update(load_rags(cfg, missing))
    runs = plan_runs(cfg, rags[cfg.retrievers[0]].default_mode)
    _check_ks(runs, rags)
    out = Path(cfg.out)
    dirs = {run: out if len(runs) == 1 else out / run.name for run in runs}
    for run in runs:  # every run's directory, before the first run writes to its own
        check_settings(dirs[run], run_settings(cfg, run))
    by_run: dict[RunSpec, dict[str, Any]] = {}
    for group in shared_prompt_groups(runs, cfg.task):
        results = evaluate_runs(rags[group[0].retriever], examples, group, cfg,
                                [dirs[run] for run in group])
        by_run.update(zip(group, results, strict=True))
    results = [by_run[run] for run in runs]
    if len(runs) > 1:
        write_json_atomic(out / METRICS, {"runs": results})
        plot = None
        if len({r.k for r in runs if r.k}) > 1:
            plot = plot_k_sweep(cfg.task, results, out / PLOT)
        write_text(out / REPORT, summary_report(cfg, results, plot))
    return results


def _resolve_index(cfg: EvalConfig) -> EvalConfig:
    """``cfg`` with index "auto" made the index it stands for (the model's own or "default"), so
    that a run's settings name it and the frozen retriever opens the same one."""
    from margin.models import resolve_model_index

    return replace(cfg, index=str(resolve_model_index(cfg.model, cfg.index)))


def load_rags(cfg: EvalConfig, retrievers: set[str]) -> dict[str, RAG]:
    """One RAG per retriever name, all sharing one loaded generator."""
    from margin.models import load_model

    dense_index = cfg.index if "dense" in retrievers else None
    base = load_model(cfg.model, dense_index, progress=cfg.progress, device=cfg.device)
    rags: dict[str, RAG] = {}
    for name in retrievers:
        if name in ("dense", "none"):
            rags[name] = base
        elif name == "dense-frozen":
            frozen = Retriever.load(cfg.index, progress=cfg.progress, device=cfg.device)
            rags[name] = base.with_retriever(frozen)
        else:
            rags[name] = base.with_retriever(bm25_retriever(cfg.bm25_index), BM25_DOC_SCORE_SCALE)
    return rags


def bm25_retriever(index: str, progress: bool = True) -> Retriever:
    """A BM25 retriever: the default corpus's cached BM25 index, or a BM25 index directory."""
    from margin.retrieval.retriever import ensure_default_bm25_index

    path = ensure_default_bm25_index(progress) if index == "default" else Path(index)
    retriever = Retriever.load(path, progress=progress)
    if retriever.kind != "bm25":
        raise MarginError(
            f"{index} is a {retriever.kind} index, not BM25; build one with "
            "'margin index build --kind bm25 --corpus ... --out DIR' and pass --bm25-index DIR"
        )
    return retriever


def shared_prompt_groups(runs: Sequence[RunSpec], task: str) -> list[list[RunSpec]]:
    """Runs that read the same prompts, grouped: same retriever and k, differing only in mode or
    decoding. Each group retrieves and encodes a batch once and decodes it every way (the
    decodings of Sec. 2.5 all start from p(z|x) and the generator's encoding of each (x, z)).
    Closed book and FEVER runs stand alone."""
    groups: dict[tuple[str, int] | RunSpec, list[RunSpec]] = {}
    for run in runs:
        alone = task == "fever" or run.retriever == "none"
        groups.setdefault(run if alone else (run.retriever, run.k), []).append(run)
    return list(groups.values())


def _check_ks(runs: Sequence[RunSpec], rags: Mapping[str, RAG]) -> None:
    """Every run's k against its retriever's index: a k too large for one of them is refused
    before any run writes, not after the runs before it (and their run.json) are done."""
    for run in runs:
        if run.retriever == "none":
            continue
        retriever = rags[run.retriever].retriever
        if retriever is None:
            raise MarginError(f"the {run.retriever} retriever has no index; pass --index DIR")
        if run.k > len(retriever):
            raise MarginError(
                f"k={run.k} is larger than the {run.retriever} index ({len(retriever)} "
                "passages); lower --k"
            )


def _check_unique_ids(examples: Sequence[Example], data: str) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise MarginError(
                f"{data}: example id {ex.id!r} occurs twice; give every example its own id "
                "(resuming skips examples by id)"
            )
        seen.add(ex.id)
