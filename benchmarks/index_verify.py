"""What checking an index's file checksums costs: open with and without hashing, verify_index.

Picks the default of ``open_index`` (margin.retrieval.reader.VERIFY_ON_OPEN_BYTES,
docs/retrieval.md).

1. A synthetic index of ``--n`` passages (default 12,000, the default corpus's size) built by
   ``build_index``: 100-word passages of common words, random 384-d unit vectors (the default
   encoder's width), one shard, flat. Times: best and median of 5 runs, page cache warm.
2. sha256 throughput on one file of ``--big-gb`` GB (default 1.6: a 1M-passage flat
   ``index.faiss``), from which a 1M-passage index is extrapolated.

    .venv/bin/python benchmarks/index_verify.py [--n 12000] [--big-gb 1.6] [--dir /tmp/iv]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from margin.retrieval import _checksums
from margin.retrieval.build import build_index
from margin.retrieval.passages import Passage
from margin.retrieval.reader import open_index, verify_index

WORDS = "the of and in to a was is for on as by with he that at from his it an were are".split()


class RandomEncoder:
    """384-d random unit vectors: the sizes of the default encoder's, without encoding."""

    dim, fingerprint, spec = 384, "0" * 64, {"kind": "random", "name": "random-384"}

    def encode_passages(self, passages, batch_size=64, progress=False):
        x = np.random.default_rng(len(passages)).standard_normal((len(passages), 384))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(f, runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12_000)
    parser.add_argument("--big-gb", type=float, default=1.6)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/margin-index-verify"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    out = args.dir / f"idx{args.n}"
    if not (out / "manifest.json").exists():
        docs = (Passage(f"p{i}", f"Title {i}", " ".join(rng.choice(WORDS, 100)))
                for i in range(args.n))
        build_index(docs, RandomEncoder(), out, shard_size=max(args.n, 1), progress=False)
    files = open_index(out, verify=False).manifest.files or {}
    size = _checksums.total_bytes(files)
    print(f"{args.n} passages: {len(files)} files, {size / 1e6:.1f} MB")
    for label, f, runs in [
        ("open_index(verify=False)", lambda: open_index(out, verify=False), 5),
        ("open_index(verify=True)", lambda: open_index(out, verify=True), 5),
        ("verify_index(encoder=False)", lambda: verify_index(out, encoder=False), 5),
    ]:
        best, median = timed(f, runs)
        print(f"{label}: best {best * 1e3:.0f} ms, median {median * 1e3:.0f} ms")
    big = args.dir / "big.bin"
    if not big.exists():
        with open(big, "wb") as f:
            for _ in range(round(args.big_gb * 1e9 / 2**27)):
                f.write(rng.standard_normal(2**27 // 4).astype(np.float32).tobytes())
    best, median = timed(lambda: _checksums.sha256_file(big), 3)
    rate = big.stat().st_size / median
    print(f"sha256 of {big.stat().st_size / 1e9:.2f} GB: median {median:.2f} s, "
          f"{rate / 1e6:.0f} MB/s")
    per_passage = size / args.n
    print(f"1M passages (extrapolated): {per_passage * 1e6 / 1e9:.2f} GB, every sha256 "
          f"{per_passage * 1e6 / rate:.1f} s")


if __name__ == "__main__":
    main()
