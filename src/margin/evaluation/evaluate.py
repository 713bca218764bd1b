"""Evaluation: one harness for the paper's tasks (Sec. 3), their baselines and analyses.

Why one harness: the paper's numbers are comparisons (RAG-Token vs RAG-Sequence, dense vs BM25
vs closed book, k = 1..50, Thorough vs Fast), so every variant must read the same examples, score
them with the same metrics (margin.evaluation.metrics) and write the same files. ``margin eval`` is
a thin
shell over :func:`run_eval`.

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

    >>> from margin.evaluation.evaluate import EvalConfig, run_eval
    >>> run_eval(EvalConfig(data="nq-dev.tsv", ks=(1, 5, 10), out="eval-nq"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from margin._io import atomic_path, write_json_atomic
from margin.devices import resolve_device
from margin.errors import MarginError
from margin.evaluation import metrics as M
from margin.evaluation.examples import FEVER_LABELS, FORMATS, TASKS, Example, read_examples
from margin.rag import DECODINGS, MODES, RAG
from margin.retrieval.retriever import Retriever

RETRIEVERS = ("dense", "dense-frozen", "bm25", "none")
BM25_DOC_SCORE_SCALE = 1.0  # BM25 scores are the prior's logits as they are (see above)
PREDICTIONS, METRICS, REPORT, SETTINGS, PLOT = (
    "predictions.jsonl", "metrics.json", "report.md", "run.json", "k_sweep.png",
)
SHOWN_PREDICTIONS = 10  # examples listed in a run's report.md


@dataclass(frozen=True)
class EvalConfig:
    """What ``margin eval`` runs; each CLI flag sets one field."""

    task: str = "qa"  # qa, generation or fever
    data: str = ""  # the examples file
    format: str = "auto"  # its format: auto, dpr-tsv, dpr-jsonl, kilt or jsonl
    model: str = "default"  # 'default', a margin checkpoint or a transformers RAG directory
    index: str = "default"  # dense index directory, or 'default'
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
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise MarginError(f"--out {cfg.out} is a file, not a directory; pass a directory")
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


# ----------------------------------------------------------------------------- running


def run_eval(cfg: EvalConfig, rags: Mapping[str, RAG] | None = None) -> list[dict[str, Any]]:
    """Evaluate every run of the grid; return each run's metrics (what its metrics.json holds).

    ``rags`` maps retriever names to ready RAG objects (tests pass tiny ones); missing ones are
    loaded from ``cfg``. The examples are read, and the options checked (every k against its
    retriever's index, every run directory's settings), before anything is written, so a
    mistake leaves ``cfg.out`` untouched and the corrected command starts afresh.
    """
    check_config(cfg)
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
        _check_settings(dirs[run], run_settings(cfg, run))
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
        _write_text(out / REPORT, summary_report(cfg, results, plot))
    return results


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
            rags[name] = with_retriever(base, frozen, base.doc_score_scale)
        else:
            rags[name] = with_retriever(base, bm25_retriever(cfg.bm25_index), BM25_DOC_SCORE_SCALE)
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


def with_retriever(rag: RAG, retriever: Retriever, doc_score_scale: float) -> RAG:
    """The same generator and decoding defaults over another retriever (the Table 6 ablation)."""
    return RAG(
        rag.generator, retriever, question_encoder=retriever.encoder,
        doc_score_scale=doc_score_scale, default_decode=rag.default_decode,
        postprocess=rag.postprocess, default_mode=rag.default_mode, default_k=rag.default_k,
    )


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


def evaluate_runs(
    rag: RAG, examples: Sequence[Example], runs: Sequence[RunSpec], cfg: EvalConfig,
    dirs: Sequence[Path],
) -> list[dict[str, Any]]:
    """Predict the examples not yet in each run's predictions.jsonl, then score them all.

    ``runs`` is one group of :func:`shared_prompt_groups`, ``dirs`` their output directories.
    A run's ``seconds`` per example is what it costs alone: the batch's shared retrieval and
    encoding plus its own decoding.
    """
    from tqdm import tqdm

    settings = [run_settings(cfg, run) for run in runs]
    for out, setting in zip(dirs, settings, strict=True):
        _check_settings(out, setting)
    for out, setting in zip(dirs, settings, strict=True):
        if not (out / SETTINGS).exists():
            write_json_atomic(out / SETTINGS, setting)
    paths = [out / PREDICTIONS for out in dirs]
    done = [read_predictions(path) for path in paths]
    todo = [ex for ex in examples if any(ex.id not in d for d in done)]
    _seed(cfg.seed)
    bar = tqdm(
        total=len(examples), initial=len(examples) - len(todo),
        desc=" + ".join(run.name for run in runs), unit=" q", disable=not cfg.progress,
        dynamic_ncols=True,
    )
    with bar, ExitStack() as stack:
        files = [stack.enter_context(open(path, "a", encoding="utf-8")) for path in paths]
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            predicted = predict_runs(rag, batch, runs, cfg)
            for f, d, (records, seconds) in zip(files, done, predicted, strict=True):
                for record in records:
                    if record["id"] in d:
                        continue
                    record["seconds"] = seconds
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    d[record["id"]] = record
                f.flush()
                os.fsync(f.fileno())  # a kill loses at most the batch being written
            bar.update(len(batch))
    results = []
    for out, d, run, setting in zip(dirs, done, runs, settings, strict=True):
        records = [d[ex.id] for ex in examples]
        result = {**aggregate(cfg.task, records, run.k), **setting}
        write_json_atomic(out / METRICS, result)
        _write_text(out / REPORT, run_report(result, records))
        results.append(result)
    return results


def predict_runs(
    rag: RAG, batch: Sequence[Example], runs: Sequence[RunSpec], cfg: EvalConfig
) -> list[tuple[list[dict[str, Any]], float]]:
    """Each run's prediction records for a batch, and its seconds per example.

    Runs with passages share the batch's retrieval, prior and prompt encoding
    (:meth:`RAG.encode_prompts`); closed book and FEVER go through :func:`predict`.
    """
    if cfg.task == "fever" or runs[0].retriever == "none":
        began = time.perf_counter()
        records = predict(rag, batch, runs[0], cfg)
        return [(records, (time.perf_counter() - began) / len(batch))]
    questions = [ex.input for ex in batch]
    began = time.perf_counter()
    hits = rag.retrieve(questions, runs[0].k)
    with torch.no_grad():
        scores = rag.doc_scores(questions, hits)
    encoded = rag.encode_prompts(questions, hits.passages)
    shared = time.perf_counter() - began
    out = []
    for run in runs:
        began = time.perf_counter()
        answers = rag.generate(
            questions, hits.passages, scores, mode=run.mode, decoding=run.decoding,
            num_beams=cfg.beams, max_new_tokens=cfg.max_new_tokens,
            retriever_scores=hits.scores.tolist(), encoded=encoded,
        )
        seconds = (shared + time.perf_counter() - began) / len(batch)
        out.append((prediction_records(cfg, batch, answers), seconds))
    return out


def predict(
    rag: RAG, batch: Sequence[Example], run: RunSpec, cfg: EvalConfig
) -> list[dict[str, Any]]:
    """Prediction records for a batch of one run without shared prompts: FEVER, closed book."""
    if cfg.task == "fever":
        return _predict_fever(rag, batch, run)
    questions = [ex.input for ex in batch]
    answers = rag.ask_closed_book(questions, run.decoding, cfg.beams, cfg.max_new_tokens)
    return prediction_records(cfg, batch, answers)


def prediction_records(
    cfg: EvalConfig, batch: Sequence[Example], answers: Sequence[Any]
) -> list[dict[str, Any]]:
    """One JSON-able record per (example, answer)."""
    records = []
    for ex, answer in zip(batch, answers, strict=True):
        passages = [
            {"id": p.id, "title": p.title, "text": p.text, "score": p.score, "prior": p.prior,
             "posterior": p.posterior}
            for p in answer.passages
        ]
        records.append({
            "id": ex.id, "question": ex.input, "answer": answer.answer, "gold": list(ex.answers),
            "logprob": answer.logprob,
            "metrics": example_metrics(cfg.task, ex, answer.answer, passages),
            "passages": passages,
        })
    return records


def _predict_fever(rag: RAG, batch: Sequence[Example], run: RunSpec) -> list[dict[str, Any]]:
    """Score the three labels as targets and take the argmax (3-way) and the SUPPORTS/REFUTES
    argmax (2-way)."""
    claims = [ex.input for ex in batch]
    logprobs, passages = label_logprobs(rag, claims, run, FEVER_LABELS)  # (B, 3)
    records = []
    for i, ex in enumerate(batch):
        row = logprobs[i].tolist()
        three = FEVER_LABELS[int(np.argmax(row))]
        two = M.FEVER_2WAY[int(np.argmax(row[:2]))]
        gold = ex.answers[0]
        records.append({
            "id": ex.id, "question": ex.input, "answer": three, "answer_2way": two,
            "gold": list(ex.answers), "label_logprobs": dict(zip(FEVER_LABELS, row, strict=True)),
            "metrics": {"accuracy": M.label_accuracy([three], [gold]),
                        **_provenance_metrics(ex, passages[i])},
            "passages": passages[i],
        })
    return records


@torch.no_grad()
def label_logprobs(
    rag: RAG, inputs: Sequence[str], run: RunSpec, labels: Sequence[str]
) -> tuple[torch.Tensor, list[list[dict[str, Any]]]]:
    """log p(label|x) (B, L) for every input and label, marginalised under ``run.mode`` over
    the top-k passages (closed book: the generator alone), and each input's passages."""
    from margin.marginalize import marginal_logprob

    gen, B, L = rag.generator, len(inputs), len(labels)
    repeated = [x for x in inputs for _ in range(L)]
    target_ids, target_mask = gen.build_targets(list(labels) * B)  # (B*L, T)
    if run.k == 0:
        ctx = gen.build_inputs(repeated, None)
        logprior = torch.zeros(B * L, 1)  # (B*L, 1): one context, prior 1
        shown: list[list[dict[str, Any]]] = [[] for _ in inputs]
    else:
        hits = rag.retrieve(list(inputs), run.k)
        prior = torch.log_softmax(rag.doc_scores(list(inputs), hits).float(), -1)  # (B, k)
        logprior = prior.repeat_interleave(L, 0)  # (B*L, k)
        ctx = gen.build_inputs(repeated, [ps for ps in hits.passages for _ in range(L)])
        shown = [
            [{"id": p.id, "title": p.title, "text": p.text, "score": float(s), "prior": float(z)}
             for p, s, z in zip(ps, ss, pr, strict=True)]
            for ps, ss, pr in zip(hits.passages, hits.scores, prior.exp().tolist(), strict=True)
        ]
    tok = gen.token_logprobs(ctx, target_ids, target_mask)  # (B*L, k, T)
    mode = "sequence" if run.mode == "none" else run.mode
    lp = marginal_logprob(mode, logprior.to(tok.device), tok, target_mask)  # type: ignore[arg-type]
    return lp.view(B, L).cpu(), shown


# ----------------------------------------------------------------------------- scoring


def example_metrics(
    task: str, ex: Example, answer: str, passages: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Per-example metrics of a QA or generation prediction."""
    out: dict[str, Any] = {}
    if task == "qa":
        out["exact_match"] = M.exact_match(answer, ex.answers, ex.regex)
        out["f1"] = M.token_f1(answer, ex.answers, ex.regex)
        if passages:
            out["answer_in_passages"] = M.has_answer([p["text"] for p in passages], ex.answers,
                                                     ex.regex)
    else:
        out["rouge_l"] = M.rouge_l([answer], [ex.answers])
        out["q_bleu_1"] = M.qbleu1([answer], [ex.answers])
    return {**out, **_provenance_metrics(ex, passages)}


def _provenance_metrics(ex: Example, passages: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    if not ex.provenance or not passages:
        return {}
    return {"r_precision": M.r_precision([p["title"] for p in passages], ex.provenance)}


def aggregate(task: str, records: Sequence[Mapping[str, Any]], k: int) -> dict[str, Any]:
    """The run's flat metrics from its prediction records (all fractions in [0, 1])."""
    per = [r["metrics"] for r in records]
    out: dict[str, Any] = {"n": len(records)}
    if task == "qa":
        out["exact_match"] = _mean(m["exact_match"] for m in per)
        out["f1"] = _mean(m["f1"] for m in per)
        if k:
            hit = [m for m in per if m.get("answer_in_passages")]
            out[f"answer_recall@{k}"] = len(hit) / len(per)
            out["n_answer_retrieved"] = len(hit)
            out["exact_match_answer_retrieved"] = _mean(m["exact_match"] for m in hit)
    elif task == "generation":
        hyps, refs = [r["answer"] for r in records], [r["gold"] for r in records]
        out["bleu_1"] = M.bleu(hyps, refs, order=1)
        out["bleu_4"] = M.bleu(hyps, refs, order=4)
        out["rouge_l"] = M.rouge_l(hyps, refs)
        out["q_bleu_1"] = M.qbleu1(hyps, refs)
    else:
        golds = [r["gold"][0] for r in records]
        out["accuracy"] = M.label_accuracy([r["answer"] for r in records], golds)
        out["accuracy_2way"] = M.two_way_accuracy([r["answer_2way"] for r in records], golds)
        out["n_2way"] = sum(g.upper() in M.FEVER_2WAY for g in golds)
    with_prov = [m["r_precision"] for m in per if "r_precision" in m]
    if with_prov:
        out["r_precision"] = _mean(with_prov)
    out["seconds_per_example"] = _mean(r["seconds"] for r in records)
    return out


def retrieval_recall(
    retriever: Retriever, examples: Sequence[Example], ks: Sequence[int], batch_size: int = 256
) -> dict[str, float]:
    """Answer recall@k for every k in ``ks`` from one top-max(ks) retrieval (no generation)."""
    top = max(ks)
    hits = {k: 0 for k in ks}
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        found = retriever.retrieve([ex.input for ex in batch], k=top)
        for ex, passages in zip(batch, found.passages, strict=True):
            texts = [p.text for p in passages]
            for k in ks:
                hits[k] += int(M.has_answer(texts[:k], ex.answers, ex.regex))
    return {f"answer_recall@{k}": hits[k] / len(examples) for k in ks}


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- files


def run_settings(cfg: EvalConfig, run: RunSpec) -> dict[str, Any]:
    """What makes two runs comparable (not ``limit`` or ``batch_size``: a rerun may extend)."""
    index = {"dense": cfg.index, "dense-frozen": cfg.index, "bm25": cfg.bm25_index}
    return {
        "task": cfg.task, "data": str(Path(cfg.data).resolve()), "format": cfg.format,
        "model": cfg.model, "index": index.get(run.retriever), **asdict(run),
        "beams": 1 if run.decoding == "greedy" else cfg.beams,
        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "regex": cfg.regex,
    }


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into ``out`` if its run.json holds other settings (reads only)."""
    path = out / SETTINGS
    if not path.exists():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    diff = [key for key in settings if old.get(key) != settings[key]]
    if diff:
        key = diff[0]
        raise MarginError(
            f"{out} holds a run with {key}={old.get(key)!r}, not {settings[key]!r}; "
            "use another --out, or delete it to start over"
        )


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


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """The records already in predictions.jsonl, by id.

    Only newline-terminated lines count: a final fragment without its newline (a run killed
    mid-write) is cut off the file and predicted again. A bad complete line is an error.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # b"" when there is no newline at all
    records: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise MarginError(
                f"{path}:{lineno}: not valid JSON; delete {path} to predict everything again"
            ) from None
        records[record["id"]] = record
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return records


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _columns(task: str) -> list[tuple[str, str]]:
    """(metrics key, table header) of the task's headline metrics."""
    if task == "qa":
        return [("exact_match", "EM"), ("f1", "F1"), ("answer_recall@k", "answer recall@k"),
                ("exact_match_answer_retrieved", "EM, answer retrieved")]
    if task == "generation":
        return [("bleu_1", "BLEU-1"), ("bleu_4", "BLEU-4"), ("rouge_l", "ROUGE-L"),
                ("q_bleu_1", "Q-BLEU-1")]
    return [("accuracy", "3-way acc"), ("accuracy_2way", "2-way acc")]


def _value(result: Mapping[str, Any], key: str) -> Any:
    """A metric of a run; ``answer_recall@k`` means the run's own k."""
    if key == "answer_recall@k":
        key = f"answer_recall@{result['k']}"
    return result.get(key)


def run_report(result: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    """report.md of one run: its settings, its metrics (x100) and the first predictions."""
    name = RunSpec(result["retriever"], result["k"], result["mode"], result["decoding"]).name
    lines = [
        f"# margin eval: {name}", "",
        f"{result['task']} on `{result['data']}` (n={result['n']}), model `{result['model']}`, "
        f"index `{result['index']}`, seed {result['seed']}.", "",
        "| metric | value |", "|---|---:|",
    ]
    for key, header in _columns(result["task"]):
        header = header.replace("@k", f"@{result['k']}")
        lines.append(f"| {header} | {_pct(_value(result, key))} |")
    if "r_precision" in result:
        lines.append(f"| R-precision | {_pct(result['r_precision'])} |")
    lines += [f"| seconds per example | {result['seconds_per_example']:.3f} |", "",
              "## First predictions", "", "| input | prediction | gold |", "|---|---|---|"]
    for r in records[:SHOWN_PREDICTIONS]:
        gold = "; ".join(r["gold"][:3]) + (" ..." if len(r["gold"]) > 3 else "")
        lines.append(f"| {_cell(r['question'])} | {_cell(r['answer'])} | {_cell(gold)} |")
    return "\n".join(lines) + "\n"


def summary_table(task: str, results: Sequence[Mapping[str, Any]]) -> str:
    """One Markdown row per run: settings, headline metrics x100, seconds per example."""
    columns = _columns(task)
    lines = ["| retriever | k | mode | decoding | n | "
             + " | ".join(h for _, h in columns) + " | s/example |",
             "|---|---:|---|---|---:|" + "---:|" * len(columns) + "---:|"]
    for r in results:
        cells = " | ".join(_pct(_value(r, key)) for key, _ in columns)
        lines.append(
            f"| {r['retriever']} | {r['k'] or '-'} | {r['mode']} | {r['decoding']} | {r['n']} | "
            f"{cells} | {r['seconds_per_example']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def summary_report(
    cfg: EvalConfig, results: Sequence[Mapping[str, Any]], plot: Path | None
) -> str:
    text = (f"# margin eval: {cfg.task} on `{cfg.data}`\n\nModel `{cfg.model}`, seed {cfg.seed}; "
            "metrics x100; each run's predictions are in its subdirectory.\n\n")
    text += summary_table(cfg.task, results)
    if plot is not None:
        text += f"\n![k sweep]({plot.name})\n"
    return text


def plot_k_sweep(task: str, results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The paper's Figure 3: the headline metric (solid) and, for QA, answer recall@k (dashed)
    against k, one colour per (retriever, mode, decoding); closed book as a flat dotted line."""
    from margin.errors import require

    require("matplotlib", "pip install 'margin[eval]'")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key, label = _columns(task)[0]
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        series.setdefault((r["retriever"], r["mode"], r["decoding"]), []).append(r)
    for (retriever, mode, decoding), rows in series.items():
        name = f"{retriever} {mode} {decoding}"
        if retriever == "none":
            ax.axhline(100 * (rows[0][key] or 0), linestyle=":", color="grey", label=f"{name}")
            continue
        rows = sorted(rows, key=lambda r: r["k"])
        ks = [r["k"] for r in rows]
        (line,) = ax.plot(ks, [100 * (r[key] or 0) for r in rows], marker="o",
                          label=f"{label}, {name}")
        if task == "qa":
            ax.plot(ks, [100 * r[f"answer_recall@{r['k']}"] for r in rows], marker="s",
                    linestyle="--", color=line.get_color(), label=f"answer recall@k, {name}")
    ax.set_xlabel("k (retrieved passages)")
    ax.set_ylabel("score (x100)")
    ax.set_title(f"{task}: k sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _cell(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 3] + "..."


def _choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    for value in values:
        if value not in allowed:
            raise MarginError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")


def _check_unique_ids(examples: Sequence[Example], data: str) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise MarginError(
                f"{data}: example id {ex.id!r} occurs twice; give every example its own id "
                "(resuming skips examples by id)"
            )
        seen.add(ex.id)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
