"""Learned retrieval on the default corpus: the paper's Table 6 question, asked of our retriever.

Does training the retriever lift answer recall on the held-out questions (the first 500 of each
development file, never trained on)? Two steps, each resumable from ``--out``:

- ``train NAME --passage-encoder frozen|train``: ``margin train-retriever`` (DPR's loss, positives
  and hard negatives mined by answer from the dense and BM25 top 100) on the training slices of
  both files (after the 500 held out), from the default index's all-MiniLM-L6-v2. With the passage
  encoder trained, the default index is then re-encoded with it (``margin index refresh``) into
  ``OUT/NAME/index``. Wall times go to ``OUT/NAME/timing.json``. ``--positives bm25``: DPR's rule
  for the positive (BM25's first answer-bearing passage) instead of the interleaved lists' first.
- ``recall``: answer recall@1/5/20/100 (``margin eval``'s has_answer rule) of the frozen default,
  of an installed RAG fine-tune's question encoder (``--model``, trained by the RAG loss, when it
  is installed), and of every trained run in ``--out``, with the whole corpus's ceiling.

    python benchmarks/learned_retrieval.py train q --passage-encoder frozen
    python benchmarks/learned_retrieval.py train qp --passage-encoder train
    python benchmarks/learned_retrieval.py train qp-bm25 --passage-encoder train --positives bm25
    python benchmarks/learned_retrieval.py --threads 1 eval qp-bm25 --datasets NQ-open
    python benchmarks/learned_retrieval.py recall --write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from margin.evaluation.examples import read_examples
from margin.evaluation.report import retrieval_recall
from margin.retrieval.refresh import refresh_index
from margin.retrieval.retriever import Retriever, ensure_default_index
from margin.training.contrastive import RetrieverTrainConfig, train_retriever

sys.path.insert(0, str(Path(__file__).parent))
from _report import load_average, provenance, write_section  # noqa: E402
from evaluation import DATASETS  # noqa: E402

HELDOUT = 500  # the first lines of each file: reported on, never trained on
DEPTHS = (1, 5, 20, 100)
SECTION = "## Learned retrieval: answer recall of trained retrievers on the default corpus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/work/bench-runs/learned-retrieval"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train one retriever into OUT/NAME")
    tr.add_argument("name")
    tr.add_argument("--passage-encoder", choices=("frozen", "train"), default="frozen")
    tr.add_argument("--epochs", type=int, default=1)
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--lr", type=float, default=2e-5)
    tr.add_argument("--hard-negatives", type=int, default=1)
    tr.add_argument("--positives", choices=("interleaved", "bm25"), default="interleaved",
                    help="the mined positive: the interleaved dense/BM25 candidates' first "
                    "answer-bearing passage, or BM25's (DPR's rule)")
    tr.add_argument("--limit", type=int, default=None, help="training questions per file")
    ev = sub.add_parser("eval", help="RAG EM of the zero-shot default generator over run NAME's "
                        "retriever (its question encoder and, when E_P trained, its index)")
    ev.add_argument("name")
    ev.add_argument("--datasets", default=",".join(DATASETS))
    ev.add_argument("--modes", default="token,sequence")
    rc = sub.add_parser("recall", help="recall of the default and of every run in OUT")
    rc.add_argument("--model", default="finetuned", help="an installed RAG fine-tune, if any")
    rc.add_argument("--rag-only-model", help="an installed `margin finetune --retriever none` "
                    "model: its row is measured, not quoted")
    rc.add_argument("--rag-only-eval", type=Path, help="benchmarks/finetuned.py eval's --out for "
                    "--rag-only-model: its EM, and the sign tests against it")
    rc.add_argument("--finetuned-eval", type=Path, help="benchmarks/finetuned.py eval's --out "
                    "for --model: its RAG EM and where its misses are")
    rc.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "train":
        train(args)
    elif args.command == "eval":
        evaluate(args)
    else:
        recall(args)


def training_slices(limit: int | None) -> list:
    """Both files minus their held-out heads, interleaved question by question."""
    sets = [read_examples(path)[HELDOUT:][:limit] for path in DATASETS.values()]
    out = []
    for i in range(max(len(s) for s in sets)):
        out += [s[i] for s in sets if i < len(s)]
    return out


def train(args: argparse.Namespace) -> None:
    run = args.out / args.name
    config = RetrieverTrainConfig(
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        hard_negatives=args.hard_negatives, passage_encoder=args.passage_encoder,
        positives=args.positives, save_every=50, device="cpu",
    )
    began = time.perf_counter()
    result = train_retriever(training_slices(args.limit), run / "run", config, index="default",
                             resume=(run / "run" / "state").exists())
    timing = {"train_s": time.perf_counter() - began, "steps": result.steps,
              "questions": result.questions, "skipped": result.skipped, "loss": result.loss,
              "passage_encoder": args.passage_encoder, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr,
              "hard_negatives": args.hard_negatives, "positives": args.positives,
              "command": " ".join(sys.argv[1:])}
    if result.passage_encoder is not None:
        began = time.perf_counter()
        refresh_index(ensure_default_index(), result.passage_encoder, run / "index")
        timing["refresh_s"] = time.perf_counter() - began
    (run / "timing.json").write_text(json.dumps(timing, indent=1), encoding="utf-8")
    print(json.dumps(timing))


def run_retriever(run: Path) -> Retriever:
    """A trained run's retriever: its question encoder over its re-encoded index (E_P trained)
    or over the default index (E_P frozen)."""
    timing = json.loads((run / "timing.json").read_text(encoding="utf-8"))
    index = run / "index" if timing["passage_encoder"] == "train" else "default"
    return Retriever.load(index, query_encoder=run / "run" / "last" / "question_encoder",
                          progress=False)


def evaluate(args: argparse.Namespace) -> None:
    """``margin eval``'s RAG rows (dense, k = 5, greedy) of the default generator, not
    fine-tuned, over run NAME's retriever, on the held-out questions; into OUT/NAME/eval."""
    from margin.evaluation.evaluate import run_eval
    from margin.evaluation.grid import EvalConfig
    from margin.models import load_model

    run = args.out / args.name
    rag = load_model("default", None, progress=False).with_retriever(run_retriever(run))
    for data in args.datasets.split(","):
        cfg = EvalConfig(data=str(DATASETS[data]), out=str(run / "eval" / data), limit=HELDOUT,
                         batch_size=8, progress=False, retrievers=("dense",), ks=(5,),
                         modes=tuple(args.modes.split(",")))
        for r in run_eval(cfg, {"dense": rag}):
            print(data, r["mode"], f"EM {100 * r['exact_match']:.1f}", flush=True)


def retrievers(args: argparse.Namespace) -> dict[str, tuple[Retriever, dict]]:
    """Every retriever to measure, with what is known of how it was trained."""
    found = {"frozen default (all-MiniLM-L6-v2)": (Retriever.load("default", progress=False), {})}
    tuned = _rag_question_encoder(args.model)
    if tuned is not None:
        found[f"`make finetune` model `{args.model}`: its question encoder and the index it "
              "carries"] = (tuned, {})
    for run in sorted(p for p in args.out.glob("*") if (p / "timing.json").exists()):
        timing = json.loads((run / "timing.json").read_text(encoding="utf-8"))
        what = ("contrastive question + passage encoders, refreshed index"
                if timing["passage_encoder"] == "train" else "contrastive question encoder")
        if timing.get("positives") == "bm25":  # runs before the choice: interleaved
            what += ", BM25 positives"
        found[f"{what} (`{run.name}`)"] = (run_retriever(run), timing)
    return found


def _rag_question_encoder(name: str) -> Retriever | None:
    """The retriever of installed model ``name``: its question encoder over the index it
    carries (the default one if it carries none); None when it is not installed."""
    from margin.models import _installed, load_model

    if _installed(name) is None:
        return None
    return load_model(name, "auto", progress=False).retriever


# Quoted, not re-run (their runs are not on this machine): the zero-shot default generator's RAG
# EM with the frozen retriever (section "Evaluation"), and the 192-step RAG-loss-only recipe,
# `finetuned-192`: its EM (section "Answer quality: the fine-tuned default", 2026-12-05) and
# its question encoder's answer recall (section "the retrieval ceiling", the same day).
QUOTED_EM = {"frozen default (all-MiniLM-L6-v2)": {
    "NQ-open": (2.6, 3.0), "TriviaQA": (9.8, 9.6)}}
RAG_LOSS_ONLY = "question encoder trained by the RAG loss only (`finetuned-192`, quoted)"
RAG_LOSS_ONLY_ROWS = {"NQ-open": ([5.8, 10.2, 13.6, 22.4], (4.6, 5.0)),
                      "TriviaQA": ([9.6, 17.0, 24.0, 35.2], (11.8, 12.0))}
TARGETS = {"NQ-open": (15.0, 8.0), "TriviaQA": (22.0, 16.0)}  # recall@5, RAG EM (issue 26)
MODES = ("token", "sequence")


def recall(args: argparse.Namespace) -> None:
    load_start = load_average()
    measured = retrievers(args)
    final = next((name for name in measured if name.startswith("`make finetune`")), None)
    rows = []
    for data, path in DATASETS.items():
        heldout = read_examples(path)[:HELDOUT]
        for name, (retriever, timing) in measured.items():
            r = retrieval_recall(retriever, heldout, DEPTHS)
            em = QUOTED_EM.get(name, {}).get(data)
            zero_shot = args.out / name.rsplit("`", 2)[-2] / "eval" if name.endswith("`)") \
                else None
            if zero_shot is not None and (zero_shot / data).is_dir():
                em = tuple(_em(_predictions(zero_shot, data, mode)) for mode in MODES)
            if name == final and args.finetuned_eval is not None:
                em = tuple(_em(_predictions(args.finetuned_eval, data, mode)) for mode in MODES)
            rows.append((data, name, timing, [100 * r[f"answer_recall@{k}"] for k in DEPTHS], em))
            print(rows[-1][:2], rows[-1][3:], flush=True)
            if name.startswith("frozen"):
                rows.append(_rag_loss_only_row(args, data, heldout))
    lines = [
        SECTION, "",
        "Paper Table 6 on our corpus. Answer recall@k x100 (a SQuAD-normalised gold answer in one "
        f"of the top k passages) and RAG EM x100 (k = 5, greedy, at most 16 new tokens) on the "
        f"first {HELDOUT} questions of each development file, which no run trained on, over the "
        "default corpus (12,324 passages). Contrastive runs: `margin train-retriever` (DPR's "
        "loss, Karpukhin et al. 2020: in-batch negatives plus mined hard negatives) on both "
        f"files after their first {HELDOUT} lines, from the default all-MiniLM-L6-v2. EM columns "
        "use the generator each row names; '-': not measured. The frozen default's EM is "
        "quoted from section \"Evaluation\"" + (
            "." if args.rag_only_model else ", and every figure of the `finetuned-192` row from "
            "earlier sections (their runs are not on this machine)."), "",
        "| data set | retriever | @1 | @5 | @20 | @100 | RAG-Token EM | RAG-Sequence EM | "
        "generator |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for data, name, _, values, em in rows:
        generator = ("default (zero-shot)" if name.startswith(("frozen", "contrastive"))
                     and em is not None else
                     "RAG fine-tune over this retriever" if em is not None else "-")
        ems = " | ".join(f"{v:.1f}" for v in em) if em is not None else "- | -"
        lines.append(f"| {data} | {name} | " + " | ".join(f"{v:.1f}" for v in values)
                     + f" | {ems} | {generator} |")
    lines += ["", "| run | questions with a positive / skipped | steps | training min | "
              "refresh min | settings |", "|---|---:|---:|---:|---:|---|"]
    for name, (_, timing) in measured.items():
        if timing:
            refresh = f"{timing['refresh_s'] / 60:.1f}" if "refresh_s" in timing else "-"
            lines.append(
                f"| {name} | {timing['questions']} / {timing['skipped']} | {timing['steps']} | "
                f"{timing['train_s'] / 60:.1f} | {refresh} | batch {timing['batch_size']}, "
                f"lr {timing['lr']:g}, {timing['hard_negatives']} hard negative(s), "
                f"{timing['epochs']} epoch(s), {timing.get('positives', 'interleaved')} "
                f"positives; `python benchmarks/learned_retrieval.py "
                f"{timing['command']}` |")
    if final is not None and args.finetuned_eval is not None:
        if args.rag_only_eval is not None:
            lines += ["", *_sign_tests(args)]
        lines += ["", *_targets(rows, final), "", *_misses(args.finetuned_eval)]
    lines += [""] + provenance("learned_retrieval.py", load_start)
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(Path(__file__).parent.parent / "BENCHMARKS.md", section)


def _rag_loss_only_row(args: argparse.Namespace, data: str, heldout) -> tuple:
    """The row of the question encoder trained by the RAG loss only (the recipe before the
    retriever stage, ``margin finetune --retriever none``): measured when ``--rag-only-model``
    is installed (its EM when ``--rag-only-eval`` holds its predictions), else quoted."""
    if args.rag_only_model is None:
        recalls, quoted = RAG_LOSS_ONLY_ROWS[data]
        return (data, RAG_LOSS_ONLY, {}, recalls, quoted)
    retriever = _rag_question_encoder(args.rag_only_model)
    if retriever is None:
        raise SystemExit(f"--rag-only-model {args.rag_only_model} is not installed")
    r = retrieval_recall(retriever, heldout, DEPTHS)
    em = (tuple(_em(_predictions(args.rag_only_eval, data, mode)) for mode in MODES)
          if args.rag_only_eval is not None else None)
    name = (f"question encoder trained by the RAG loss only (`{args.rag_only_model}`: "
            "`margin finetune --retriever none --steps 192`)")
    return (data, name, {}, [100 * r[f"answer_recall@{k}"] for k in DEPTHS], em)


def _sign_tests(args: argparse.Namespace) -> list[str]:
    """The installed model against the RAG-loss-only recipe, question by question: the held-out
    questions only one of them answered exactly, and the two-sided sign test's p-value."""
    from finetuned import paired
    from margin.evaluation.grid import RunSpec

    parts, found = [], []
    for data in DATASETS:
        for mode in MODES:
            run = RunSpec("dense", 5, mode, "greedy").name
            only_new, only_old, p = paired(args.finetuned_eval / data / run,
                                           args.rag_only_eval / data / run, HELDOUT)
            parts.append(f"{data} RAG-{mode.capitalize()}: {only_new} / {only_old} (p = {p:.2f})")
        run = RunSpec("dense", 5, "token", "greedy").name
        only_new, only_old, p = paired(args.finetuned_eval / data / run,
                                       args.rag_only_eval / data / run, HELDOUT,
                                       metric="answer_in_passages")
        found.append(f"{data}: {only_new} / {only_old} (p = {p:.3f})")
    return [f"Paired sign tests, the installed `{args.model}` against `{args.rag_only_model}` "
            "(the recipe before this issue, re-run): held-out questions only the installed "
            "model / only the RAG-loss-only model answered exactly, and the two-sided sign "
            "test's p-value: " + "; ".join(parts) + ". The same for a gold answer in the top 5 "
            "passages (recall@5, each model's own retriever): " + "; ".join(found) + "."]


def _predictions(out: Path, data: str, mode: str) -> list[dict]:
    """The first HELDOUT predictions of ``benchmarks/finetuned.py eval --out OUT``'s dense
    k = 5 greedy run of ``mode`` on ``data``."""
    from margin.evaluation.grid import RunSpec
    from margin.evaluation.runs import read_predictions

    run = out / data / RunSpec("dense", 5, mode, "greedy").name
    records = read_predictions(run / "predictions.jsonl")
    first = [r for i, r in records.items() if int(i.rsplit(":", 1)[1]) <= HELDOUT]
    if len(first) != HELDOUT:
        raise SystemExit(f"{run}: {len(first)} of the first {HELDOUT} questions answered")
    return first


def _em(records: list[dict]) -> float:
    return 100 * sum(r["metrics"]["exact_match"] for r in records) / len(records)


def _targets(rows, final: str) -> list[str]:
    """The issue's targets for the installed model, met or missed by how much."""
    out = []
    for data, (recall5, em_target) in TARGETS.items():
        values, em = next((v, e) for d, n, _, v, e in rows if d == data and n == final)
        gaps = [("recall@5", values[1], recall5)] + [
            (f"RAG-{mode.capitalize()} EM", e, em_target) for mode, e in zip(MODES, em,
                                                                             strict=True)]
        out.append(f"- target on {data}: " + "; ".join(
            f"{what} {got:.1f} against >= {want:.1f} "
            + ("(met)" if got >= want else f"(missed by {want - got:.1f})")
            for what, got, want in gaps))
    return out


def _misses(out: Path) -> list[str]:
    """Where the installed model's wrong answers come from: the answer nowhere in the corpus,
    in the corpus but not in the top 5, or in the top 5 and misread."""
    from margin.evaluation import metrics as M

    corpus = _normalised_corpus()
    lines = ["Where the installed model's held-out answers go wrong (counts of 500; \"in "
             "corpus\": a normalised gold answer occurs in some passage of the default corpus):",
             "", "| data set | mode | right | wrong: answer not in corpus | wrong: in corpus, not "
             "in top 5 | wrong: in top 5, misread |", "|---|---|---:|---:|---:|---:|"]
    for data in DATASETS:
        for mode in MODES:
            right = absent = missed = misread = 0
            for r in _predictions(out, data, mode):
                if r["metrics"]["exact_match"]:
                    right += 1
                elif r["metrics"]["answer_in_passages"]:
                    misread += 1
                elif any(f" {g} " in corpus for g in map(M.normalize_answer, r["gold"]) if g):
                    missed += 1
                else:
                    absent += 1
            lines.append(f"| {data} | {mode} | {right} | {absent} | {missed} | {misread} |")
    return lines


def _normalised_corpus() -> str:
    """Every passage of the default corpus, normalised, between spaces, one per line."""
    import numpy as np

    from margin.evaluation import metrics as M

    store = Retriever.load("default", progress=False).index.store
    return "\n".join(f" {M.normalize_answer(p.text)} " for p in store.get(np.arange(len(store))))


if __name__ == "__main__":
    main()
