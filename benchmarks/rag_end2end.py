"""End-to-end RAG training with the passage encoder: how stale the index gets, and what it costs.

``margin train --passage-encoder train --refresh-every N`` (margin.training.end2end) on the default
model: its LoRA generator, question encoder and passage encoder learn from the RAG loss on the
training slices of both development files (after their 500 held-out questions), the index is
re-encoded in a background process every N steps and swapped in between steps, and once more at
the end. From the run's log this prints, per refresh: the step it started after, the steps and
seconds it took to be swapped in, and max |d_stored(z) − d_now(z)| over the last step's retrieved
passages for the index being replaced (stale) and the new one (stale by the refresh's steps
only); then seconds a step against the same steps with the passage encoder frozen.

``--passages N`` trains over an index of the default corpus's first N passages instead of the
whole one (built once in ``--out``): a run of a minute, for the mechanics, not a measurement.

``--recall N`` then measures what a stale index costs the retriever: answer recall@k on the
first N held-out questions of each file (never trained on) with the run's final question
encoder, over the index the run started from (never refreshed: stale by every step) and over its
final, refreshed one; and the default retriever for reference. A finished run in ``--out`` is
read back, not trained again, so this can follow a run already made.

    nice -n 10 .venv/bin/python benchmarks/rag_end2end.py --steps 40 --refresh-every 10 --write
    nice -n 10 .venv/bin/python benchmarks/rag_end2end.py --steps 6 --refresh-every 2 \\
        --passages 200 --baseline-steps 3            # about a minute: the tiny check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from margin.evaluation.examples import read_examples
from margin.evaluation.report import retrieval_recall
from margin.rag import RAG
from margin.retrieval.build import build_index
from margin.retrieval.encoders import load_encoder
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever, ensure_default_index
from margin.training.config import TrainConfig
from margin.training.recipe import HELDOUT, interleave, training_slice
from margin.training.train import train

sys.path.insert(0, str(Path(__file__).parent))
from _report import load_average, provenance, write_section  # noqa: E402

DATA = Path("/work/shared/data")
FILES = (DATA / "nq-open-dev.tsv", DATA / "triviaqa-dev.tsv")
SECTION = "## End-to-end RAG training: the passage encoder and a stale index"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
RECALL_KS = (1, 5, 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/work/bench-runs/rag-end2end"))
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of the trained run")
    ap.add_argument("--refresh-every", type=int, default=10)
    ap.add_argument("--baseline-steps", type=int, default=5,
                    help="steps with the passage encoder frozen, for s/step (0: none)")
    ap.add_argument("--passages", type=int, default=0,
                    help="train over the default corpus's first N passages (0: all of it)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4, help="the LoRA generator's")
    ap.add_argument("--retriever-lr", type=float, default=3e-5, help="both encoders'")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--fresh", action="store_true", help="remove earlier runs in --out first")
    ap.add_argument("--recall", type=int, default=0, help="held-out questions a file for the "
                    "stale-index recall table (0: none)")
    ap.add_argument("--write", action="store_true", help=f"put the section in {BENCHMARKS_MD}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    if args.fresh:
        for name in ("trained", "frozen"):
            shutil.rmtree(args.out / name, ignore_errors=True)
    index = small_index(args.out, args.passages) if args.passages else ensure_default_index()
    questions = args.steps * args.batch_size
    examples = interleave(*(training_slice(path, limit=questions) for path in FILES))
    base = dict(k=args.k, batch_size=args.batch_size, lr=args.lr, retriever_lr=args.retriever_lr,
                lora=True, device="cpu")
    runs = {"trained": TrainConfig(steps=args.steps, passage_encoder="train",
                                   refresh_every=args.refresh_every, **base)}
    if args.baseline_steps:
        runs["frozen"] = TrainConfig(steps=args.baseline_steps, **base)
    for name, config in runs.items():
        out = args.out / name
        rag = RAG.load("default", str(index), device="cpu")
        train(rag, examples, out, config, resume=(out / "state").exists())
    section = report(args, index)
    if args.recall:
        section += "\n\n" + stale_recall(args, index)
    lines = [section, "", *provenance("rag_end2end.py", load_before)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(BENCHMARKS_MD, text)


def small_index(out: Path, n: int) -> Path:
    """An index of the default corpus's first ``n`` passages, the default encoder's (cached)."""
    path = out / f"index-{n}"
    if not (path / "manifest.json").is_file():
        store = open_index(ensure_default_index()).store
        passages = store.get(np.arange(min(n, len(store))))
        build_index(passages, load_encoder("default", role="passage"), path, progress=False)
    return path


def report(args: argparse.Namespace, index: Path) -> str:
    log = read_log(args.out / "trained")
    started = {r["step"]: r for r in log if "refresh_started" in r}
    swaps = [r for r in log if "index" in r and "refresh_steps" in r]
    passages = len(open_index(index).store)
    rows = [
        f"{SECTION}",
        "",
        f"`margin train --passage-encoder train --refresh-every {args.refresh_every}` on the "
        f"default model (LoRA generator at lr {args.lr:g}, both encoders at {args.retriever_lr:g}),"
        f" k = {args.k}, batch {args.batch_size}, {args.steps} steps over {passages:,} passages. "
        "Per refresh: when it started, how many steps later it was swapped in and its seconds, "
        "and max |d_stored(z) − d_now(z)| over the last step's retrieved passages for the index "
        "it replaced (stale) and for itself (fresh).",
        "",
        "| refresh of step | swapped in before step | steps | seconds | stale max abs | "
        "fresh max abs |",
        "|---|---|---|---|---|---|",
    ]
    for swap in swaps:
        began = swap["step"] - swap["refresh_steps"]
        kind = " (final, in process)" if swap.get("final") else ""
        rows.append(f"| {began}{kind} | {swap['step'] + 1 if not swap.get('final') else '-'} | "
                    f"{swap['refresh_steps']} | {swap['refresh_s']:.1f} | "
                    f"{swap.get('stale_max_abs', float('nan')):.4f} | "
                    f"{swap.get('fresh_max_abs', float('nan')):.4f} |")
    skipped = sum(1 for r in log if "refresh_skipped" in r)
    rows += ["", f"Refreshes started: {len(started)}; skipped because one was still running: "
             f"{skipped}."]
    trained = seconds_per_step(log)
    frozen = seconds_per_step(read_log(args.out / "frozen")) if args.baseline_steps else None
    cost = f"{trained:.2f} s a step with the passage encoder trained"
    if frozen:
        cost += f", {frozen:.2f} s frozen ({trained / frozen:.2f}x)"
    rows += ["", cost + " (refreshes run beside training, in one thread)."]
    return "\n".join(rows)


def stale_recall(args: argparse.Namespace, index: Path) -> str:
    """Held-out answer recall@k: the trained question encoder over the never-refreshed index and
    over the run's final one, and the default retriever."""
    last = args.out / "trained" / "last"
    retrievers = {
        "default question encoder, the index the run started from": Retriever.load(
            index, progress=False),
        "trained question encoder, the index the run started from (never refreshed)":
            Retriever.load(index, query_encoder=last / "question_encoder", progress=False,
                           allow_encoder_mismatch=True),  # that is the staleness measured
        "trained question encoder, the run's final index (refreshed)": Retriever.load(
            last / "index", query_encoder=last / "question_encoder", progress=False,
            allow_encoder_mismatch=True),  # the pair is the model's; its directory says so
    }
    rows = [f"Answer recall@k x100 on the first {args.recall} held-out questions of each file "
            "(never trained on), after the run's last step:", "",
            "| data set | retriever | @1 | @5 | @20 |", "|---|---|---:|---:|---:|"]
    for path in FILES:
        heldout = read_examples(path)[: min(args.recall, HELDOUT)]
        for name, retriever in retrievers.items():
            r = retrieval_recall(retriever, heldout, RECALL_KS)
            rows.append(f"| {path.stem} | {name} | "
                        + " | ".join(f"{100 * r[f'answer_recall@{k}']:.1f}" for k in RECALL_KS)
                        + " |")
    return "\n".join(rows)


def read_log(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def seconds_per_step(log: list[dict]) -> float:
    """Mean seconds of the steps after the first (which pays one-off costs)."""
    steps = [r for r in log if "loss" in r and "elapsed_s" in r]
    if len(steps) < 2:
        return float("nan")
    return (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (steps[-1]["step"] - steps[0]["step"])


if __name__ == "__main__":
    main()
