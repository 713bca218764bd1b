"""Index search: queries/s, recall@10 against exact search, and RAM per passage, per index kind.

The paper serves 21M passages from a FAISS HNSW index on CPU (Sec. 3, App. C). This measures
margin's three dense kinds (``flat``, ``hnsw``, ``ivfpq`` with exact re-ranking from the
memory-mapped embeddings) with their default settings, through margin's own ``DenseIndex``:

1. ``--n`` synthetic 384-d unit vectors (the default encoder's width), clustered, not uniform
   noise: 1,000 centres drawn from N(0, I); each vector is a random centre plus N(0, I) noise,
   L2-normalised (cosine to its centre ~0.7, like sentence embeddings of one topic). Queries are
   fresh draws from the same mixture.
2. When the default corpus and encoder are installed: the default corpus's passages encoded with
   the default encoder (through ``build_index``), queried with "What is <title>?" questions.

Queries/s: one batch of ``--queries`` queries, k=10, median of ``--runs`` timed runs after a
warm-up. Recall@10: overlap with the flat (exact) top 10. RAM per passage: the size of the FAISS
index as serialised (its in-memory payload) over the number of passages; the embeddings used for
re-ranking stay memory-mapped on disk and are not counted.

    .venv/bin/python benchmarks/retrieval_index.py              # 1M vectors, prints Markdown
    .venv/bin/python benchmarks/retrieval_index.py --n 100000   # quicker
    .venv/bin/python benchmarks/retrieval_index.py --write      # also update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from _report import cpu_model, write_section
from margin.retrieval.index import DenseIndex, Embeddings, IndexConfig

SECTION = "## Index search"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
KINDS = ("flat", "hnsw", "ivfpq")


def clustered_vectors(n: int, dim: int, centres: np.ndarray, seed: int) -> np.ndarray:
    """n unit vectors: a random centre plus N(0, I) noise, normalised. (n, dim) float32."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):  # chunks keep the float32 peak small
        hi = min(n, lo + 100_000)
        x = centres[rng.integers(0, len(centres), hi - lo)]
        x = x + rng.standard_normal((hi - lo, dim), dtype=np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_shards(vectors: np.ndarray, root: Path, shard_size: int = 100_000) -> Embeddings:
    """Store vectors as memory-mapped .npy shards, as an index directory holds them."""
    paths = []
    for i, lo in enumerate(range(0, len(vectors), shard_size)):
        paths.append(root / f"shard-{i:05d}.npy")
        np.save(paths[-1], vectors[lo : lo + shard_size])
    return Embeddings.open(paths, vectors.shape[1])


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / t.size for f, t in zip(found, truth, strict=True)])
    )


# Search-time settings tried on the same built index, after the defaults.
VARIANTS = {
    "flat": [],
    "hnsw": [{"ef_search": 64}, {"ef_search": 256}],
    "ivfpq": [{"nprobe": 16}, {"nprobe": 32}],
}


def timed_search(index: DenseIndex, queries: np.ndarray, runs: int, k: int):
    """(median queries/s, result) of ``runs`` searches of the whole batch, after a warm-up."""
    index.search(queries[:10], k)
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = index.search(queries, k)
        times.append(time.perf_counter() - start)
    return len(queries) / statistics.median(times), result


def measure(embeddings: Embeddings, queries: np.ndarray, runs: int, k: int = 10) -> list[dict]:
    """Build each kind with default settings; time its search (defaults, then VARIANTS)."""
    rows, truth, flat_qps, flat_bytes = [], None, None, None
    for kind in KINDS:
        start = time.perf_counter()
        index = DenseIndex.build(embeddings, IndexConfig(kind=kind))
        build_s = time.perf_counter() - start
        size = len(faiss.serialize_index(index.index)) / len(embeddings)
        for i, change in enumerate([{}, *VARIANTS[kind]]):
            variant = DenseIndex(index.index, embeddings, replace(index.config, **change), False)
            qps, result = timed_search(variant, queries, runs, k)
            if kind == "flat":
                truth, flat_qps, flat_bytes = result.rows, qps, size
            rows.append(
                {
                    "kind": kind,
                    "default": i == 0,
                    "config": variant.config,
                    "build_s": build_s,
                    "qps": qps,
                    "speedup": qps / flat_qps,
                    "recall": recall_at(result.rows, truth),
                    "bytes": size,
                    "memory": size / flat_bytes,
                }
            )
            print(f"  {kind}: {rows[-1]}", file=sys.stderr, flush=True)
        del index
    return rows


def settings(config: IndexConfig) -> str:
    if config.kind == "hnsw":
        return (
            f"M={config.hnsw_m}, efConstruction={config.ef_construction}, "
            f"efSearch={config.ef_search}"
        )
    if config.kind == "ivfpq":
        return (
            f"nlist={config.nlist}, m={config.pq_m}x{config.pq_bits} bits, "
            f"nprobe={config.nprobe}, re-rank {config.rerank}k"
        )
    return "exact"


def table(rows: list[dict]) -> str:
    lines = [
        "| index | settings | build s | queries/s | vs flat | recall@10 "
        "| RAM bytes/passage | vs flat |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {settings(r['config'])}{' (default)' if r['default'] else ''} | "
            f"{r['build_s']:.1f} | {r['qps']:,.0f} | "
            f"{r['speedup']:.1f}x | {r['recall']:.3f} | {r['bytes']:,.0f} | {r['memory']:.3f} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """Are the targets met with the default settings, and else by which tried setting?"""

    def hnsw_ok(r: dict) -> bool:
        return r["recall"] >= 0.95 and r["speedup"] >= 10

    def ivf_ok(r: dict) -> bool:
        return r["recall"] >= 0.90 and r["memory"] <= 1 / 8

    lines = []
    for kind, ok, target in [
        ("hnsw", hnsw_ok, "HNSW recall@10 >= 0.95 at >= 10x flat's queries/s"),
        ("ivfpq", ivf_ok, "IVF-PQ <= 1/8 of flat's memory with recall@10 >= 0.90"),
    ]:
        tried = [r for r in rows if r["kind"] == kind]
        default, passing = tried[0], [r for r in tried if ok(r)]
        state = (
            "met with the defaults"
            if ok(default)
            else (f"met with {settings(passing[0]['config'])}" if passing else "NOT met")
        )
        lines.append(f"- Target {target}: {state}.")
    return "\n".join(lines)


def default_corpus_rows(tmp: Path, runs: int, n_queries: int) -> tuple[list[dict], int] | None:
    """Encode the default corpus with the default encoder (build_index) and measure it."""
    try:
        from margin.retrieval.build import build_index
        from margin.retrieval.encoders import load_encoder
        from margin.retrieval.passages import read_corpus
        from margin.retrieval.reader import open_index

        passage_encoder = load_encoder("default", role="passage")
        question_encoder = load_encoder("default", role="question")
    except Exception as exc:  # not installed, or the encoder module is not there yet
        print(f"skipping the default corpus: {exc}", file=sys.stderr)
        return None
    build_index("default", passage_encoder, tmp / "default", kind="flat", progress=True)
    loaded = open_index(tmp / "default")
    titles = list(dict.fromkeys(p.title for p in read_corpus("default")))
    rng = np.random.default_rng(0)
    picked = rng.choice(len(titles), size=min(n_queries, len(titles)), replace=False)
    queries = question_encoder.encode_queries([f"What is {titles[i]}?" for i in picked])
    return measure(loaded.dense.embeddings, queries, runs), len(loaded.store)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors")
    parser.add_argument("--dim", type=int, default=384, help="synthetic dimension")
    parser.add_argument("--queries", type=int, default=500, help="queries per timed batch")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--no-default", action="store_true", help="skip the default corpus")
    parser.add_argument("--write", action="store_true", help=f"put the section in {BENCHMARKS_MD}")
    args = parser.parse_args()

    command = "python benchmarks/retrieval_index.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="margin-bench-"))
    try:
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
        vectors = clustered_vectors(args.n, args.dim, centres, seed=1)  # (n, dim)
        queries = clustered_vectors(args.queries, args.dim, centres, seed=2)  # (queries, dim)
        embeddings = write_shards(vectors, tmp)
        del vectors
        print(f"synthetic: {args.n} x {args.dim}", file=sys.stderr)
        synthetic = measure(embeddings, queries, args.runs)
        default = None if args.no_default else default_corpus_rows(tmp, args.runs, args.queries)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    parts = [
        SECTION,
        "",
        f"`{command.strip()}` on {os.cpu_count()} CPU cores (nproc; {cpu_model()}), "
        f"{datetime.date.today().isoformat()}, faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} FAISS threads, load average {load:.1f} at the start "
        f"(a machine shared with other jobs). Batch of {args.queries} queries, k=10, "
        f"median of {args.runs} runs; recall@10 against flat (exact) search; RAM = serialised "
        "FAISS index / passages (IVF-PQ's re-rank reads the memory-mapped embeddings from disk).",
        "",
        f"### {args.n:,} synthetic {args.dim}-d vectors (1,000 Gaussian clusters, normalised)",
        "",
        table(synthetic),
        "",
        verdict(synthetic),
        "",
    ]
    if default is not None:
        rows, n = default
        parts += [
            f"### Default corpus: {n:,} passages, all-MiniLM-L6-v2 (384-d), "
            '"What is <title>?" queries',
            "",
            table(rows),
            "",
        ]
    section = "\n".join(parts)
    print(section)
    if args.write:
        write_section(BENCHMARKS_MD, section)
        print(f"wrote {SECTION!r} to {BENCHMARKS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
