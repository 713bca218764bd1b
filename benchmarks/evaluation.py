"""Evaluation on real data: the default model and corpus on NQ-open and TriviaQA dev questions.

What it measures (issue "Evaluation", section "Shown on real data"):

- answer recall@k, k = 1, 5, 10, 20, for the dense and the BM25 retriever (retrieval only);
- EM and F1 of closed book, BM25-RAG and dense RAG, RAG-Token and RAG-Sequence (greedy, k=5),
  with the time per question and EM on the questions whose gold answer is in the top-5 passages;
- a k sweep (dense RAG-Token, k = 1, 5, 10, 20) and its plot.

Every run goes through ``margin.evaluation.evaluate.run_eval`` into ``--out`` and is resumable, so
the main
table grows in stages (all ten settings reach n questions before any goes further): a run cut by
``--budget-min`` leaves balanced, usable numbers, and running the same command again continues it.

    MARGIN_HOME=/tmp/mh nice -n 10 .venv/bin/python benchmarks/evaluation.py --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from margin.evaluation.evaluate import (
    BM25_DOC_SCORE_SCALE,
    bm25_retriever,
    run_eval,
)
from margin.evaluation.examples import read_examples
from margin.evaluation.grid import EvalConfig
from margin.evaluation.report import retrieval_recall
from margin.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from _report import cpu_model, load_average, write_section  # noqa: E402

DATA = Path("/work/shared/data")
DATASETS = {"NQ-open": DATA / "nq-open-dev.tsv", "TriviaQA": DATA / "triviaqa-dev.tsv"}
RECALL_KS = (1, 5, 10, 20)
SWEEP_KS = (1, 5, 10, 20)
PLOT = Path(__file__).parent / "evaluation_k_sweep.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="500", help="questions per data set (main table); or a "
                    "comma list, one per data set (NQ-open, TriviaQA); 0: the k sweep only")
    ap.add_argument("--recall-n", type=int, default=500, help="questions for answer recall@k")
    ap.add_argument("--stages", default="20,50,100,200,300,400,500", help="main-table n steps")
    ap.add_argument("--sweep-n", type=int, default=30, help="NQ questions in the k sweep")
    ap.add_argument("--budget-min", type=float, default=0, help="stop starting stages after this")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma list of data sets "
                    "to run (one process per data set uses both cores); --write needs all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/margin-eval-bench"))
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()
    datasets = {name: DATASETS[name] for name in args.datasets.split(",")}
    if args.write and len(datasets) < len(DATASETS):
        ap.error("--write needs every data set; run it once more without --datasets to resume")
    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), load_average()

    dense = load_model("default", "default", progress=False)
    bm25 = dense.with_retriever(bm25_retriever("default", progress=False), BM25_DOC_SCORE_SCALE)
    rags = {"dense": dense, "bm25": bm25, "none": dense}

    recall = {}
    for name, path in datasets.items():
        examples = read_examples(path, limit=args.recall_n)
        recall[name] = {
            "dense": retrieval_recall(dense.retriever, examples, RECALL_KS),
            "bm25": retrieval_recall(bm25.retriever, examples, RECALL_KS),
        }
        print(name, json.dumps(recall[name]), flush=True)

    def cfg(path: Path, out: Path, limit: int, **kw) -> EvalConfig:
        return EvalConfig(data=str(path), out=str(out), limit=limit, batch_size=args.batch_size,
                          progress=False, **kw)

    main_kw = dict(retrievers=("none", "bm25", "dense"), ks=(5,), modes=("token", "sequence"))
    main_results: dict[str, list[dict]] = {}
    ns = [int(x) for x in args.n.split(",")]
    n_for = dict(zip(DATASETS, ns * len(DATASETS) if len(ns) == 1 else ns, strict=True))
    n_for = {name: n_for[name] for name in datasets}
    top = max(n_for.values())
    stages = [s for s in (int(x) for x in args.stages.split(",")) if s < top] + [top]
    if top == 0:  # --n 0: the k sweep alone (e.g. in its own process)
        stages = []
    for stage in stages:
        began = time.perf_counter()
        for name, path in datasets.items():
            limit = min(stage, n_for[name])
            main_results[name] = run_eval(cfg(path, args.out / name / "main", limit, **main_kw),
                                          rags)
            print(f"{name} n={stage}: {_brief(main_results[name])}", flush=True)
        elapsed_min = (time.perf_counter() - start) / 60
        per_q = (time.perf_counter() - began) / 60 / max(stage, 1)
        nxt = next((s for s in stages if s > stage), None)
        if args.budget_min and nxt and elapsed_min + per_q * (nxt - stage) > args.budget_min:
            print(f"stopping at n={stage}: n={nxt} would pass the {args.budget_min} min budget")
            break

    if "NQ-open" not in datasets or not args.sweep_n:
        return
    sweep = run_eval(
        cfg(DATASETS["NQ-open"], args.out / "NQ-open" / "sweep", args.sweep_n,
            retrievers=("dense",), ks=SWEEP_KS, modes=("token",)),
        rags,
    )
    shutil.copyfile(args.out / "NQ-open" / "sweep" / "k_sweep.png", PLOT)
    wall_min = (time.perf_counter() - start) / 60
    section = render(recall, main_results, sweep, args, wall_min, load_start, load_average())
    print(section)
    if args.write:
        write_section(Path(__file__).parent.parent / "BENCHMARKS.md", section)


def _brief(results: list[dict]) -> str:
    return ", ".join(
        f"{r['retriever']}/{r['mode']} EM {100 * r['exact_match']:.1f}" for r in results
    )


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def render(recall, main_results, sweep, args, wall_min, load_start, load_end) -> str:
    n = {name: results[0]["n"] for name, results in main_results.items()}
    lines = [
        "## Evaluation (default model, NQ-open and TriviaQA dev)", "",
        "Default model (SmolLM2-135M-Instruct generator, few-shot prompt, greedy, at most 16 new "
        "tokens) over the default corpus (12,324 passages of 10,033 Wikipedia lead sections), on "
        "the first questions of `nq-open-dev.tsv` and `triviaqa-dev.tsv` (dev splits; nothing "
        "tuned on them). Metrics x100: SQuAD-normalised exact match and token F1, max over the "
        "gold answers; answer recall@k = a normalised gold answer occurs in one of the top-k "
        "passage texts. BM25 priors are softmax(BM25 score) (scale 1, the paper's), dense "
        "priors softmax(20 · cosine).", "",
        "### Answer recall@k (retrieval only, first "
        f"{args.recall_n} questions)", "",
        "| data set | retriever | " + " | ".join(f"@{k}" for k in RECALL_KS) + " |",
        "|---|---|" + "---:|" * len(RECALL_KS),
    ]
    for name, by_retriever in recall.items():
        for retriever, values in by_retriever.items():
            cells = " | ".join(_pct(values[f"answer_recall@{k}"]) for k in RECALL_KS)
            lines.append(f"| {name} | {retriever} | {cells} |")
    lines += ["", "### EM and F1 (k = 5, greedy)", ""]
    if any(v < 500 for v in n.values()):
        lines += [
            f"Questions: {', '.join(f'{k} first {v}' for k, v in n.items())}, not the 500 the "
            "issue asks for: the run was stopped when the session's time ran out (two processes, "
            "one per data set, on this 2-core machine). Every setting has the same questions; "
            "`benchmarks/evaluation.py --n 500` resumes from `--out` and grows all settings in "
            "step.", "",
        ]
    lines += [
        "| data set | retriever | mode | n | EM | F1 | answer recall@5 | EM, answer in top 5 "
        "(n) | s/question |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in main_results.items():
        for r in results:
            retrieved = r.get("exact_match_answer_retrieved")
            subset = "-" if r["k"] == 0 else f"{_pct(retrieved)} ({r['n_answer_retrieved']})"
            lines.append(
                f"| {name} | {'closed book' if r['k'] == 0 else r['retriever']} | "
                f"{'-' if r['k'] == 0 else r['mode']} | {r['n']} | {_pct(r['exact_match'])} | "
                f"{_pct(r['f1'])} | {_pct(r.get('answer_recall@5'))} | {subset} | "
                f"{r['seconds_per_example']:.2f} |"
            )
    lines += [
        "", f"### k sweep (dense RAG-Token, greedy, first {sweep[0]['n']} NQ-open questions)", "",
        "| k | EM | F1 | answer recall@k | s/question |", "|---:|---:|---:|---:|---:|",
    ]
    for r in sweep:
        recall_k = r["answer_recall@" + str(r["k"])]
        lines.append(f"| {r['k']} | {_pct(r['exact_match'])} | {_pct(r['f1'])} | "
                     f"{_pct(recall_k)} | {r['seconds_per_example']:.2f} |")
    lines += [
        "", f"![k sweep]({PLOT.relative_to(PLOT.parent.parent)})", "",
        f"- command: `MARGIN_HOME=/tmp/mh nice -n 10 .venv/bin/python benchmarks/evaluation.py "
        f"--n {args.n} --recall-n {args.recall_n} --sweep-n {args.sweep_n}"
        + (f" --budget-min {args.budget_min:g}" if args.budget_min else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "") + " --write`",
        "- s/question: what a setting costs alone, the batch's retrieval and prompt encoding "
        "plus its own decoding (the token and sequence runs of one retriever share the "
        "encoding, computed once: `margin.evaluation.evaluate.shared_prompt_groups`)",
        f"- machine: nproc 2, {cpu_model()}; torch {torch.__version__}, {args.threads} torch "
        "thread(s) per process (long runs: one process per data set, `--datasets`), "
        f"niced; load average at the start {load_start}, at the end {load_end} (shared machine)",
        f"- wall of this invocation: {wall_min:.0f} min (runs already in `--out` are resumed, "
        "not re-timed: s/question is from the invocation that predicted them)",
        f"- date: {datetime.date.today().isoformat()}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
