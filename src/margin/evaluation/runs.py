"""Running one group of evaluation runs and resuming it: predictions in, files out.

A group is the runs that read the same prompts
(:func:`margin.evaluation.evaluate.shared_prompt_groups`): each batch is retrieved and encoded
once and decoded every way. Each run's directory gets ``run.json`` (its settings: resuming into a
directory with other settings is refused), ``predictions.jsonl`` (appended and fsynced batch by
batch, so a killed run resumes where it stopped), ``metrics.json`` and ``report.md`` (what they
hold: :mod:`margin.evaluation.evaluate`).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from margin._io import atomic_path, write_json_atomic
from margin.errors import MarginError
from margin.evaluation import metrics as M
from margin.evaluation.examples import FEVER_LABELS, Example
from margin.evaluation.grid import EvalConfig, RunSpec, run_settings
from margin.evaluation.report import aggregate, example_metrics, provenance_metrics, run_report
from margin.rag import RAG

PREDICTIONS, METRICS, REPORT, SETTINGS, PLOT = (
    "predictions.jsonl", "metrics.json", "report.md", "run.json", "k_sweep.png",
)


# ----------------------------------------------------------------------------- running


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
        check_settings(out, setting)
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
        write_text(out / REPORT, run_report(result, records))
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
    with torch.no_grad():
        hits, scores = rag.retrieve_scored(questions, runs[0].k)
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
        passages = [p.to_json(source=False) for p in answer.passages]
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
                        **provenance_metrics(ex, passages[i])},
            "passages": passages[i],
        })
    return records


@torch.no_grad()
def label_logprobs(
    rag: RAG, inputs: Sequence[str], run: RunSpec, labels: Sequence[str]
) -> tuple[torch.Tensor, list[list[dict[str, Any]]]]:
    """log p(label|x) (B, L) for every input and label, marginalised under ``run.mode`` over
    the top-k passages (closed book: the generator alone), and each input's passages."""
    from margin.marginalize import marginal_logprob, scores_log_prior

    gen, B, L = rag.generator, len(inputs), len(labels)
    repeated = [x for x in inputs for _ in range(L)]
    target_ids, target_mask = gen.build_targets(list(labels) * B)  # (B*L, T)
    if run.k == 0:
        ctx = gen.build_inputs(repeated, None)
        logprior = torch.zeros(B * L, 1)  # (B*L, 1): one context, prior 1
        shown: list[list[dict[str, Any]]] = [[] for _ in inputs]
    else:
        hits, scores = rag.retrieve_scored(list(inputs), run.k)
        prior = scores_log_prior(scores.float())  # (B, k)
        logprior = prior.repeat_interleave(L, 0)  # (B*L, k)
        ctx = gen.build_inputs(repeated, [ps for ps in hits.passages for _ in range(L)])
        shown = [
            [p.to_json(s, prior=float(z)) for p, s, z in zip(ps, ss, pr, strict=True)]
            for ps, ss, pr in zip(hits.passages, hits.scores, prior.exp().tolist(), strict=True)
        ]
    tok = gen.token_logprobs(ctx, target_ids, target_mask)  # (B*L, k, T)
    mode = "sequence" if run.mode == "none" else run.mode
    lp = marginal_logprob(mode, logprior.to(tok.device), tok, target_mask)  # type: ignore[arg-type]
    return lp.view(B, L).cpu(), shown


# ----------------------------------------------------------------------------- files


def check_settings(out: Path, settings: dict[str, Any]) -> None:
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


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
