"""Does fine-tuning help on real questions? The paper's claim (Sec. 4, Table 6), measured on CPU.

Two disjoint slices of NQ-open dev: ``--heldout`` questions from the top of the file (the slice the
evaluation reports on) and ``--train`` questions from line ``--train-from`` on. The default model
(SmolLM2-135M-Instruct, all-MiniLM-L6-v2 over the default corpus) is evaluated on the held-out
slice closed-book and zero-shot with retrieval, then fine-tuned twice with margin.train (frozen
retriever, learned retriever) and evaluated again. Exact match, SQuAD-normalised, greedy.

    MARGIN_HOME=/tmp/mh nice -n 10 python benchmarks/finetune.py --probe 3     # speed of 3 steps
    MARGIN_HOME=/tmp/mh nice -n 10 python benchmarks/finetune.py --write       # the full run

Each phase's result is saved to ``--out/results.json`` as it finishes, and a rerun skips phases
already there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_model, load_average, write_section  # noqa: E402
from margin.examples import read_examples  # noqa: E402
from margin.metrics import exact_match, has_answer  # noqa: E402
from margin.rag import RAG  # noqa: E402
from margin.train import TrainConfig, pick_target, train  # noqa: E402

DATA = Path("/work/shared/data/nq-open-dev.tsv")


def slices(heldout: int, n_train: int, train_from: int):
    rows = read_examples(DATA, limit=train_from + n_train)
    return rows[:heldout], rows[train_from : train_from + n_train]


def em(rag: RAG, examples, k: int, mode: str, closed_book: bool = False, batch: int = 8) -> dict:
    start, hits = time.perf_counter(), 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            part = examples[i : i + batch]
            qs = [e.input for e in part]
            answers = rag.ask_closed_book(qs) if closed_book else rag.ask(qs, k=k, mode=mode)
            hits += sum(exact_match(a.answer, e.answers) for a, e in zip(answers, part,
                                                                         strict=True))
    return {"em": hits / len(examples), "n": len(examples), "wall_s": time.perf_counter() - start}


def nll(rag: RAG, examples, k: int, mode: str, batch: int = 4) -> dict:
    """Mean −log p(y|x) of the first gold answer on held-out questions: the training objective,
    a finer signal than exact match on a small n."""
    start, total = time.perf_counter(), 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            part = examples[i : i + batch]
            first = [pick_target(e.answers, "first", random.Random(0)) for e in part]
            targets = first  # the generator writes them as its prompt expects
            loss = rag.loss([e.input for e in part], targets, k=k, mode=mode, reduction="sum")
            total += float(loss)
    return {"nll": total / len(examples), "n": len(examples), "wall_s": time.perf_counter() - start}


def recall(rag: RAG, examples, k: int) -> dict:
    """How many questions have a gold answer in their top-k passages (an EM ceiling, roughly)."""
    hits = rag.retrieve([e.input for e in examples], k)
    found = sum(has_answer([p.text for p in ps], e.answers)
                for ps, e in zip(hits.passages, examples, strict=True))
    return {"share": found / len(examples), "n": len(examples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--train-from", type=int, default=1000)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--mode", default="token")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--probe", type=int, default=0, help="only time this many training steps")
    ap.add_argument("--out", type=Path, default=Path("/tmp/margin-finetune"))
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    heldout, train_set = slices(args.heldout, args.train, args.train_from)
    assert not {e.input for e in heldout} & {e.input for e in train_set}
    config = dict(k=args.k, mode=args.mode, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, lr=args.lr, lora=True,
                  lora_r=args.lora_r, lora_alpha=2 * args.lora_r, warmup=max(1, args.steps // 10))
    if args.probe:
        rag = RAG.load("default", "default", progress=False)
        start = time.perf_counter()
        train(rag, train_set, args.out / "probe", TrainConfig(steps=args.probe, **config),
              progress=True)
        print(f"{args.probe} steps x {args.batch_size} questions, k={args.k}: "
              f"{time.perf_counter() - start:.1f} s")
        t = em(rag, heldout[:8], args.k, args.mode)
        print(f"eval 8 questions: {t['wall_s']:.1f} s")
        return
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["settings"] = dict(vars(args), out=str(args.out), train_size=len(train_set))

    def phase(name, fn):
        if name not in results:
            results[name] = fn()
            path.write_text(json.dumps(results, indent=1))
        print(name, results[name], flush=True)

    base = RAG.load("default", "default", progress=False)
    phase("answer_in_top_k", lambda: recall(base, heldout, args.k))
    phase("closed_book", lambda: em(base, heldout, args.k, args.mode, closed_book=True))
    phase("zero_shot", lambda: em(base, heldout, args.k, args.mode))
    for name, frozen in (("frozen_retriever", True), ("learned_retriever", False)):
        def run(frozen=frozen, name=name):
            rag = RAG.load("default", "default", progress=False)
            cfg = TrainConfig(steps=args.steps, freeze_retriever=frozen, **config)
            out = args.out / name
            result = train(rag, train_set, out, cfg, resume=(out / "state").exists(),
                           progress=True)
            scores = em(rag, heldout, args.k, args.mode)
            losses = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
            losses = [r["loss"] for r in losses if "loss" in r]
            first, last = losses[: len(losses) // 5], losses[-(len(losses) // 5):]
            return dict(scores, steps=result.steps, train_wall_s=result.wall_s,
                        loss_first=sum(first) / len(first), loss_last=sum(last) / len(last))
        phase(name, run)
    phase("nll_zero_shot", lambda: nll(base, heldout, args.k, args.mode))
    for name in ("frozen_retriever", "learned_retriever"):
        if name in results:
            phase(f"nll_{name}", lambda name=name: nll(
                RAG.load(args.out / name / "last", "default", progress=False), heldout, args.k,
                args.mode))
    if args.write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md",
                      section(results))


def section(r: dict) -> str:
    s = r["settings"]
    rows = [
        ("closed-book generator (same prompt, no passage)", r["closed_book"], "-"),
        ("zero-shot RAG", r["zero_shot"], "zero_shot"),
        ("fine-tuned RAG, frozen retriever", r["frozen_retriever"], "frozen_retriever"),
        ("fine-tuned RAG, learned retriever", r["learned_retriever"], "learned_retriever"),
    ]
    lines = [
        "## Fine-tuning (default model, NQ-open dev slices)",
        "",
        f"`margin.train` on {s['train_size']} NQ-open dev questions (lines {s['train_from'] + 1}-"
        f"{s['train_from'] + s['train_size']}), evaluated on the first {s['heldout']} (disjoint): "
        f"default model (SmolLM2-135M-Instruct, few-shot QA prompt) over the default corpus, "
        f"RAG-{s['mode'].capitalize()}, k={s['k']} in training and evaluation, greedy, exact match "
        f"(SQuAD-normalised, any gold answer). LoRA r={s['lora_r']} on every linear layer of the "
        f"generator, lr {s['lr']}, {s['steps']} steps of {s['batch_size']} x {s['grad_accum']} "
        "questions, linear "
        "warm-up/decay; the learned-retriever run also trains all-MiniLM-L6-v2 (the index stays).",
        "",
        "| system | held-out EM | held-out −log p(y\\|x) | n | train steps | train wall | eval |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, v, key in rows:
        lp = r.get(f"nll_{key}", {}).get("nll")
        lp_text = "-" if lp is None else f"{lp:.2f}"
        steps = f"{v['steps']} | {v['train_wall_s'] / 60:.1f} min" if "steps" in v else "- | -"
        lines.append(f"| {label} | {v['em']:.3f} | {lp_text} | {v['n']} | {steps} | "
                     f"{v['wall_s']:.0f} s |")
    n = r["zero_shot"]["n"]
    short = ("closed-book", "zero-shot", "frozen retriever", "learned retriever")
    lines += [
        "",
        f"Exact matches out of {n}: " + ", ".join(
            f"{name} {round(v['em'] * v['n'])}" for name, (_, v, _) in zip(short, rows, strict=True)
        ) + f". With n={n} one question is {1 / n:.3f} of EM: differences of one or two "
        "questions are noise, and this run can only show a large effect.",
    ]
    if all(f"nll_{key}" in r for key in ("zero_shot", "frozen_retriever", "learned_retriever")):
        z, f, g = (r[f"nll_{key}"]["nll"] for key in
                   ("zero_shot", "frozen_retriever", "learned_retriever"))
        tuned = max(r["frozen_retriever"]["em"], r["learned_retriever"]["em"])
        shown = tuned >= r["zero_shot"]["em"] + 2 / n and tuned >= r["closed_book"]["em"] + 2 / n
        lines += [
            "",
            f"Reading: {s['steps']} steps on {s['train_size']} questions lowered the held-out "
            f"−log p(y|x) from {z:.1f} to {f:.1f} (frozen retriever) and {g:.1f} (learned "
            "retriever) nats, so training moved the objective on questions it never saw. "
            + ("Exact match rose by more than noise: the paper's claim that fine-tuned RAG beats "
               "closed-book and zero-shot holds here." if shown else
               "Exact match did not move beyond noise, so the paper's claim that fine-tuned RAG "
               "beats closed-book and zero-shot is neither shown nor refuted at this scale: it "
               "needs many more steps and questions than a shared 2-core CPU gives in 45 minutes "
               "(the paper trains on all of NQ's 79k questions)."),
        ]
    top = r.get("answer_in_top_k")
    if top:
        lines += ["", f"A gold answer occurs in the top {s['k']} passages of {top['share']:.0%} of "
                  f"the {top['n']} held-out questions (zero-shot retriever, DPR's has_answer)."]
    lines += [
        "",
        "−log p(y|x): the training objective on the held-out questions' first gold answer (mean "
        "nats per question, RAG marginal over the k passages, answer tokens plus the end-of-answer "
        "token). Memory: a micro-batch of 8 questions x k=2 prompts (~350 tokens "
        "each) holds ~9.5 GB of fp32 activations and was killed for memory on this 23 GB shared "
        "machine; micro-batches of 2 with 4-step gradient accumulation train the same objective "
        "in ~3.8 GB.",
        "",
        f"- command: `MARGIN_HOME=/tmp/mh nice -n 10 python benchmarks/finetune.py --heldout "
        f"{s['heldout']} --train {s['train_size']} --steps {s['steps']} --k {s['k']} --batch-size "
        f"{s['batch_size']} --grad-accum {s['grad_accum']} --lr {s['lr']} --write`",
        "- load: five engineers' jobs shared the 2 cores throughout (load average 4-10); walls "
        "are several times an idle machine's. A first attempt with micro-batches of 8 was killed "
        "for memory after 2 steps and is not counted.",
        f"- machine: nproc {os.cpu_count()}, {cpu_model()}; torch {torch.__version__}, 1 torch "
        f"thread, nice 10, shared with other jobs; load average at the end {load_average()}",
        f"- date: {date.today().isoformat()}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
