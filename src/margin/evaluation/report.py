"""From prediction records to numbers and pages: per-example metrics, a run's aggregate
(metrics.json), its report.md, the summary table of a grid and the k sweep plot (the paper's
Figure 3). The metrics themselves are :mod:`margin.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from margin._io import atomic_path
from margin.evaluation import metrics as M
from margin.evaluation.examples import Example
from margin.evaluation.grid import EvalConfig, RunSpec
from margin.retrieval.retriever import Retriever

SHOWN_PREDICTIONS = 10  # examples listed in a run's report.md


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
    return {**out, **provenance_metrics(ex, passages)}


def provenance_metrics(ex: Example, passages: Sequence[Mapping[str, Any]]) -> dict[str, float]:
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


# ----------------------------------------------------------------------------- report


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
