"""Causal RAG decoding on the default model: margin's RAG-Token / RAG-Sequence vs plain generate.

Same model (SmolLM2-135M-Instruct, the default few-shot QA prompt), same questions, same retrieved
passages (retrieved once, outside the timings), same torch thread count (default 1: on a shared
2-core machine two OpenMP threads can be many times slower than one). Timed, median of ``--runs``
after one warm-up each:

- margin RAG-Token, greedy: ``rag.generate(..., mode="token")``, one step per token for all
  B x k (question, passage) rows, then one teacher-forced scoring pass for the provenance;
- margin RAG-Sequence, Thorough decoding, greedy: a greedy search per passage, then the missing
  (hypothesis, passage) pairs scored;
- the reference: ``model.generate`` (greedy, the same EOS tokens) on the same B x k prompts in
  one left-padded batch. It decodes each passage alone and marginalises nothing, so it is the
  work RAG-Sequence's search does, done the plain way (the prompt run per row, logits at every
  prompt position).

    .venv/bin/python benchmarks/causal_decoding.py            # print a Markdown section
    .venv/bin/python benchmarks/causal_decoding.py --write    # also put it in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _report import load_average, provenance, write_section
from margin.generation.kv_cache import common_prefix_length, unpadded_rows
from margin.rag import RAG

SECTION = "## Causal decoding (default model)"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
QUESTIONS = [
    "Who painted the Mona Lisa?",
    "What is the capital of Australia?",
    "Who wrote Pride and Prejudice?",
    "What is the largest planet in the Solar System?",
]


def timed(fn) -> tuple[float, object]:
    """Wall-clock seconds of one call, and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def strip_generated(row: list[int], eos: tuple[int, ...], pad: int) -> tuple[int, ...]:
    """Generated tokens up to and including the first EOS (the rest is padding)."""
    for i, t in enumerate(row):
        if t in eos:
            return tuple(row[: i + 1])
    return tuple(t for t in row if t != pad)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5, help="passages per question")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--write", action="store_true", help=f"put the section in {BENCHMARKS_MD}")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = load_average()
    rag = RAG.load()
    gen = rag.generator
    with torch.no_grad():
        hits, scores = rag.retrieve_scored(QUESTIONS, args.k)  # scores (B, k)
    inputs = gen.build_inputs(QUESTIONS, hits.passages)  # (B*k, S), left-padded
    max_new = rag.default_decode.max_new_tokens
    rows = unpadded_rows(inputs.input_ids, inputs.attention_mask)
    shared = common_prefix_length(rows)

    def margin(mode: str):
        return lambda: rag.generate(QUESTIONS, hits.passages, scores, mode=mode, decoding="greedy")

    @torch.no_grad()
    def reference():
        return gen.model.generate(
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=list(gen.eos_token_ids),
            pad_token_id=gen.pad_token_id,
        )

    sides = {
        "token": ("margin RAG-Token, greedy", margin("token")),
        "sequence": ("margin RAG-Sequence, Thorough, greedy", margin("sequence")),
        "generate": ("transformers `generate`, greedy, same B x k prompts", reference),
    }
    results = {name: fn() for name, (_, fn) in sides.items()}  # warm-up, and the outputs
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.runs):
        for name, (_, fn) in sides.items():
            times[name].append(timed(fn)[0])
            print(f"run {r + 1} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    median = {name: statistics.median(t) for name, t in times.items()}

    # agreement: each question's RAG-Sequence answer is one of its passages' greedy generations
    width = inputs.input_ids.shape[1]
    generated = [
        strip_generated(row[width:], gen.eos_token_ids, gen.pad_token_id)
        for row in results["generate"].tolist()  # type: ignore[union-attr]
    ]
    clean = rag.postprocess or (lambda text: text)
    texts = [clean(gen.decode(g)) for g in generated]  # as RAG cleans its answers
    k = args.k
    agree = sum(
        a.answer in texts[b * k : (b + 1) * k]
        for b, a in enumerate(results["sequence"])  # type: ignore[arg-type]
    )

    def row(name: str) -> str:
        label = sides[name][0]
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        ratio = median["generate"] / median[name]
        return f"| {label} | {median[name]:.1f} | {ratio:.2f} | {runs} |"

    answers = "; ".join(
        f"{q} → {a.answer}" for q, a in zip(QUESTIONS, results["token"], strict=True)  # type: ignore[arg-type]
    )
    real = sum(len(r) for r in rows)
    section = "\n".join([
        SECTION,
        "",
        f"Default generator (SmolLM2-135M-Instruct, float32, few-shot QA prompt) on "
        f"{len(QUESTIONS)} questions x k={k} retrieved passages, greedy, at most {max_new} new "
        f"tokens, {args.threads} torch thread(s), median of {args.runs} runs after a warm-up, "
        "same process; retrieval is done once, outside the timings. The "
        f"{len(rows)} prompts hold {real:,} tokens ({min(map(len, rows))}-"
        f"{max(map(len, rows))} each), of which the first {shared} (instruction and "
        "demonstrations) are the same in every prompt.",
        "",
        "| decoding | seconds (median) | speed-up vs `generate` | runs (s) |",
        "|---|---|---|---|",
        row("token"),
        row("sequence"),
        row("generate"),
        "",
        "`generate` decodes each (question, passage) prompt alone and marginalises nothing: it is "
        "the search RAG-Sequence runs, done the plain way. margin runs the shared prompt prefix "
        "once, each prompt's own suffix once (batched by length), computes output logits only "
        "where a token is predicted, and scores hypotheses on the cached prompts. "
        f"Agreement: {agree}/{len(QUESTIONS)} RAG-Sequence answers are one of their passages' "
        f"`generate` outputs. RAG-Token answers: {answers}.",
        "",
        *provenance("causal_decoding.py", load_before),
    ])
    print(section)
    if args.write:
        write_section(BENCHMARKS_MD, section)
        print(f"wrote {SECTION!r} to {BENCHMARKS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
