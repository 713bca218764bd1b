"""The prefill of a server-sized batch: 8 questions x 5 passages (40 rows) of the default model.

``CausalGenerator.encode`` is most of an answer's time on a CPU (docs/performance.md), and the
server prefills its newcomers in batches like this one. Timed, in one process, alternating:

- attention: transformers' SDPA (``sdpa``: each key/value head copied once per query head that
  reads it, ``repeat_kv``) against margin's grouped SDPA (margin.generation.attention, no copy);
- path: the passage cache off (the rows' suffixes batched on the shared template prefix); cold
  (the passages evicted, the template prefix kept: every passage runs, batched); warm (every
  passage cached: only the questions run).

Each cell is the median of ``--rounds`` alternating runs after a warm-up; the logits of every
cell are compared with the sdpa, cache-off ones (max absolute difference). The floor of each
path is its FLOPs (every row's tokens after what the path reads cached: 2 x non-embedding
parameters a token, attention over the row's past, one output row) at the matmul rate measured
in the same process (``ask_profile.matmul_rate``, a 2048^3 fp32 matmul; the FLOPs are
``ask_profile.ForwardCost``'s).

    python benchmarks/prefill.py --rounds 5 --write
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _report import load_average, provenance, write_section
from ask_profile import ForwardCost, matmul_rate
from decoding import QUESTIONS

SECTION = "## Prefill of a 40-row batch: attention and the passage cache"
PATHS = ("cache off", "cold", "warm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--write", action="store_true", help="replace its BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from margin.generation.attention import GROUPED_SDPA
    from margin.generation.passage_cache import is_passage
    from margin.rag import RAG

    load_before = load_average()
    rag = RAG.load(model="default", index="default", progress=False)
    gen = rag.generator
    questions = QUESTIONS[: args.questions]
    hits = rag.retrieve(questions, 5)
    times: dict[tuple[str, str], list[float]] = {}
    logits: dict[tuple[str, str], torch.Tensor] = {}

    def encode(path: str) -> tuple[float, torch.Tensor]:
        gen.set_passage_cache(0 if path == "cache off" else 2**30)
        inputs = gen.build_inputs(questions, hits.passages)
        if path != "cache off":
            gen.encode(inputs)  # fills the prefix and the passages
            if path == "cold":
                gen.passage_cache.evict(is_passage)
        start = time.perf_counter()
        prompt = gen.encode(inputs).prompt
        return time.perf_counter() - start, prompt.next_logits

    with torch.no_grad():
        for attention in ("sdpa", GROUPED_SDPA):  # warm-up, each once
            gen.model.set_attn_implementation(attention)
            encode("cache off")
        for _ in range(args.rounds):
            for attention in ("sdpa", GROUPED_SDPA):
                gen.model.set_attn_implementation(attention)
                for path in PATHS:
                    seconds, out = encode(path)
                    times.setdefault((attention, path), []).append(seconds)
                    logits[(attention, path)] = out
    rows = int(sum(len(ps) for ps in hits.passages))
    ref = logits[("sdpa", "cache off")]
    rate = matmul_rate()
    floors = path_floors(gen, questions, hits.passages, rate)
    lines = [
        SECTION,
        "",
        f"`CausalGenerator.encode` of {len(questions)} questions x 5 passages ({rows} rows; "
        f"the questions of benchmarks/decoding.py) on the default model, {args.threads} torch "
        f"threads, one process; median seconds of {args.rounds} alternating rounds after a "
        "warm-up. *cold*: every passage evicted, the template prefix kept; *warm*: every "
        "passage cached. Logits against transformers' SDPA with the cache off: the largest "
        "absolute difference. Floor: the path's FLOPs at the matmul rate measured in the same "
        f"process ({rate / 1e9:.0f} GFLOP/s); tokens: those each path runs, all rows.",
        "",
        "| path | tokens run | transformers' SDPA (s) | grouped SDPA (s) | ratio | floor (s) | "
        "grouped / floor | max abs logit difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in PATHS:
        a = statistics.median(times[("sdpa", path)])
        b = statistics.median(times[(GROUPED_SDPA, path)])
        diff = max((logits[(att, path)] - ref).abs().max().item()
                   for att in ("sdpa", GROUPED_SDPA))
        tokens, floor = floors[path]
        lines.append(f"| {path} | {tokens:,} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {floor:.2f} | "
                     f"{b / floor:.2f}x | {diff:.1e} |")
    lines += ["", *provenance("prefill.py", load_before)]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", section)


def path_floors(gen, questions, passages, rate: float) -> dict[str, tuple[int, float]]:
    """Per path: the tokens it runs (all rows) and their FLOPs at ``rate``. Cache off and cold
    run every row's passage and question over the template prefix, warm only the question over
    the prefix and passage."""
    gen.set_passage_cache(2**20)  # for the rows' spans only
    inputs = gen.build_inputs(questions, passages)
    cost = ForwardCost(gen.model)
    out = {}
    for path in PATHS:
        tokens, flops = 0, 0.0
        for mask, span in zip(inputs.attention_mask, inputs.spans, strict=True):
            past = span.head if path == "warm" else span.prefix
            new = int(mask.sum()) - past
            tokens += new
            flops += cost.flops(1, new, past, 1)
        out[path] = (tokens, flops / rate)
    gen.set_passage_cache(0)
    return out


if __name__ == "__main__":
    main()
