"""Learned retrieval on the default corpus: the paper's Table 6 question, asked of our retriever.

Does training the retriever lift answer recall on the held-out questions (the first 500 of each
development file, never trained on)? Two steps, each resumable from ``--out``:

- ``train NAME --passage-encoder frozen|train``: ``margin train-retriever`` (DPR's loss, positives
  and hard negatives mined by answer from the dense and BM25 top 100) on the training slices of
  both files (after the 500 held out), from the default index's all-MiniLM-L6-v2. With the passage
  encoder trained, the default index is then re-encoded with it (``margin index refresh``) into
  ``OUT/NAME/index``. Wall times go to ``OUT/NAME/timing.json``.
- ``recall``: answer recall@1/5/20/100 (``margin eval``'s has_answer rule) of the frozen default,
  of an installed RAG fine-tune's question encoder (``--model``, trained by the RAG loss, when it
  is installed), and of every trained run in ``--out``, with the whole corpus's ceiling.

    python benchmarks/learned_retrieval.py train q --passage-encoder frozen
    python benchmarks/learned_retrieval.py train qp --passage-encoder train
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
    tr.add_argument("--limit", type=int, default=None, help="training questions per file")
    rc = sub.add_parser("recall", help="recall of the default and of every run in OUT")
    rc.add_argument("--model", default="finetuned", help="an installed RAG fine-tune, if any")
    rc.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "train":
        train(args)
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
        save_every=50, device="cpu",
    )
    began = time.perf_counter()
    result = train_retriever(training_slices(args.limit), run / "run", config, index="default",
                             resume=(run / "run" / "state").exists())
    timing = {"train_s": time.perf_counter() - began, "steps": result.steps,
              "questions": result.questions, "skipped": result.skipped, "loss": result.loss,
              "passage_encoder": args.passage_encoder, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr,
              "hard_negatives": args.hard_negatives, "command": " ".join(sys.argv[1:])}
    if result.passage_encoder is not None:
        began = time.perf_counter()
        refresh_index(ensure_default_index(), result.passage_encoder, run / "index")
        timing["refresh_s"] = time.perf_counter() - began
    (run / "timing.json").write_text(json.dumps(timing, indent=1), encoding="utf-8")
    print(json.dumps(timing))


def retrievers(args: argparse.Namespace) -> dict[str, tuple[Retriever, dict]]:
    """Every retriever to measure, with what is known of how it was trained."""
    found = {"frozen default (all-MiniLM-L6-v2)": (Retriever.load("default", progress=False), {})}
    tuned = _rag_question_encoder(args.model)
    if tuned is not None:
        found[f"question encoder of `{args.model}` (RAG loss, `make finetune`)"] = (tuned, {})
    for run in sorted(p for p in args.out.glob("*") if (p / "timing.json").exists()):
        timing = json.loads((run / "timing.json").read_text(encoding="utf-8"))
        q = run / "run" / "last" / "question_encoder"
        index = run / "index" if timing["passage_encoder"] == "train" else "default"
        what = ("contrastive question + passage encoders, refreshed index"
                if timing["passage_encoder"] == "train" else "contrastive question encoder")
        found[f"{what} (`{run.name}`)"] = (Retriever.load(index, query_encoder=q,
                                                          progress=False), timing)
    return found


def _rag_question_encoder(name: str) -> Retriever | None:
    from margin.models import _installed

    path = _installed(name)
    if path is None:
        return None
    return Retriever.load("default", query_encoder=path / "question_encoder", progress=False,
                          allow_encoder_mismatch=True)


def recall(args: argparse.Namespace) -> None:
    load_start = load_average()
    measured = retrievers(args)
    rows = []
    for data, path in DATASETS.items():
        heldout = read_examples(path)[:HELDOUT]
        for name, (retriever, timing) in measured.items():
            r = retrieval_recall(retriever, heldout, DEPTHS)
            rows.append((data, name, timing, [100 * r[f"answer_recall@{k}"] for k in DEPTHS]))
            print(rows[-1][:2], rows[-1][3], flush=True)
    lines = [
        SECTION, "",
        f"Answer recall@k x100 (a SQuAD-normalised gold answer in one of the top k passages) on "
        f"the first {HELDOUT} questions of each development file, which no run trained on, over "
        "the default corpus (12,324 passages). Trained runs: `margin train-retriever` (DPR's "
        "loss, Karpukhin et al. 2020: in-batch negatives plus mined hard negatives) on both "
        f"files after their first {HELDOUT} lines, starting from the default all-MiniLM-L6-v2.",
        "",
        "| data set | retriever | @1 | @5 | @20 | @100 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for data, name, _, values in rows:
        lines.append(f"| {data} | {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    lines += ["", "| run | questions with a positive / skipped | steps | training min | "
              "refresh min | settings |", "|---|---:|---:|---:|---:|---|"]
    for name, (_, timing) in measured.items():
        if timing:
            refresh = f"{timing['refresh_s'] / 60:.1f}" if "refresh_s" in timing else "-"
            lines.append(
                f"| {name} | {timing['questions']} / {timing['skipped']} | {timing['steps']} | "
                f"{timing['train_s'] / 60:.1f} | {refresh} | batch {timing['batch_size']}, "
                f"lr {timing['lr']:g}, {timing['hard_negatives']} hard negative(s), "
                f"{timing['epochs']} epoch(s); `python benchmarks/learned_retrieval.py "
                f"{timing['command']}` |")
    lines += [""] + provenance("learned_retrieval.py", load_start)
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(Path(__file__).parent.parent / "BENCHMARKS.md", section)


if __name__ == "__main__":
    main()
