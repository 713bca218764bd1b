"""`margin ask` at batch 1 with the passage KV cache (generation.passage_cache), cold and warm.

One warm process, the default model and index, the model's own k and mode (RAG-Token greedy),
each question asked alone (``rag.ask([q])``), after one warm-up question with the cache off:

- off: the cache off (``set_passage_cache(0)``): today's path;
- cold: the passages evicted before every question, the template prefix kept (as in a process
  that has answered before: every one of the k passages runs);
- first pass: one cache for the 16 questions in turn (the prefix runs once; each passage runs the
  first time it is retrieved);
- again: the same 16 questions asked again (every passage cached);
- new questions: 16 other wordings of the same questions, over the (mostly) same passages.

Answers must be identical to the cache-off answers. Prints p50/p90 seconds and the cache's hits.

    python benchmarks/ask_cache.py --passage-cache-mb 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _report import load_average, machine
from decoding import QUESTIONS

REWORDED = [
    "Who is the painter of the Mona Lisa?", "Which city is the capital of Australia?",
    "Who is the author of Pride and Prejudice?", "Which is the biggest planet in the Solar System?",
    "Who came up with the theory of relativity?", "Which is the longest river in Africa?",
    "Who was the first US president?", "What is the symbol of gold in chemistry?",
    "Where is the Taj Mahal?", "Who wrote the music of the Magic Flute?",
    "Which city is the capital of Canada?", "Who was the discoverer of penicillin?",
    "Which language do people speak in Brazil?", "Who is the author of Hamlet?",
    "Which is the highest mountain on Earth?", "What planet is called the Red Planet?",
]


def run(rag, questions: list[str], clear: bool = False) -> tuple[list[float], list[str]]:
    from margin.generation.passage_cache import is_passage

    times, answers = [], []
    for q in questions:
        if clear and rag.generator.passage_cache is not None:
            rag.generator.passage_cache.evict(is_passage)
        start = time.perf_counter()
        [a] = rag.ask([q])
        times.append(time.perf_counter() - start)
        answers.append(a.answer)
    return times, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passage-cache-mb", type=float, default=256.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from margin.rag import RAG

    rag = RAG.load(model="default", index="default", progress=False)
    gen = rag.generator
    size = int(args.passage_cache_mb * 2**20)
    print(f"machine: {machine()}; load average before {load_average()}; threads {args.threads}")
    gen.set_passage_cache(0)
    rag.ask(QUESTIONS[:1])  # warm-up
    off_t, off_a = run(rag, QUESTIONS)
    off_new_t, off_new_a = run(rag, REWORDED)
    gen.set_passage_cache(size)
    cold_t, cold_a = run(rag, QUESTIONS, clear=True)
    gen.set_passage_cache(size)
    first_t, first_a = run(rag, QUESTIONS)
    again_t, again_a = run(rag, QUESTIONS)
    before = gen.passage_cache.hits, gen.passage_cache.misses
    new_t, new_a = run(rag, REWORDED)
    hits = gen.passage_cache.hits - before[0]
    misses = gen.passage_cache.misses - before[1]
    cache = gen.passage_cache
    print(f"load average after {load_average()}; cache {cache.bytes / 2**20:.0f} MiB in "
          f"{len(cache)} entries; new questions: {hits} hits, {misses} misses")
    print("| run | p50 s | p90 s | answers identical to cache off |")
    print("|---|---:|---:|---|")
    rows = [("cache off", off_t, off_a, off_a), ("cold (passages evicted every question)", cold_t,
            cold_a, off_a), ("first pass (one cache)", first_t, first_a, off_a),
            ("same questions again", again_t, again_a, off_a),
            ("cache off, reworded questions", off_new_t, off_new_a, off_new_a),
            ("reworded questions, warm cache", new_t, new_a, off_new_a)]
    for name, t, a, ref in rows:
        p90 = sorted(t)[int(0.9 * len(t))]
        same = "yes" if a == ref else f"NO: {sum(x != y for x, y in zip(a, ref, strict=True))}"
        print(f"| {name} | {statistics.median(t):.2f} | {p90:.2f} | {same} |")


if __name__ == "__main__":
    main()
