"""A fine-tuning step of the default model in fp32 and under bf16 autocast, side by side.

The step is ``margin finetune``'s (``margin.training.recipe.FINETUNE_RECIPE``: k = 2, 4 x 2
questions,
LoRA r = 16 on the generator, the question encoder in full), on the first training questions of
nq-open-dev and triviaqa-dev (after the 500 held out), interleaved. Each run loads the default
model afresh and trains ``--steps`` steps with one precision; the runs alternate fp32 / bf16 (the
order swapped every round) so that the shared machine's load falls on both alike. A step's time
is the difference of consecutive ``elapsed_s`` in the run's log.jsonl, the first step left out
(it warms the caches); the ratio is of the medians. Both precisions see the same questions in the
same order (same seed), so their losses are comparable step by step.

    MARGIN_HOME=/tmp/mh nice -n 5 .venv/bin/python benchmarks/cpu_bf16.py --rounds 3 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import torch

from margin.devices import native_bf16
from margin.rag import RAG
from margin.training.recipe import FINETUNE_RECIPE, interleave, training_slice
from margin.training.train import train

sys.path.insert(0, str(Path(__file__).parent))
from _report import load_average, provenance, write_section  # noqa: E402
from evaluation import DATASETS  # noqa: E402

SECTION = "## Fine-tuning step: fp32 and bf16 autocast on the CPU"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def one_run(precision: str, steps: int, examples: list) -> dict:
    """Train ``steps`` steps of the recipe at ``precision``; per-step seconds and losses."""
    rag = RAG.load(model="default", index="default", progress=False)
    config = replace(FINETUNE_RECIPE, steps=steps, save_every=0, precision=precision,
                     device="cpu")
    with tempfile.TemporaryDirectory() as out:
        train(rag, examples, out, config, progress=False)
        log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    rows = [r for r in log if "loss" in r]
    elapsed = [r["elapsed_s"] for r in rows]
    return {"precision": precision, "step_s": [b - a for a, b in pairwise(elapsed)],
            "losses": [r["loss"] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    per_step = FINETUNE_RECIPE.batch_size * FINETUNE_RECIPE.grad_accum
    n = args.steps * per_step
    examples = interleave(*(training_slice(p, limit=n) for p in DATASETS.values()))[:n]
    load_start, began = load_average(), time.perf_counter()
    runs = []
    for r in range(args.rounds):
        for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            runs.append(one_run(precision, args.steps, examples))
            print(json.dumps(runs[-1]), flush=True)
    wall = time.perf_counter() - began
    med = {p: statistics.median(s for run in runs if run["precision"] == p for s in run["step_s"])
           for p in ("fp32", "bf16")}
    loss = {p: next(run["losses"] for run in runs if run["precision"] == p)
            for p in ("fp32", "bf16")}
    gap = max(abs(a - b) for a, b in zip(loss["fp32"], loss["bf16"], strict=True))
    lines = [
        SECTION, "",
        "One optimizer step of `margin finetune`'s recipe (k = 2, 4 x 2 questions, LoRA r = 16 on "
        "the generator, the question encoder in full) on the default model, fp32 against "
        "`torch.autocast('cpu', torch.bfloat16)` (`--precision bf16`), run after run in one "
        "script; the first step of each run left out.", "",
        "| precision | median s/step | steps timed | loss, steps 1..n (first run) |",
        "|---|---:|---:|---|",
        *(f"| {p} | {med[p]:.1f} | {sum(len(r['step_s']) for r in runs if r['precision'] == p)} | "
          f"{', '.join(f'{x:.3f}' for x in loss[p])} |" for p in ("fp32", "bf16")),
        "",
        f"- bf16 / fp32 speed: **{med['fp32'] / med['bf16']:.2f}x** a step; the largest loss gap "
        f"between the two on the same batch: {gap:.3f} nats",
        f"- this CPU computes bf16 natively (AVX512-BF16 or AMX): "
        f"{native_bf16(torch.device('cpu'))}",
        f"- wall: {wall / 60:.1f} min; torch {torch.get_num_threads()} thread(s)",
        *provenance("cpu_bf16.py", load_start),
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(BENCHMARKS_MD, text)


if __name__ == "__main__":
    main()
