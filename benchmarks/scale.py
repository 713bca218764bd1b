"""Paper-size memory: streaming ingestion and compressed indexes on 1M+ synthetic 768-d passages.

RAG's memory is 21M DPR passages, 768-d (Sec. 3); its index needed ~100 GB of RAM (36 GB
compressed). This measures what margin needs per passage, to extrapolate to 21M (docs/scale.md):

1. Ingestion: a JSONL corpus of ``n`` passages (~100 words each) is streamed through
   ``margin.retrieval.build`` (read, chunk, checksum, Arrow store, encode, ``.npy`` embedding
   shards) with a
   fast fake encoder: each passage's vector is a random centre (1,000 centres from N(0, I)) plus
   N(0, I) noise, L2-normalised (as benchmarks/retrieval_index.py, but 768-d). The resident set
   (VmRSS) is sampled every 10% of the corpus: it must stay flat as the corpus grows.
2. Indexes over those memory-mapped embeddings, each built and then served in its own process:
   IVF-PQ (optionally OPQ+IVF-PQ) and HNSW over 8-bit scalar codes, with and without exact
   re-ranking from the memory-mapped vectors. Build time; peak RSS while building; resident
   memory serving (RssAnon: the heap, i.e. the index; RssFile: pages of memory-mapped vectors
   touched by re-ranking, which the kernel can drop); queries/s (one batch, one thread);
   recall@20 against exact (flat) search, computed by brute force over the vectors.

Everything is streamed or memory-mapped: the 1M run holds no more than one 50k-vector chunk of
float32 in the benchmark process (3 GB of vectors go to disk). Run it niced; it takes ~15 min
on a busy 2-core machine for 1M vectors (HNSW-SQ on a subset, ``--hnsw-n``).

    nice -n 10 .venv/bin/python benchmarks/scale.py --n 1000000 --hnsw-n 200000 --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from _report import cpu_model, load_average, write_section

SECTION = "## Scale"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
DIM, CENTRES, SEED, K = 768, 1000, 0, 20
FILLER = " ".join(f"w{i}" for i in range(99))  # ~100 words of text per passage
# name -> IndexConfig fields; the IVF sizes follow margin's rules for n (nlist ~ sqrt(n)).
KINDS = {
    "ivfpq-m96": {"kind": "ivfpq", "pq_m": 96},
    "opq-ivfpq-m96": {"kind": "ivfpq", "pq_m": 96, "opq": True},
    "hnswsq8": {"kind": "hnswsq", "sq_bits": 8, "hnsw_m": 16},
}
# OPQ's training (50 rounds of PQ training) took >14 min for 30k vectors on the busy 2-core
# machine, so it is measured only on request (--kinds ... opq-ivfpq-m96).
DEFAULT_KINDS = ["ivfpq-m96", "hnswsq8"]
# Search-time settings tried on each built index: (nprobe or ef_search, re-rank factor).
SETTINGS = {
    "ivfpq": [(None, 1), (None, 10), (128, 10), (128, 50), (256, 100)],
    "hnswsq": [(None, 1), (None, 10), (256, 10)],
}


# ----------------------------------------------------------------------------- data


def centres() -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((CENTRES, DIM), dtype=np.float32)


def mixture(rng: np.random.Generator, n: int, c: np.ndarray) -> np.ndarray:
    """n unit vectors: a random centre plus N(0, I) noise. (n, DIM) float32."""
    x = c[rng.integers(0, len(c), n)] + rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class FakeEncoder:
    """margin's Encoder protocol at memory speed: vectors drawn from the mixture, seeded by the
    first passage number of each call (build.py encodes in fixed 2,048-passage chunks)."""

    dim = DIM
    fingerprint = "0" * 64
    spec = {"kind": "fake", "name": "mixture-768"}

    def __init__(self):
        self.c = centres()

    def encode_passages(self, passages, batch_size=64, progress=False):
        rng = np.random.default_rng([SEED, int(passages[0].id[1:])])
        return mixture(rng, len(passages), self.c)

    def encode_queries(self, texts, batch_size=64, progress=False):
        raise NotImplementedError


def write_corpus(path: Path, n: int) -> None:
    """n one-passage documents, ids p0..p{n-1}, streamed to disk."""
    with open(path, "w", encoding="utf-8") as f:
        for lo in range(0, n, 10_000):
            f.write("".join(
                json.dumps({"id": f"p{i}", "title": f"T{i}", "text": f"{FILLER} {i}"}) + "\n"
                for i in range(lo, min(n, lo + 10_000))
            ))


def rss() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    return out


# ----------------------------------------------------------------------------- children


def child_ingest(corpus: str, out: str, n: int) -> dict:
    """Stream the corpus into passage shards and embedding shards; sample RSS as it grows."""
    from margin.retrieval import build
    from margin.retrieval.passages import read_corpus

    samples = []

    def watched(passages):
        for i, p in enumerate(passages, 1):
            if i % max(1, n // 10) == 0:
                samples.append({"passages": i, **rss()})
            yield p

    start = time.perf_counter()
    _, _, work = build.prepare_build(
        corpus, FakeEncoder(), out, None, None, build.DEFAULT_SHARD_SIZE, True
    )
    shards = build._write_shards(
        work, watched(read_corpus(corpus)), FakeEncoder(), 0, build.EMPTY_CHECKSUM,
        build.DEFAULT_SHARD_SIZE, 64, False, resume=True,
    )
    return {"seconds": time.perf_counter() - start, "shards": len(shards), "samples": samples,
            "work": str(work), "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def child_build(embeddings: str, n: int, name: str, out: str) -> dict:
    import faiss

    from margin.retrieval.index import DenseIndex, Embeddings, IndexConfig

    faiss.omp_set_num_threads(1)
    paths = sorted(Path(embeddings).glob("shard-*.npy"))
    emb = Embeddings.open(paths, DIM)
    if n < len(emb):  # a prefix (HNSW on a subset)
        from margin.retrieval.sharded import _row_range

        emb = _row_range(emb, 0, n)
    start = time.perf_counter()
    index = DenseIndex.build(emb, IndexConfig(**KINDS[name]))
    seconds = time.perf_counter() - start
    index.save(out)
    return {"seconds": seconds, "config": index.config.__dict__, "file_bytes": os.path.getsize(out),
            "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def child_serve(embeddings: str, n: int, name: str, path: str, queries: str, truth: str) -> dict:
    import faiss

    from margin.retrieval.index import DenseIndex, Embeddings, IndexConfig

    faiss.omp_set_num_threads(1)
    emb = Embeddings.open(sorted(Path(embeddings).glob("shard-*.npy")), DIM)
    if n < len(emb):
        from margin.retrieval.sharded import _row_range

        emb = _row_range(emb, 0, n)
    before = rss()
    config = json.loads(Path(path + ".json").read_text())
    index = DenseIndex.load(path, emb, IndexConfig(**config), mmap=False)
    loaded = rss()
    q = np.load(queries)
    want = np.load(truth)  # (n_queries, K) exact rows
    out = {"index_anon_kib": loaded["RssAnon"] - before["RssAnon"], "settings": []}
    built = index.config
    for width, rerank in SETTINGS[built.kind]:
        if built.kind == "ivfpq":
            index.config = replace(built, nprobe=width or built.nprobe, rerank=rerank)
        else:
            index.config = replace(built, ef_search=width or built.ef_search, rerank=rerank)
        index.search(q[:10], K)  # warm-up
        start = time.perf_counter()
        found = index.search(q, K).rows
        seconds = time.perf_counter() - start
        recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, want, strict=True)])
        width = index.config.nprobe if built.kind == "ivfpq" else index.config.ef_search
        out["settings"].append({"width": width, "rerank": rerank, "qps": len(q) / seconds,
                                "recall": float(recall), **rss()})
    return out


# ----------------------------------------------------------------------------- driver


def run_child(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def exact_topk(embeddings: Path, q: np.ndarray, n: int) -> np.ndarray:
    """Brute-force top-K rows of q among the first n vectors, chunk by chunk (flat search)."""
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_r = np.full((len(q), K), -1, np.int64)
    offset = 0
    for path in sorted(embeddings.glob("shard-*.npy")):
        shard = np.load(path, mmap_mode="r")
        for lo in range(0, len(shard), 50_000):
            if offset + lo >= n:
                break
            chunk = np.asarray(shard[lo : min(len(shard), lo + 50_000, n - offset)])
            s = q @ chunk.T  # (n_queries, chunk)
            r = np.broadcast_to(np.arange(offset + lo, offset + lo + len(chunk)), s.shape)
            s, r = np.concatenate([best_s, s], 1), np.concatenate([best_r, r], 1)
            top = np.argsort(-s, axis=1)[:, :K]
            best_s, best_r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
        offset += len(shard)
    return best_r


def measure(n: int, args: argparse.Namespace, root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    print(f"[{n:,}] writing the corpus", file=sys.stderr, flush=True)
    write_corpus(corpus, n)
    print(f"[{n:,}] ingesting", file=sys.stderr, flush=True)
    ingest = run_child("ingest", str(corpus), str(root / "index"), str(n))
    print(json.dumps(ingest), file=sys.stderr, flush=True)
    corpus.unlink()
    embeddings = Path(ingest["work"]) / "embeddings"
    q = mixture(np.random.default_rng(SEED + 1), args.queries, centres())
    np.save(root / "queries.npy", q)
    result = {"n": n, "ingest": ingest, "kinds": {}}
    for name in args.kinds:
        size = min(n, args.hnsw_n) if name.startswith("hnsw") else n
        truth = root / f"truth-{size}.npy"
        if not truth.exists():
            print(f"[{n:,}] exact top-{K} of {size:,}", file=sys.stderr, flush=True)
            np.save(truth, exact_topk(embeddings, q, size))
        print(f"[{n:,}] {name} on {size:,}", file=sys.stderr, flush=True)
        path = root / f"{name}.faiss"
        built = run_child("build", str(embeddings), str(size), name, str(path))
        Path(str(path) + ".json").write_text(json.dumps(built["config"]))
        served = run_child(
            "serve", str(embeddings), str(size), name, str(path), str(root / "queries.npy"),
            str(truth),
        )
        result["kinds"][name] = {"n": size, "build": built, "serve": served}
        print(json.dumps(result["kinds"][name]), file=sys.stderr, flush=True)
        (root.parent / f"partial-{n}.json").write_text(json.dumps(result, indent=1))
        path.unlink()
    return result


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    when = datetime.date.today().isoformat()
    lines = [
        SECTION,
        "",
        f"`nice -n 10 python benchmarks/scale.py --n {' '.join(map(str, args.n))} "
        f"--hnsw-n {args.hnsw_n} --queries {args.queries}"
        + (f" --kinds {' '.join(args.kinds)}" if args.kinds != DEFAULT_KINDS else "")
        + (" --reuse" if args.reuse else "") + f"` ({when}; {cpu_model()}, "
        f"{os.cpu_count()} cores shared with other jobs, load average at the end "
        f"{load_average()}). Synthetic 768-d clustered unit vectors, a fake encoder; queries/s "
        "on one thread, one batch; recall@20 against exact search. Memory in MiB: *index* is "
        "the heap the loaded index takes (RssAnon), *mapped* the pages of memory-mapped vectors "
        "re-ranking touched (RssFile, reclaimable). See docs/scale.md for the 21M plan.",
        "",
    ]
    for r in results:  # when each size was measured (--reuse keeps earlier runs)
        run = r.get("run")
        lines.append(f"- {r['n']:,}: " + (
            f"measured {run['began']} ({', '.join(run['kinds'])}), load average "
            f"{run['load_start']} at the start, {run['load_end']} at the end" if run
            else "measured in an earlier invocation (its date and load are in the git history "
            "of this section)"))
    lines += [
        "",
        "| n | index | build s | peak RSS building MiB | index MiB | B/vector | nprobe/ef "
        "| re-rank | recall@20 | q/s | mapped MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, m in r["kinds"].items():
            b, s = m["build"], m["serve"]
            for i, st in enumerate(s["settings"]):
                head = (
                    f"| {m['n']:,} | {name} | {b['seconds']:.0f} | {b['peak_kib'] / 1024:,.0f} | "
                    f"{s['index_anon_kib'] / 1024:,.0f} | {b['file_bytes'] / m['n']:.0f} |"
                ) if i == 0 else "| | | | | | |"
                rerank = "off" if st["rerank"] == 1 else f"x{st['rerank']}"
                lines.append(
                    f"{head} {st['width']} | {rerank} | {st['recall']:.3f} | {st['qps']:,.0f} | "
                    f"{st['RssFile'] / 1024:,.0f} |"
                )
    lines += ["", "Streaming ingestion (JSONL -> passage shards + 768-d embedding shards, "
              "100k passages per shard): resident memory as the corpus grows.", "",
              "| corpus | passages read | VmRSS MiB | time s |", "|---|---|---|---|"]
    for r in results:
        ing = r["ingest"]
        for smp in ing["samples"]:
            lines.append(f"| {r['n']:,} | {smp['passages']:,} | {smp['VmRSS'] / 1024:,.0f} | |")
        lines.append(f"| {r['n']:,} | all (peak) | {ing['peak_kib'] / 1024:,.0f} | "
                     f"{ing['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        funcs = {"ingest": child_ingest, "build": child_build, "serve": child_serve}
        name, rest = sys.argv[2], sys.argv[3:]
        if name == "ingest":
            rest[2] = int(rest[2])
        else:
            rest[1] = int(rest[1])
        print(json.dumps(funcs[name](*rest)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--hnsw-n", type=int, default=200_000, help="HNSW-SQ on this prefix")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--kinds", nargs="+", default=DEFAULT_KINDS, choices=list(KINDS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/margin-scale"))
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--reuse", action="store_true",
                        help="take a size already measured (WORKDIR/results-N.json) from there")
    args = parser.parse_args()
    results = []
    for n in args.n:
        done = args.workdir / f"results-{n}.json"
        if args.reuse and done.exists():
            results.append(json.loads(done.read_text()))
            print(f"[{n:,}] reused from {done}", file=sys.stderr, flush=True)
            continue
        free = shutil.disk_usage(args.workdir.parent).free
        if free < n * DIM * 4 * 1.5:
            sys.exit(f"{args.workdir.parent}: {free / 2**30:.0f} GiB free, need "
                     f"{n * DIM * 6 / 2**30:.0f} GiB for {n:,} vectors")
        began, load_start = time.strftime("%Y-%m-%d %H:%M"), load_average()
        results.append(measure(n, args, args.workdir / str(n)))
        results[-1]["run"] = {"began": began, "load_start": load_start,
                              "load_end": load_average(), "kinds": args.kinds}
        (args.workdir / f"results-{n}.json").write_text(json.dumps(results[-1], indent=1))
        shutil.rmtree(args.workdir / str(n))
    text = markdown(results, args)
    print(text)
    if args.write:
        write_section(BENCHMARKS_MD, text)


if __name__ == "__main__":
    main()
