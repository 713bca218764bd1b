"""Where the continuous batcher's worker spends its time, this checkout against another revision.

``margin serve`` decodes RAG-Token greedy requests in one running batch (margin.serving.continuous).
This runs that batcher in-process, without HTTP, on the default model and index, with a 1 GiB
passage cache by default (``margin serve``'s): client threads each ask questions one at a time,
in turn, and the worker's time is split by wrapping its parts:

- ``prefill``: admitted requests' retrieval, prompts and prefill (``ContinuousBatcher._prefill``);
- ``steps``: the decoding forwards (``Generator.step``; a newcomer's first step is its prefill's);
- ``regroup``: rows joining and leaving the running batch (``regroup``, a copy of its KV);
- ``other``: the rest of the worker's wall time (greedy choices, answers, waiting for clients).

Each run is a child process, after one warm-up pass over the questions (so the passage cache is
warm: the built-in questions are the server's popular-question load). With ``--against REV`` the
other revision runs too, from its own ``src/`` in a temporary ``git worktree``, the two
alternating A B B A ...; the answers must be identical between the sides.

    python benchmarks/batcher_profile.py --write                     # this checkout alone
    python benchmarks/batcher_profile.py --against HEAD~1            # a change, before and after
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
from serve_load import QUESTIONS  # the server load's 8 popular questions

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SECTION = "## The continuous batcher's worker: where its time goes"

# Runs in the child, against whichever margin its PYTHONPATH names; only what both sides share.
CHILD = r"""
import collections, json, sys, threading, time, warnings
import torch
warnings.filterwarnings("ignore")
threads, clients, per_client, cache_mb = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                          float(sys.argv[4]))
questions = json.loads(sys.argv[5])
torch.set_num_threads(threads)
import margin
import margin.serving.continuous as continuous
from margin.rag import RAG
from margin.serving.registry import start_registry
from margin.serving.schemas import AskKey
from margin.serving.streaming import Question
rag = RAG.load(model="default", index="default", progress=False)
gen = rag.generator
gen.set_passage_cache(int(cache_mb * 2**20))
key = AskKey(start_registry(rag, None).active, "token", "greedy", 5, None, None)
spent = collections.Counter()
def timed(owner, name, label):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
    setattr(owner, name, wrapper)
batcher = continuous.ContinuousBatcher(gen, None, max_rows=40)
timed(batcher, "_prefill", "prefill")
timed(gen, "step", "steps")
timed(continuous, "regroup", "regroup")
answers = {}
for q in questions:  # warm-up: the passage cache holds every question's passages after it
    [a] = batcher.submit(key, [Question(q)]).result()
    answers[q] = a.answer
spent.clear()
steps0 = batcher.steps_run
def client(i):
    for j in range(per_client):
        q = questions[(i + j) % len(questions)]
        [a] = batcher.submit(key, [Question(q)]).result()
        assert a.answer == answers[q], (q, a.answer, answers[q])
start = time.perf_counter()
pool = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
for t in pool:
    t.start()
for t in pool:
    t.join()
wall = time.perf_counter() - start
batcher.close()
print(json.dumps({"wall": wall, "requests": clients * per_client, "spent": dict(spent),
                  "steps": batcher.steps_run - steps0, "answers": answers,
                  "margin": margin.__file__}))
"""
PARTS = ("prefill", "steps", "regroup")


def run_side(src: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(args.threads), str(args.clients), str(args.requests),
         str(args.passage_cache_mb), json.dumps(QUESTIONS)],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"the side at {src} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a git revision to compare with (default: none)")
    parser.add_argument("--rounds", type=int, default=3, help="child runs per side (alternating)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="per client")
    parser.add_argument("--passage-cache-mb", type=float, default=1024.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's 1)")
    parser.add_argument("--write", action="store_true", help="put the section in BENCHMARKS.md")
    args = parser.parse_args()

    load_before = load_average()
    head = _short("HEAD")
    labels = {"after": f"this checkout ({head})"}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"after": ROOT / "src"}
        if args.against:
            rev = _short(args.against)
            sides = {"before": worktree(rev, Path(tmp) / "before") / "src", **sides}
            labels = {"before": f"before ({rev})", "after": f"after ({head})"}
        try:
            runs: dict[str, list[dict]] = {name: [] for name in sides}
            order = list(sides)
            for r in range(args.rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    result = run_side(sides[name], args)
                    runs[name].append(result)
                    print(f"round {r + 1} {name}: {result['requests'] / result['wall']:.2f} "
                          f"requests/s", file=sys.stderr)
        finally:
            if args.against:
                subprocess.run(["git", "worktree", "remove", "--force",
                                str(sides["before"].parent)], cwd=ROOT, check=False,
                               capture_output=True)

    rows, rps = [], {}
    for name, label in labels.items():
        rps[name] = statistics.median(run["requests"] / run["wall"] for run in runs[name])

        def share(part: str, side: list[dict] = runs[name]) -> str:
            if part == "other":
                values = [1 - sum(run["spent"].get(p, 0.0) for p in PARTS) / run["wall"]
                          for run in side]
            else:
                values = [run["spent"].get(part, 0.0) / run["wall"] for run in side]
            return f"{100 * statistics.median(values):.0f}%"

        steps = statistics.median(run["steps"] for run in runs[name])
        rows.append(f"| {label} | {rps[name]:.2f} | {share('prefill')} | {share('steps')} | "
                    f"{share('regroup')} | {share('other')} | {steps:.0f} |")
    first = next(iter(runs.values()))[0]["answers"]
    same = all(run["answers"] == first for name in runs for run in runs[name])
    verdict = (f"after / before requests/s: **{rps['after'] / rps['before']:.3f}**; answers "
               f"identical on both sides in every run" if args.against else
               "answers identical in every run")
    section = "\n".join([
        SECTION, "",
        f"`ContinuousBatcher` in-process (no HTTP) on the default model and index, "
        f"{args.passage_cache_mb:g} MiB passage cache, {args.threads} torch thread(s): "
        f"{args.clients} client threads each asking {args.requests} of the 8 popular questions "
        f"of `serve_load.py` in turn, one at a time, after a warm-up pass; {args.rounds} child "
        f"processes a side{', alternating' if args.against else ''}; medians over the runs. "
        f"Shares are of the run's wall time.", "",
        "| side | requests/s | prefill | decoding steps | regroup (join/leave copies) | other "
        "| steps run |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows, "",
        f"- {verdict}: {'yes' if same else 'NO'}",
        *provenance("batcher_profile.py", load_before),
    ])
    print(section)
    if args.write:
        write_section(BENCHMARKS_MD, section)


def _short(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
