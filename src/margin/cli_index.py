"""``margin index ...``: build, extend, refresh and verify passage indexes.

Apart from margin.cli for its size (tests/test_layout.py: no module over 600 lines); margin.cli
registers the group: ``app.add_typer(index_app, name="index")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from margin.cli_options import (
    KINDS,
    ChunkOverlap,
    ChunkWords,
    Device,
    Glob,
    Verbose,
    check_at_least,
    check_choice,
)
from margin.errors import MarginError

index_app = typer.Typer(help="Build and extend passage indexes.", no_args_is_help=True)


@index_app.command("build")
def index_build(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the index to.")],
    corpus: Annotated[str, typer.Option(
        help="A folder of documents, JSONL, DPR psgs_w100 TSV, Parquet, or 'default'.")
    ] = "default",
    encoder: Annotated[
        str, typer.Option(help="Passage encoder: 'default', a model directory or hub name.")
    ] = "default",
    kind: Annotated[str, typer.Option(help="flat, hnsw, ivfpq, hnswsq or bm25.")] = "flat",
    shard_size: Annotated[int, typer.Option(help="Passages per shard (unit of resumption).")] = (
        100_000
    ),
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index at --out.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Encode the shards on Ray workers.")] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join ('auto', ray://...); default: local.")
    ] = None,
    ray_workers: Annotated[
        int | None, typer.Option(help="Encoder copies on Ray (default: one per CPU).")
    ] = None,
    device: Device = "auto",
    chunk_words: ChunkWords = 100,
    chunk_overlap: ChunkOverlap = 0,
    glob: Glob = None,
    verbose: Verbose = False,
) -> None:
    """Build an index; run it again after an interruption to resume."""
    from margin.devices import resolve_device
    from margin.retrieval.build import build_index
    from margin.retrieval.documents import skipped_report
    from margin.retrieval.encoders import load_encoder
    from margin.retrieval.passages import Chunking, read_corpus

    check_choice("kind", kind, KINDS)
    check_at_least("--ray-workers", ray_workers)  # 0 is not "one per CPU" (unset is)
    skipped: list = []
    passages = read_corpus(corpus, Chunking(chunk_words, chunk_overlap), glob, skipped)
    where = str(resolve_device(device))  # Ray workers pick their own (a GPU if given one)
    enc = None if kind == "bm25" else load_encoder(encoder, role="passage", device=where)
    if ray and enc is not None:
        from margin.retrieval.distributed import RayConfig, build_index_ray

        manifest = build_index_ray(
            passages, enc, out, kind=kind, shard_size=shard_size, overwrite=overwrite,
            batch_size=batch_size, progress=True,
            ray_config=RayConfig(address=ray_address, workers=ray_workers), source=corpus,
        )
    else:
        from margin.retrieval.sync import reading_record

        manifest = build_index(
            passages, enc, out, kind=kind, shard_size=shard_size, overwrite=overwrite,
            batch_size=batch_size, progress=True, source=corpus,
            document_folders=reading_record(corpus, Chunking(chunk_words, chunk_overlap), glob),
        )
    typer.echo(f"indexed {manifest.passages} passages ({kind}) into {out}")
    for line in skipped_report(skipped, verbose):
        typer.echo(line)


@index_app.command("add")
def index_add(
    index: Annotated[Path, typer.Option("--index", help="Index directory to extend.")],
    corpus: Annotated[str, typer.Option(
        help="A folder of documents, JSONL, DPR TSV or Parquet of new documents.")],
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 64,
    device: Device = "auto",
    chunk_words: ChunkWords = 100,
    chunk_overlap: ChunkOverlap = 0,
    glob: Glob = None,
    verbose: Verbose = False,
) -> None:
    """Append passages to an index without re-encoding the existing ones."""
    from margin.devices import resolve_device
    from margin.retrieval.build import add_to_index
    from margin.retrieval.documents import skipped_report
    from margin.retrieval.encoders import load_encoder_from_spec
    from margin.retrieval.passages import Chunking, read_corpus
    from margin.retrieval.reader import open_index
    from margin.retrieval.sync import reading_record

    skipped: list = []
    chunking = Chunking(chunk_words, chunk_overlap)
    passages = read_corpus(corpus, chunking, glob, skipped)
    where = str(resolve_device(device))
    manifest = open_index(index).manifest
    enc = None if manifest.encoder is None else load_encoder_from_spec(
        manifest.encoder["spec"], device=where)
    new = add_to_index(index, passages, enc, batch_size=batch_size, progress=True,
                       document_folders=reading_record(corpus, chunking, glob))
    typer.echo(f"{index} now holds {new.passages} passages (+{new.passages - manifest.passages})")
    for line in skipped_report(skipped, verbose):
        typer.echo(line)


@index_app.command("sync")
def index_sync(
    index: Annotated[Path, typer.Option("--index", help="Index directory to bring in step.")],
    corpus: Annotated[Path | None, typer.Option(
        help="The folder of documents (default: the one folder the index was built from).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 64,
    device: Device = "auto",
    chunk_words: Annotated[int | None, typer.Option(
        help="Most words in a passage (default: as the index was built).")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(
        help="Words a passage repeats from the one before (default: as built).")] = None,
    glob: Annotated[str | None, typer.Option(
        help="Which files of the folder, e.g. '*.md' (default: as built).")] = None,
    verbose: Verbose = False,
) -> None:
    """Add new files, re-encode changed ones, remove deleted ones; the rest is not re-encoded."""
    from margin.retrieval.documents import skipped_report
    from margin.retrieval.sync import sync_index

    report = sync_index(
        index, corpus, chunk_words=chunk_words, chunk_overlap=chunk_overlap, glob=glob,
        batch_size=batch_size, device=device,
    )
    typer.echo(report.summary())
    for line in skipped_report(report.skipped, verbose):
        typer.echo(line)


@index_app.command("remove")
def index_remove(
    index: Annotated[Path, typer.Option("--index", help="Index directory to remove from.")],
    source: Annotated[str | None, typer.Option(
        help="The document's path as search results show it (or its absolute path).")] = None,
    id: Annotated[str | None, typer.Option(
        "--id", help="A passage id, or a document id whose passages are ID-1, ID-2, ...")
    ] = None,
) -> None:
    """Remove one document's passages (no re-encoding; see docs/documents.md for the cost)."""
    from margin.retrieval.sync import remove_document

    removed, manifest = remove_document(index, source, id)
    typer.echo(f"removed {removed} passages from {index} ({manifest.passages} left)")


@index_app.command("refresh")
def index_refresh(
    index: Annotated[Path, typer.Option("--index", help="Index directory to re-encode.")],
    encoder: Annotated[str, typer.Option(help="New passage encoder: a directory or 'default'.")],
    out: Annotated[Path, typer.Option("--out", help="New directory for the re-encoded index.")],
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 64,
    device: Device = "auto",
) -> None:
    """Re-encode an index's passages with a changed passage encoder, into a new index."""
    from margin.retrieval.refresh import refresh_index

    new = refresh_index(index, encoder, out, batch_size=batch_size, device=device)
    typer.echo(f"re-encoded {new.passages} passages ({new.kind}) into {out}")


@index_app.command("verify")
def index_verify(
    index: Annotated[Path, typer.Option("--index", help="Index directory to check.")],
    encoder: Annotated[bool, typer.Option(
        help="Also load the index's encoder and compare its weights' fingerprint.")] = True,
) -> None:
    """Check every file's sha256, counts, dimensions and the encoder; one line per problem."""
    from margin.retrieval.reader import verify_index

    problems = verify_index(index, encoder=encoder)
    if problems:  # one line each, the last as the command's error (and its exit code)
        for problem in problems[:-1]:
            typer.echo(f"margin: error: {problem}", err=True)
        raise MarginError(problems[-1])
    typer.echo(f"{index}: every check passed")


@index_app.command("info")
def index_info(
    index: Annotated[str, typer.Option("--index", help="Index directory, or 'default'.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, stable keys.")] = False,
    verify: Annotated[bool, typer.Option(
        help="Hash every file against its sha256 (about 2 s per GB); --no-verify compares sizes "
             "only.")] = True,
) -> None:
    """Kind, passages, documents, encoder, sizes, dates, corpus and checksums of an index."""
    import json

    from margin.retrieval.info import describe_index, format_info

    directory = Path(index)
    if index == "default":
        from margin.retrieval.retriever import default_index_dir

        directory = default_index_dir()
        if not (directory / "manifest.json").is_file():
            raise MarginError(f"the default index is not built yet ({directory}); the first "
                              "`margin search` or `margin ask` builds it")
    info = describe_index(directory, verify=verify)
    if as_json:
        typer.echo(json.dumps(info.to_json(), ensure_ascii=False))
    else:
        for line in format_info(info):
            typer.echo(line)
