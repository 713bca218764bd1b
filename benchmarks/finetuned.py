"""The fine-tuned default: `make finetune`'s wall time, then its answers on the held-out questions.

What it measures (issue "Answer quality", section "A fine-tuned default, one command"):

- ``finetune``: runs ``margin finetune`` on the two development files exactly as ``make finetune``
  does (the recipe in ``margin.training.recipe.FINETUNE_RECIPE``; the first 500 lines of each file
  are held
  out) and records its wall time;
- ``eval``: ``margin eval`` of ``--model finetuned`` on the held-out slices (the first 500
  questions of nq-open-dev and triviaqa-dev): closed book and dense RAG at k = 5 in both modes,
  greedy, the same settings as ``benchmarks/evaluation.py``'s main table;
- ``--write``: a BENCHMARKS.md section with the closed-book, zero-shot RAG and fine-tuned RAG rows
  side by side. The zero-shot rows are read through ``run_eval`` from ``benchmarks/evaluation.py``'s
  ``--out`` (resumed, so only what is missing there is predicted).

    MARGIN_HOME=/tmp/mh nice -n 10 .venv/bin/python benchmarks/finetuned.py finetune
    MARGIN_HOME=/tmp/mh nice -n 10 .venv/bin/python benchmarks/finetuned.py eval --datasets NQ-open
    MARGIN_HOME=/tmp/mh nice -n 10 .venv/bin/python benchmarks/finetuned.py eval --write

Another recipe, when the zero-shot predictions are not at hand (a fresh machine): ``finetune
--steps 120 --precision bf16 --model NAME --out DIR``, then ``eval --tuned-only --model NAME --out
DIR``, which evaluates the fine-tuned model alone, and with ``--write`` compares its EM with the
zero-shot EM that section "Evaluation" reports (``ZERO_SHOT_EM``; quoted, not re-run).

On a lent GPU (``benchmarks/gpu_finetune.sh``), the same recipe with a larger budget: ``finetune
--k 5 --epochs 1`` passes those options on to ``margin finetune``; ``eval --device cuda`` runs
both models there, zero-shot included, and ``--section-out FILE`` writes the section ("... on a
GPU") to FILE rather than BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from margin.assets import margin_home
from margin.evaluation.evaluate import run_eval
from margin.evaluation.grid import EvalConfig, RunSpec
from margin.evaluation.runs import read_predictions
from margin.models import load_model
from margin.rag import LOSS_MODES
from margin.training.precision import PRECISIONS
from margin.training.recipe import FINETUNE_RECIPE, FINETUNE_UNGROUNDED, HELDOUT

sys.path.insert(0, str(Path(__file__).parent))
from _report import load_average, machine, write_section  # noqa: E402
from evaluation import DATASETS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAIN = dict(ks=(5,), modes=("token", "sequence"))
# The default model's EM x100 on the first 500 questions (greedy, dense k = 5; "none": closed
# book), as BENCHMARKS.md "Evaluation" reports them (benchmarks/evaluation.py, 2026-11-27): what
# `eval --tuned-only` compares with when the zero-shot predictions are not at hand.
ZERO_SHOT_EM = {"NQ-open": {"none": 1.6, "token": 2.6, "sequence": 3.0},
                "TriviaQA": {"none": 7.0, "token": 9.8, "sequence": 9.6}}
# The default recipe's fine-tuned EM x100 on the same questions, as BENCHMARKS.md reports them
# in DEFAULT_RECIPE_SECTION (2026-12-05, the 192-step recipe): what a rerun of `make finetune`
# evaluated alone is held against, to say whether it reproduced.
DEFAULT_RECIPE_SECTION = "Answer quality: the fine-tuned default (`make finetune`)"
DEFAULT_RECIPE_EM = {"NQ-open": {"none": 2.4, "token": 4.6, "sequence": 5.0},
                     "TriviaQA": {"none": 7.8, "token": 11.8, "sequence": 12.0}}
DEFAULT_RECIPE_RUN = {"first_loss": 7.21, "last_loss": 5.58, "wall_min": 48.3, "date": "2026-12-05"}
OBJECTIVES = {"token": "RAG-Token objective", "sequence": "RAG-Sequence objective",
              "both": "the mean of the RAG-Token and RAG-Sequence objectives"}


def finetune(out: Path, datasets: dict[str, Path], extra: list[str], name: str) -> None:
    """``make finetune``'s command (with ``extra`` options), timed; the timing is kept in
    ``out/finetune.json``."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "margin.cli", "finetune", *(str(p) for p in datasets.values()),
               *extra, *(["--name", name] if name != "finetuned" else [])]
    load_start, began = load_average(), time.perf_counter()
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - began
    print(done.stdout, end="", flush=True)
    log = [json.loads(line) for line in
           (margin_home() / "runs" / name / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    window = max(1, len(losses) // 6)  # one step's loss is one batch of 8: average a window
    record = {"wall_s": wall, "load_start": load_start, "load_end": load_average(),
              "steps": len(losses), "window": window,
              "first_loss": sum(losses[:window]) / window,
              "last_loss": sum(losses[-window:]) / window,
              "threads": torch.get_num_threads(), "command": " ".join(["margin", *command[3:]]),
              "options": extra, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "said": done.stdout.strip().splitlines()[-1],  # "trained on N questions ..."
              "date": datetime.date.today().isoformat()}
    (out / "finetune.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)


def prepare(device: str) -> None:
    """The default model's cache, built before anything is timed: the generator converted from
    its GGUF, and the default index, its passages encoded on ``device``."""
    from margin.generation.default_generator import default_generator_dir
    from margin.retrieval.retriever import ensure_default_index

    began = time.perf_counter()
    default_generator_dir(progress=False)
    ensure_default_index(progress=False, device=device)
    print(f"prepared the default model's cache in {time.perf_counter() - began:.0f} s", flush=True)


def evaluate(datasets: dict[str, Path], n: int, out: Path, zero_shot_out: Path,
             batch_size: int, device: str = "cpu",
             tuned: str = "finetuned",
             zero_shot: bool = True,
             modes: tuple[str, ...] = MAIN["modes"]) -> dict[str, dict[str, list[dict]]]:
    """Every row of the table, per data set: fine-tuned (closed book and RAG) and zero-shot
    (unless ``zero_shot`` is false). The fine-tuned model answers every data set first: a run
    cut short keeps its rows."""
    rows: dict[str, dict[str, list[dict]]] = {name: {} for name in datasets}
    kinds = [("fine-tuned", tuned, lambda name: out / name)]
    if zero_shot:
        kinds.append(("zero-shot", "default", lambda name: zero_shot_out / name / "main"))
    for kind, model, where in kinds:
        rag = load_model(model, "auto", progress=False, device=device)  # the index it carries
        for name, path in datasets.items():
            cfg = EvalConfig(data=str(path), out=str(where(name)), limit=n, batch_size=batch_size,
                             progress=False, retrievers=("none", "dense"),
                             **dict(MAIN, modes=modes))
            rows[name][kind] = results = run_eval(cfg, {"dense": rag, "none": rag})
            print(name, kind, ", ".join(f"{r['retriever']}/{r['mode']} EM "
                                        f"{100 * r['exact_match']:.1f}" for r in results),
                  flush=True)
        del rag
    return {name: {k: rows[name][k] for k in ("zero-shot", "fine-tuned") if k in rows[name]}
            for name in rows}


def first_questions(run_dir: Path, n: int) -> dict[str, dict]:
    """A run's predictions of the first ``n`` lines of its data file, by id (a resumed run
    appends out of order)."""
    records = read_predictions(run_dir / "predictions.jsonl")
    return {i: r for i, r in records.items() if int(i.rsplit(":", 1)[1]) <= n}


def reading_ceiling(zero_shot_dir: Path, n: int) -> dict[str, int]:
    """What retrieval leaves a zero-shot reader, from the zero-shot predictions of ``n`` questions:
    those whose top 5 passages hold a gold answer, the closed-book hits, and their union (the EM
    of a reader that answers every question its passages answer and keeps every closed-book
    hit)."""
    closed = first_questions(zero_shot_dir / RunSpec("none", 0, "none", "greedy").name, n)
    rag = first_questions(zero_shot_dir / RunSpec("dense", 5, "token", "greedy").name, n)
    if closed.keys() != rag.keys() or len(rag) != n:
        raise SystemExit(f"{zero_shot_dir}: the closed-book and RAG runs hold other questions")
    held = {i for i, r in rag.items() if r["metrics"]["answer_in_passages"]}
    hits = {i for i, r in closed.items() if r["metrics"]["exact_match"]}
    return {"n": n, "in_top5": len(held), "closed_hits": len(hits), "union": len(held | hits)}


def split_hits(run_dir: Path, n: int) -> tuple[int, int, int]:
    """Exact matches of a run's first ``n`` questions: on those whose top 5 passages hold a gold
    answer, on the rest, and how many questions are in the first group."""
    rows = list(first_questions(run_dir, n).values())
    held = [r for r in rows if r["metrics"]["answer_in_passages"]]
    hits = sum(r["metrics"]["exact_match"] for r in held)
    rest = sum(r["metrics"]["exact_match"] for r in rows if not r["metrics"]["answer_in_passages"])
    return int(hits), int(rest), len(held)


def paired(tuned_dir: Path, zero_dir: Path, n: int,
           metric: str = "exact_match") -> tuple[int, int, float]:
    """Questions among the first ``n`` that only the fine-tuned run got right, those only the
    zero-shot run got right, and the two-sided sign test's p-value for that split (``metric``:
    another per-question 0/1 of the predictions, e.g. ``answer_in_passages``)."""
    tuned, zero = first_questions(tuned_dir, n), first_questions(zero_dir, n)
    if tuned.keys() != zero.keys():
        raise SystemExit(f"{tuned_dir} and {zero_dir} hold other questions")
    right = {i: (tuned[i]["metrics"][metric], zero[i]["metrics"][metric]) for i in tuned}
    only_tuned = sum(1 for t, z in right.values() if t and not z)
    only_zero = sum(1 for t, z in right.values() if z and not t)
    m = only_tuned + only_zero
    tail = sum(math.comb(m, j) for j in range(min(only_tuned, only_zero) + 1)) / 2**m
    return only_tuned, only_zero, min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("prepare", "finetune", "eval"))
    ap.add_argument("--n", type=int, default=HELDOUT, help="held-out questions per data set")
    ap.add_argument("--datasets", default=",".join(DATASETS),
                    help="comma list (one process per data set uses both cores); --write needs all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (eval)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/margin-finetuned-bench"))
    ap.add_argument("--model", default="finetuned", help="the installed fine-tuned model's name "
                    "(margin finetune --name)")
    ap.add_argument("--zero-shot-out", type=Path, default=Path("/tmp/margin-eval-bench"),
                    help="benchmarks/evaluation.py's --out (its runs are resumed, not redone)")
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    ap.add_argument("--previous", type=Path, action="append", default=[],
                    help="an earlier recipe's --out, compared question by question (repeatable)")
    ap.add_argument("--previous-label", action="append", default=[],
                    help="what each --previous was, in the same order")
    ap.add_argument("--data-dir", type=Path, help="where nq-open-dev.tsv and triviaqa-dev.tsv "
                    "are (default: benchmarks/evaluation.py's)")
    ap.add_argument("--k", type=int, help="finetune: passages per question (margin finetune --k)")
    ap.add_argument("--epochs", type=int, help="finetune: margin finetune --epochs")
    ap.add_argument("--steps", type=int, help="finetune: margin finetune --steps")
    ap.add_argument("--precision", choices=PRECISIONS,
                    help="finetune: margin finetune --precision")
    ap.add_argument("--limit", type=int, help="finetune: margin finetune --limit (a smoke test)")
    ap.add_argument("--mode", choices=LOSS_MODES,
                    help="finetune: the objective (margin finetune --mode)")
    ap.add_argument("--max-minutes", type=float,
                    help="finetune: margin finetune --max-minutes (the recipe's budget)")
    ap.add_argument("--retriever", choices=("train", "question", "none"),
                    help="finetune: margin finetune --retriever (recipe: train)")
    ap.add_argument("--device", default="cpu", help="eval: where the models answer (cpu, cuda)")
    ap.add_argument("--modes", default="token,sequence",
                    help="eval: the RAG modes answered (closed book is always)")
    ap.add_argument("--against", type=Path,
                    help="eval --tuned-only --write: another model's --out on the same questions "
                         "(e.g. `eval --tuned-only --model default --out DIR`), compared with, "
                         "question by question")
    ap.add_argument("--tuned-only", action="store_true",
                    help="eval: the fine-tuned model alone; --write compares it with the zero-shot "
                    "EM that BENCHMARKS.md \"Evaluation\" reports (ZERO_SHOT_EM)")
    ap.add_argument("--section-out", type=Path, default=ROOT / "BENCHMARKS.md",
                    help="--write: the file whose section is written")
    args = ap.parse_args()
    if len(args.previous_label) != len(args.previous):
        ap.error("give one --previous-label per --previous")
    datasets = {name: DATASETS[name] if args.data_dir is None else args.data_dir / path.name
                for name, path in DATASETS.items() if name in args.datasets.split(",")}
    if args.phase == "prepare":
        prepare(args.device)
        return
    if args.phase == "finetune":
        extra = [*(["--k", str(args.k)] if args.k else []),
                 *(["--epochs", str(args.epochs)] if args.epochs else []),
                 *(["--steps", str(args.steps)] if args.steps else []),
                 *(["--precision", args.precision] if args.precision else []),
                 *(["--limit", str(args.limit)] if args.limit else []),
                 *(["--mode", args.mode] if args.mode else []),
                 *(["--retriever", args.retriever] if args.retriever else []),
                 *(["--max-minutes", str(args.max_minutes)] if args.max_minutes is not None
                   else [])]
        finetune(args.out, datasets, extra, args.model)
        return
    if args.write and len(datasets) < len(DATASETS):
        ap.error("--write needs every data set")
    torch.set_num_threads(args.threads)
    load_start = load_average()
    rows = evaluate(datasets, args.n, args.out, args.zero_shot_out, args.batch_size, args.device,
                    args.model, zero_shot=not args.tuned_only,
                    modes=tuple(args.modes.split(",")))
    if args.write:
        timing = json.loads((args.out / "finetune.json").read_text())
        section = (render_tuned_only if args.tuned_only else render)(
            rows, timing, args, load_start, load_average())
        print(section)
        write_section(args.section_out, section)


def _launcher() -> str:
    """How the script was started, as far as it can tell: the ``MARGIN_HOME`` it ran under (when
    one was set) and ``nice`` (when the process runs niced)."""
    home = os.environ.get("MARGIN_HOME")
    niceness = os.nice(0)
    return ((f"MARGIN_HOME={home} " if home else "") + (f"nice -n {niceness} " if niceness else "")
            + ".venv/bin/python ")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def describe(timing, args, heading: str) -> list[str]:
    """The section's heading, the recipe as it ran (with its options), its wall time and loss,
    and what the held-out questions were."""
    gpu = args.device != "cpu"
    options = timing.get("options", [])
    r = FINETUNE_RECIPE
    if "--k" in options:
        r = replace(r, k=int(options[options.index("--k") + 1]))
    if "--mode" in options:
        r = replace(r, mode=options[options.index("--mode") + 1])
    if "--steps" in options:
        r = replace(r, steps=int(options[options.index("--steps") + 1]))
    if "--precision" in options:
        r = replace(r, precision=options[options.index("--precision") + 1])
    precision = {"bf16": "; bf16 autocast", "fp32": "; fp32"}.get(
        r.precision, "; bf16 autocast on the GPU" if gpu else "")
    per_step = (f"{r.batch_size * r.grad_accum} questions ({r.batch_size} x {r.grad_accum} "
                "accumulated)")
    if "--epochs" in options:
        length = (f"{options[options.index('--epochs') + 1]} pass(es) (`--epochs`) over every "
                  f"training question with a gold answer in its top {r.k} passages, and questions "
                  f"without in proportion ({timing['steps']} optimizer steps of {per_step})")
    elif timing["steps"] < r.steps:  # the time budget cut the run on this machine
        length = (f"{r.steps} optimizer steps of {per_step} asked for, cut to {timing['steps']} "
                  f"by the recipe's time budget (`--max-minutes {r.max_minutes:g}`) on this CPU, "
                  f"so {timing['steps'] * r.batch_size * r.grad_accum} training questions")
    else:
        length = (f"{r.steps} optimizer steps of {per_step}, so "
                  f"{r.steps * r.batch_size * r.grad_accum} training questions")
    command = " ".join(["margin finetune nq-open-dev.tsv triviaqa-dev.tsv", *options])
    lines = [
        heading, "",
        ("`make finetune` (" if not options else "") + f"`{command}`" + ("" if options else ")")
        + " fine-tunes the "
        f"default model on the development files minus their first {HELDOUT} lines, which are held "
        f"out for this report. Recipe (`margin.training.recipe.FINETUNE_RECIPE`"
        f"{', with ' + ' '.join(options) if options else ''}): {OBJECTIVES[r.mode]}, "
        f"k = {r.k}, {length} (NQ and TriviaQA "
        f"interleaved, in file order): {1 - FINETUNE_UNGROUNDED:.1%} the first ones with a gold "
        f"answer in their top {r.k} passages, that answer the target, and "
        f"{FINETUNE_UNGROUNDED:.1%} the first ones without "
        "(`margin.training.recipe.select_questions`); "
        f"LoRA r = {r.lora_r} on every linear layer of the generator at lr {r.lr:g}, "
        f"the question encoder trained in full at lr {r.retriever_lr:g}; the passage index fixed "
        "(the paper's setting)" + precision + ".", "",
        f"- wall time of the fine-tuning: **{timing['wall_s'] / 60:.1f} min** "
        + ("(on the GPU, model loading and question selection included)" if gpu else
           "(the target: at most 60 min on this 2-core CPU)")
        + "; training loss (−log p(y|x), nats, "
        f"mean over {timing['window']} steps; each step sees new questions) "
        f"{timing['first_loss']:.2f} over the first steps, {timing['last_loss']:.2f} over the "
        f"last (of {timing['steps']})",
        f"- `margin finetune` said: \"{timing.get('said', '?')}\"",
        f"- load average while it ran: {timing['load_start']} at the start, "
        f"{timing['load_end']} at the end; torch {timing['threads']} thread(s); "
        f"{timing['date']}", "",
        f"Held-out questions: the first {args.n} of each file. Greedy, at most 16 new tokens, the "
        "shipped few-shot template; dense retriever, k = 5. EM and F1 x100 (SQuAD-normalised, max "
        "over the gold answers).", "",
    ]
    if args.n < HELDOUT:
        lines += [
            f"Only the first {args.n} held-out questions of each file, not all {HELDOUT}: the "
            "evaluation was stopped when the session's time ran out. Every row has the same "
            "questions; `eval` resumes from `--out` and grows the fine-tuned runs.", "",
        ]
    return lines


def render_tuned_only(rows, timing, args, load_start, load_end) -> str:
    """A section for a recipe evaluated alone: its rows, and its EM against the zero-shot EM
    quoted from BENCHMARKS.md "Evaluation" (``ZERO_SHOT_EM``, not measured by this run)."""
    options = timing.get("options", [])
    if options:
        heading = f"## Answer quality: `{' '.join(['margin finetune', *options])}`"
    elif timing["steps"] < FINETUNE_RECIPE.steps:
        heading = "## Answer quality: `make finetune` cut by its time budget on a slower CPU"
    else:
        heading = "## Answer quality: `make finetune` again, evaluated alone"
    lines = describe(timing, args, heading)
    lines += ["| data set | model | retrieval | mode | n | EM | F1 | EM, answer in top 5 (n) | "
              "s/question | minus zero-shot EM |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, by_model in rows.items():
        for r in by_model["fine-tuned"]:
            closed = r["k"] == 0
            subset = "-" if closed else (f"{_pct(r['exact_match_answer_retrieved'])} "
                                         f"({r['n_answer_retrieved']})")
            gain = 100 * r["exact_match"] - ZERO_SHOT_EM[name][r["mode"]]  # of 500 questions
            gain_text = f"{gain:+.1f}" if r["n"] == HELDOUT else "-"
            lines.append(
                f"| {name} | {args.model} | {'closed book' if closed else 'dense k=5'} | "
                f"{'-' if closed else r['mode']} | {r['n']} | {_pct(r['exact_match'])} | "
                f"{_pct(r['f1'])} | {subset} | {r['seconds_per_example']:.2f} | {gain_text} |")
    lines += [
        "",
        "Minus zero-shot: against the default model's EM in section 'Evaluation' (closed book "
        + ", ".join(f"{name} {v['none']}" for name, v in ZERO_SHOT_EM.items()) + "; RAG token / "
        "sequence " + ", ".join(f"{name} {v['token']} / {v['sequence']}"
                                for name, v in ZERO_SHOT_EM.items())
        + "), an earlier session's greedy run of the same questions, quoted, not re-run here; "
        "for closed book the difference is against the default model's closed book"
        + ("" if args.n == HELDOUT else f"; not given for the first {args.n}, which those "
           "figures do not cover") + ".", "",
    ]
    if not options:
        lines += [reproduction(rows, timing), ""]
    eval_options = ("" if args.n == HELDOUT else f" --n {args.n}") + (
        "" if args.modes == "token,sequence" else f" --modes {args.modes}")
    if args.against:
        lines += [against(rows, args), ""]
    lines += [
        f"- command: `{_launcher()}benchmarks/finetuned.py "
        + " ".join(["finetune", *options, "--model", args.model, "--out", str(args.out)]) + "`, "
        f"then `... eval --tuned-only --model {args.model} --out {args.out}{eval_options}` with "
        "`--datasets NQ-open` and `--datasets TriviaQA` side by side (one process each)"
        + (f", each followed by the same with `--model default --out {args.against}`"
           if args.against else "")
        + f", then `... eval --tuned-only{eval_options}"
        + (f" --against {args.against}" if args.against else "")
        + " --write` (resumes, aggregates)",
        f"- machine: {machine()}; load average for the final invocation {load_start} at the "
        f"start, {load_end} at the end (shared machine)",
        f"- date: {datetime.date.today().isoformat()}",
    ]
    return "\n".join(lines) + "\n"


def against(rows, args) -> str:
    """This model beside another one's run of the same questions (``args.against``): that
    model's EM, and the questions only this one / only that one got right, with the sign test."""
    parts = []
    for name, by_model in rows.items():
        for r in by_model["fine-tuned"]:
            run = RunSpec(r["retriever"], r["k"], r["mode"], r["decoding"])
            other = first_questions(args.against / name / run.name, args.n)
            em = sum(q["metrics"]["exact_match"] for q in other.values()) / len(other)
            t, z, pval = paired(args.out / name / run.name, args.against / name / run.name,
                                args.n)
            parts.append(f"{name} {'closed book' if r['k'] == 0 else r['mode']}: EM "
                         f"{_pct(r['exact_match'])} against {_pct(em)}, right only here {t}, "
                         f"only there {z} (p = {pval:.2f})")
    return (f"Beside `{args.against}` (another model's run of the same {args.n} questions per "
            "set, the same settings): " + "; ".join(parts) + ".")


def reproduction(rows, timing) -> str:
    """The default recipe run again, against its documented run (``DEFAULT_RECIPE_EM``,
    ``DEFAULT_RECIPE_RUN``): its training loss and wall time, the EM of every row beside the
    documented one, and whether all of them are the same."""
    pairs = [(name, r, DEFAULT_RECIPE_EM[name][r["mode"]])
             for name, by_model in rows.items() for r in by_model["fine-tuned"]]
    same = all(round(100 * r["exact_match"], 1) == documented for _, r, documented in pairs)
    if timing["steps"] < FINETUNE_RECIPE.steps:
        return (f"The time budget cut this run to {timing['steps']} of the recipe's "
                f"{FINETUNE_RECIPE.steps} steps, so it is not a rerun of the documented one "
                f"(section \"{DEFAULT_RECIPE_SECTION}\"): a shorter training on a slower CPU.")
    return (f"Beside the documented run of the same recipe (section \"{DEFAULT_RECIPE_SECTION}\", "
            f"{DEFAULT_RECIPE_RUN['date']}), now / then: training loss over the first steps "
            f"{timing['first_loss']:.2f} / {DEFAULT_RECIPE_RUN['first_loss']}, over the last "
            f"{timing['last_loss']:.2f} / {DEFAULT_RECIPE_RUN['last_loss']}; wall time "
            f"{timing['wall_s'] / 60:.1f} / {DEFAULT_RECIPE_RUN['wall_min']} min; EM "
            + "; ".join(f"{name} {'closed book' if r['k'] == 0 else r['mode']} "
                        f"{_pct(r['exact_match'])} / {documented}" for name, r, documented in pairs)
            + (". Every row is the same: the recipe reproduced." if same else
               ". Not every row is the same: the recipe did not reproduce exactly."))


def render(rows, timing, args, load_start, load_end) -> str:
    gpu = args.device != "cpu"
    options = timing.get("options", [])
    lines = describe(timing, args, "## Answer quality: the same recipe on a GPU, with a larger "
                     "budget" if gpu else "## Answer quality: the fine-tuned default "
                     "(`make finetune`)")
    lines += [
        "| data set | model | retrieval | mode | n | EM | F1 | EM, answer in top 5 (n) | "
        "s/question |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    gains = []
    for name, by_model in rows.items():
        zero = {r["mode"]: r for r in by_model["zero-shot"] if r["k"]}
        for model in ("zero-shot", "fine-tuned"):
            for r in by_model[model]:
                closed = r["k"] == 0
                subset = "-" if closed else (f"{_pct(r['exact_match_answer_retrieved'])} "
                                             f"({r['n_answer_retrieved']})")
                lines.append(
                    f"| {name} | {'default' if model == 'zero-shot' else args.model} | "
                    f"{'closed book' if closed else 'dense k=5'} | "
                    f"{'-' if closed else r['mode']} | {r['n']} | {_pct(r['exact_match'])} | "
                    f"{_pct(r['f1'])} | {subset} | {r['seconds_per_example']:.2f} |")
                if model == "fine-tuned" and not closed:
                    gains.append((name, r["mode"],
                                  r["exact_match"] - zero[r["mode"]]["exact_match"]))
    lines += ["", "Fine-tuned RAG EM minus zero-shot RAG EM (target: at least +2.0 on NQ and on "
              "TriviaQA): " + "; ".join(f"{name} {mode} {100 * g:+.1f}"
                                         for name, mode, g in gains) + ".", ""]
    pairs = []
    for name in rows:
        for mode in ("token", "sequence"):
            run = RunSpec("dense", 5, mode, "greedy").name
            t, z, p = paired(args.out / name / run, args.zero_shot_out / name / "main" / run,
                             args.n)
            pairs.append(f"{name} {mode} {t} / {z} (p = {p:.2f})")
    lines += ["Question by question: right only when fine-tuned / only zero-shot, and the "
              "two-sided sign test's p-value: " + "; ".join(pairs) + ".", ""]
    lines += ["Zero-shot RAG against closed book (target: at least 3x its EM), and the most "
              "retrieval allows: a reader that answered every question whose top 5 passages hold "
              "a gold answer, and kept every closed-book hit, would score the union column.", "",
              "| data set | closed book EM | zero-shot RAG EM, token / sequence | ratio | "
              "3x closed book | answer in top 5 | closed-book hits | union (EM) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, by_model in rows.items():
        zero = {r["mode"]: r for r in by_model["zero-shot"]}
        c = reading_ceiling(args.zero_shot_out / name / "main", args.n)
        closed, tok, seq = (zero[m]["exact_match"] for m in ("none", "token", "sequence"))
        ratio = " / ".join(f"{x / closed:.1f}x" for x in (tok, seq)) if closed else "-"
        lines.append(f"| {name} | {_pct(closed)} | {_pct(tok)} / {_pct(seq)} | {ratio} | "
                     f"{_pct(3 * closed)} | {c['in_top5']} | {c['closed_hits']} | "
                     f"{c['union']} ({_pct(c['union'] / c['n'])}) |")
    lines.append("")
    if args.previous:
        lines += ["Where the exact matches come from, beside other recipes: questions whose "
                  "top 5 passages hold a gold answer (\"in top 5\", each "
                  f"model's own retriever) and the rest. Exact matches out of {args.n}; for each "
                  "fine-tuned model, the questions only it / only the zero-shot default got right "
                  "and the sign test's p-value.", "",
                  "| data set | mode | model | in top 5 (hits / questions) | rest (hits) | EM | "
                  "vs zero-shot |",
                  "|---|---|---|---:|---:|---:|---|"]
        for name in rows:
            for mode in ("token", "sequence"):
                run = RunSpec("dense", 5, mode, "greedy").name
                runs = [("default (zero-shot)", args.zero_shot_out / name / "main"),
                        *((label, out / name)
                          for label, out in zip(args.previous_label, args.previous, strict=True)),
                        ("finetuned (this recipe)", args.out / name)]
                for i, (label, where) in enumerate(runs):
                    held, rest, n_held = split_hits(where / run, args.n)
                    versus = "-"
                    if i:
                        t, z, p = paired(where / run, runs[0][1] / run, args.n)
                        versus = f"{t} / {z} (p = {p:.2f})"
                    lines.append(f"| {name} | {mode} | {label} | {held} / {n_held} | {rest} | "
                                 f"{_pct((held + rest) / args.n)} | {versus} |")
        lines.append("")
    if gpu:
        lines += [
            "- commands: `bash benchmarks/gpu_finetune.sh run` on the lent GPU machine: "
            f"`benchmarks/finetuned.py finetune {' '.join(options)}`, then "
            f"`benchmarks/finetuned.py eval --device {args.device} --batch-size "
            f"{args.batch_size} --write` (both models, one process)",
            "- the zero-shot rows were answered on the same GPU in the same run, fp32 as the "
            "fine-tuned rows",
            f"- machine: {machine(args.device)}; load average {load_start} at the start of the "
            f"evaluation, {load_end} at the end",
            f"- date: {datetime.date.today().isoformat()}",
        ]
        return "\n".join(lines) + "\n"
    lines += [
        f"- commands: `{_launcher()}benchmarks/finetuned.py "
        "finetune`, then `... benchmarks/finetuned.py eval --datasets NQ-open` and `--datasets "
        "TriviaQA` side by side (one process each), then `... eval --write` (resumes, "
        "aggregates)" + (" with " + " ".join(f"`--previous {out} --previous-label \"{label}\"`"
                                       for out, label in zip(args.previous, args.previous_label,
                                                             strict=True))
                         + " (the other recipes' `--out`)" if args.previous else ""),
        "- the zero-shot rows are `benchmarks/evaluation.py`'s runs (section \"Evaluation\"), read "
        "back through the same `run_eval`",
        f"- machine: {machine()}; load average for the final invocation {load_start} at the "
        f"start, {load_end} at the end (shared machine)",
        f"- date: {datetime.date.today().isoformat()}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
