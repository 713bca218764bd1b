"""`margin ask` latency at batch 1 on the default model: this checkout against another revision.

A change that should make answering faster (or must not make it slower) is measured against the
code before it, in one run: each side runs in its own child process with its own ``src/`` (the
other revision checked out in a temporary ``git worktree``), on the same machine, the same
default model and index (``$MARGIN_HOME``), the same questions and torch threads. The sides
alternate, A B B A ..., so that the shared machine's load falls on both alike. Each child loads
the model once, answers one question to warm up, then asks every question alone and reports:

- seconds per question (wall, ``rag.ask([q])``: retrieval, prior, decoding, provenance);
- how many forwards the question encoder ran, and the time spent inside them (forward hooks on
  its module);
- the answers, which must be identical between the sides (the change must not alter them).

    python benchmarks/ask_latency.py --against HEAD~3            # print the section
    python benchmarks/ask_latency.py --against HEAD~3 --write    # also put it in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import load_average, provenance, worktree, write_section
from decoding import QUESTIONS  # the 16 of the default-model run there

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = "## `margin ask` latency against an earlier revision"

# Runs in the child, against whichever margin its PYTHONPATH names; only the public API
# (RAG.load, rag.ask, rag.question_encoder.module), which both sides share.
CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
questions = json.loads(sys.argv[2])
import margin
rag = margin.RAG.load(model="default", index="default", progress=False)
calls, inside, began = [0], [0.0], [0.0]
def before(*_):
    calls[0] += 1
    began[0] = time.perf_counter()
def after(*_):
    inside[0] += time.perf_counter() - began[0]
module = rag.question_encoder.module
module.register_forward_pre_hook(before)
module.register_forward_hook(after)
rag.ask(questions[:1])  # warm-up
calls[0], inside[0] = 0, 0.0
times, answers = [], []
for q in questions:
    start = time.perf_counter()
    [a] = rag.ask([q])
    times.append(time.perf_counter() - start)
    answers.append(a.answer)
print(json.dumps({"times": times, "answers": answers, "encoder_forwards": calls[0],
                  "encoder_s": inside[0],
                  "margin": margin.__file__}))
"""


def run_side(src: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), json.dumps(QUESTIONS)],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"the side at {src} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="child runs per side (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="put the section in BENCHMARKS.md")
    args = parser.parse_args()

    load_before = load_average()
    rev = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tree = worktree(rev, Path(tmp) / "before")
        try:
            sides = {"before": tree / "src", "after": ROOT / "src"}
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            order = ["before", "after"]
            for r in range(args.rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    result = run_side(sides[name], args.threads)
                    runs[name].append(result)
                    print(f"round {r + 1} {name}: p50 {statistics.median(result['times']):.2f} s",
                          file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           check=False, capture_output=True)

    rows, p50 = [], {}
    for name, label in (("before", f"before ({rev})"), ("after", f"after ({head})")):
        times = [t for run in runs[name] for t in run["times"]]
        p50[name] = statistics.median(times)
        medians = ", ".join(f"{statistics.median(run['times']):.2f}" for run in runs[name])
        encoder_ms = 1000 * statistics.median(run["encoder_s"] for run in runs[name])
        rows.append(f"| {label} | {p50[name]:.2f} | {pct(times, 0.9):.2f} | "
                    f"{runs[name][0]['encoder_forwards']} | {encoder_ms / len(QUESTIONS):.1f} | "
                    f"{medians} |")
    same = all(run["answers"] == runs["before"][0]["answers"]
               for name in runs for run in runs[name])
    section = "\n".join([
        SECTION, "",
        f"`rag.ask([question])` on the default model and index (k and mode the model's own), "
        f"{len(QUESTIONS)} questions one at a time in a warm process, {args.threads} torch "
        f"thread(s), {args.rounds} child processes per side, alternating; p50 and p90 over all "
        f"{len(QUESTIONS) * args.rounds} timings of a side.", "",
        "| side | p50 s/question | p90 s/question | question-encoder forwards (16 questions) "
        "| ms/question inside the question encoder | p50 of each run (s) |",
        "|---|---:|---:|---:|---:|---|",
        *rows, "",
        f"- after / before p50: **{p50['after'] / p50['before']:.3f}**; answers identical on "
        f"both sides in every run: {'yes' if same else 'NO'}",
        *provenance("ask_latency.py", load_before),
    ])
    print(section)
    if args.write:
        write_section(BENCHMARKS_MD, section)


if __name__ == "__main__":
    main()
