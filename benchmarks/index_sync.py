"""Index sync against a full rebuild: one edited file in a folder of ``--docs`` documents.

1. A folder of ``--docs`` Markdown files (default 10,000), one per document of the default corpus
   (English Wikipedia lead sections: ``# Title`` then the text; realistic lengths, 1-3 passages
   each), or generated sentences when the default corpus is not installed.
2. ``build_index`` of the folder with the default encoder (all-MiniLM-L6-v2), the default
   chunking, ``--kind`` (default flat), as ``margin index build --corpus FOLDER`` does.
3. ``--rounds`` times (default 3): one file in the middle of the folder gets a sentence more, then
   ``sync_index`` (``margin index sync``) is timed. Also timed: a sync with nothing changed
   (walking the folder and comparing sizes and times only).
4. A full rebuild of the same folder (``build_index(..., overwrite=True)``, as
   ``margin index build --overwrite``), timed once, and its passages compared with the synced
   index's (same ids, titles, texts).

The encoder is loaded once, before any timing, for both (the CLI loads it in either case).

    .venv/bin/python benchmarks/index_sync.py [--docs 10000] [--kind flat] [--write]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from margin.errors import MarginError
from margin.retrieval.build import build_index
from margin.retrieval.encoders import load_encoder
from margin.retrieval.passages import Chunking, read_corpus
from margin.retrieval.reader import open_index
from margin.retrieval.sync import reading_record, sync_index

sys.path.insert(0, str(Path(__file__).parent))
from _report import load_average, provenance, write_section  # noqa: E402

HEADING = "## Index sync against a full rebuild"
WORDS = ("river city museum bridge library mountain festival island harbour castle garden "
         "market station valley forest lake").split()


def documents(n: int) -> list[tuple[str, str]]:
    """(title, text) of the first ``n`` documents of the default corpus (its passages joined
    back), or generated sentences when it is not installed."""
    try:
        from margin.retrieval.passages import read_default

        docs: dict[str, list[str]] = {}
        for p in read_default():
            if p.title not in docs and len(docs) == n:
                break
            docs.setdefault(p.title, []).append(p.text)
        return [(title, " ".join(parts)) for title, parts in docs.items()]
    except MarginError as exc:
        print(f"the default corpus is not available ({exc}); generating sentences")
    out = []
    for i in range(n):
        sentences = [f"The {WORDS[(i + j) % len(WORDS)]} of place {i} was built in year "
                     f"{1000 + (i * 7 + j) % 1000}." for j in range(12)]
        out.append((f"Place {i}", " ".join(sentences)))
    return out


def write_folder(folder: Path, docs: list[tuple[str, str]]) -> list[Path]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = []
    for i, (title, text) in enumerate(docs):
        path = folder / f"doc-{i:05d}.md"
        path.write_text(f"# {title}\n\n{text}\n", encoding="utf-8")
        paths.append(path)
    return paths


def timed(f):
    start = time.perf_counter()
    result = f()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents in the folder")
    parser.add_argument("--kind", default="flat", help="flat, hnsw, ivfpq, hnswsq or bm25")
    parser.add_argument("--rounds", type=int, default=3, help="edit-and-sync rounds")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/margin-index-sync"))
    parser.add_argument("--write", action="store_true", help="put the section in BENCHMARKS.md")
    args = parser.parse_args()
    load_before = load_average()
    folder, index, rebuilt = args.dir / "notes", args.dir / "index", args.dir / "rebuilt"
    docs = documents(args.docs)
    paths = write_folder(folder, docs)
    encoder = None if args.kind == "bm25" else load_encoder("default", role="passage")

    def build(out: Path):
        corpus = read_corpus(folder)
        return build_index(corpus, encoder, out, kind=args.kind, overwrite=True, progress=False,
                           document_folders=reading_record(folder, Chunking(), None))

    build_s, manifest = timed(lambda: build(index))
    passages = manifest.passages
    print(f"built {passages} passages from {len(paths)} files in {build_s:.1f} s")
    syncs = []
    for round_ in range(args.rounds):
        edited = paths[len(paths) // 2 + round_]
        with open(edited, "a", encoding="utf-8") as f:
            f.write(f"\nThis file was edited in round {round_ + 1} of the benchmark.\n")
        seconds, report = timed(lambda: sync_index(index, folder, encoder, progress=False))
        print(f"round {round_ + 1}: {report.summary()} in {seconds:.2f} s")
        syncs.append((seconds, report))
    idle_s, idle = timed(lambda: sync_index(index, folder, encoder, progress=False))
    print(f"nothing changed: {idle.summary()} in {idle_s:.2f} s")
    rebuild_s, _ = timed(lambda: build(rebuilt))
    print(f"full rebuild: {rebuild_s:.1f} s")
    key = lambda p: (p.id, p.title, p.text)  # noqa: E731
    synced, fresh = open_index(index).store, open_index(rebuilt).store
    same = sorted(map(key, synced.get(range(len(synced))))) == sorted(
        map(key, fresh.get(range(len(fresh)))))
    print(f"synced index equals the rebuild, passage for passage: {same}")

    sync_s = statistics.median(s for s, _ in syncs)
    encoded = [r.encoded for _, r in syncs]
    section = "\n".join([
        HEADING,
        "",
        f"A folder of {len(paths):,} Markdown files (the default corpus's Wikipedia lead "
        f"sections, one per file: {passages:,} passages), indexed {args.kind} with the default "
        "encoder (all-MiniLM-L6-v2, loaded once before timing); one file in the middle of the "
        "folder gets a sentence more, then `margin index sync` (`sync_index`) against a full "
        "rebuild (`margin index build --overwrite`, `build_index(overwrite=True)`) of the same "
        "folder.",
        "",
        "| | wall time | passages encoded |",
        "|---|---|---|",
        f"| sync, 1 file edited (median of {len(syncs)}) | {sync_s:.2f} s | "
        f"{', '.join(map(str, encoded))} |",
        f"| sync, nothing changed (walk and compare) | {idle_s:.2f} s | 0 |",
        f"| full rebuild | {rebuild_s:.1f} s | {passages:,} |",
        f"| first build | {build_s:.1f} s | {passages:,} |",
        "",
        f"Sync is {rebuild_s / sync_s:.0f}x faster than the rebuild; the synced index holds the "
        f"same passages as the rebuild: {'yes' if same else 'NO'}. With the default shard size "
        "(100,000 passages) the whole folder is one shard, so each sync also writes that shard "
        "again, the other passages' text and vectors copied, not encoded (docs/documents.md).",
        "",
        *provenance("index_sync.py", load_before),
    ])
    print()
    print(section)
    if args.write:
        write_section(Path(__file__).parent.parent / "BENCHMARKS.md", section)


if __name__ == "__main__":
    main()
