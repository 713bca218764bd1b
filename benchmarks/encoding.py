"""Encoding throughput: margin's encoder vs plain sentence-transformers ``encode``.

Same model (the default all-MiniLM-L6-v2), same texts (the first ``--n`` lead sections of the
default corpus, cut to 100 words, no titles so both sides see identical strings), same batch size,
same process, torch threads fixed (default 1: the development machine is a shared 2-core box, and
one thread per side keeps the comparison steady). The runs alternate between the two sides after
one warm-up each; we report median passages/s and the ratio margin / sentence-transformers.

    .venv/bin/python benchmarks/encoding.py            # print a Markdown section
    .venv/bin/python benchmarks/encoding.py --write    # also put it in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _report import load_average, provenance, write_section
from margin.assets import DEFAULT_CORPUS
from margin.retrieval.encoders import load_encoder
from margin.retrieval.passages import Passage

SECTION = "## Encoding throughput"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def corpus_texts(n: int, words: int = 100) -> list[str]:
    """The first ``n`` non-empty extracts of the default corpus, cut to ``words`` words."""
    data = json.loads(DEFAULT_CORPUS.path().read_text(encoding="utf-8"))
    texts = []
    for record in data.values():
        extract = " ".join(str(record.get("extract") or "").split()[:words])
        if extract:
            texts.append(extract)
        if len(texts) == n:
            break
    return texts


def padded_tokens(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    """Token positions a run computes when it batches ``order`` and pads to each batch's longest."""
    batches = (order[i : i + batch_size] for i in range(0, len(order), batch_size))
    return int(sum(len(b) * lengths[b].max() for b in batches))


def timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="passages to encode")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size for both sides")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--write", action="store_true", help=f"put the section in {BENCHMARKS_MD}")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = load_average()
    from sentence_transformers import SentenceTransformer

    texts = corpus_texts(args.n)
    passages = [Passage(str(i), "", t) for i, t in enumerate(texts)]
    enc = load_encoder("default", role="passage")
    st = SentenceTransformer(enc.spec["name"], device="cpu")

    def run_margin() -> np.ndarray:
        return enc.encode_passages(passages, batch_size=args.batch_size)

    def run_st() -> np.ndarray:
        return st.encode(texts, batch_size=args.batch_size, show_progress_bar=False)

    # Padding each side computes: margin sorts by token count, sentence-transformers by characters.
    ids = enc.tokenizer(texts, truncation=True, max_length=enc.max_length)["input_ids"]
    lengths = np.array([len(x) for x in ids])
    by_tokens = padded_tokens(lengths, np.argsort(-lengths, kind="stable"), args.batch_size)
    by_chars = padded_tokens(lengths, np.argsort([-len(t) for t in texts]), args.batch_size)

    # Warm-up (also the agreement check): one full pass each.
    diff = float(np.abs(run_margin() - run_st()).max())
    times: dict[str, list[tuple[float, float]]] = {"margin": [], "st": []}
    for r in range(args.runs):  # alternate which side goes first to spread drift evenly
        sides = [("margin", run_margin), ("st", run_st)]
        for side, fn in sides if r % 2 == 0 else sides[::-1]:
            times[side].append(timed(fn))
            print(f"run {r + 1} {side}: {times[side][-1][0]:.2f} s", file=sys.stderr)
    n = len(texts)
    wall = {k: n / statistics.median(t for t, _ in v) for k, v in times.items()}
    cpu = {k: n / statistics.median(c for _, c in v) for k, v in times.items()}

    def row(label: str, side: str) -> str:
        runs = ", ".join(f"{t:.1f}" for t, _ in times[side])
        return f"| {label} | {wall[side]:.1f} | {cpu[side]:.1f} | {runs} |"

    section = "\n".join([
        SECTION,
        "",
        f"Default encoder (all-MiniLM-L6-v2, 384-d) on {n:,} passages of the default corpus "
        f"(lead sections cut to 100 words, no titles), batch size {args.batch_size}, "
        f"{args.threads} torch thread(s), median of {args.runs} alternating runs after a "
        "warm-up, same process. Passages/s by wall clock and by process CPU time (steadier on a "
        "shared machine).",
        "",
        "| encoder | passages/s (wall) | passages/s (CPU) | runs, wall (s) |",
        "|---|---|---|---|",
        row("margin `encode_passages`", "margin"),
        row("sentence-transformers `encode`", "st"),
        "",
        f"Ratio margin / sentence-transformers: **{wall['margin'] / wall['st']:.2f}** wall, "
        f"{cpu['margin'] / cpu['st']:.2f} CPU (target >= 1.0). Max |difference| between the two "
        f"sides' embeddings: {diff:.1e}. Where the gain comes from: margin sorts by token count, "
        f"sentence-transformers by characters, so margin computes {by_tokens:,} token positions "
        f"and sentence-transformers {by_chars:,} for the same {int(lengths.sum()):,} real tokens.",
        "",
        *provenance("encoding.py", load_before),
    ])
    print(section)
    if args.write:
        write_section(BENCHMARKS_MD, section)
        print(f"wrote {SECTION!r} to {BENCHMARKS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
