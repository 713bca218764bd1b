"""``margin train-retriever``: the command-line shell over margin.training.contrastive.

Apart from margin.cli only for its size (tests/test_layout.py: no module over 600 lines);
margin.cli registers it: ``app.command("train-retriever")(train_retriever)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from margin.devices import DEVICE_HELP


def train_retriever(
    train_files: Annotated[list[Path], typer.Option(
        "--train", help="Training data file; repeat for several (taken in turn).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: log, encoders, state.")],
    index: Annotated[str, typer.Option(help="Dense index directory, or 'default'.")] = "default",
    dev: Annotated[Path | None, typer.Option(
        help="Dev data; answer recall@1/5/20 logged, best recall@5 kept.")] = None,
    query_encoder: Annotated[str | None, typer.Option(
        help="Question encoder to start from (default: the index's; DPR: name it).")] = None,
    bm25_index: Annotated[str | None, typer.Option(
        help="BM25 index of the same passages for mining (default index: built).")] = None,
    data_format: Annotated[str, typer.Option("--format", help="auto, dpr-tsv, kilt, ...")] = "auto",
    heldout: Annotated[int, typer.Option(help="Leading examples per file left out.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Training examples per file.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: --epochs).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the mined questions.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Questions per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-5,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    hard_negatives: Annotated[int, typer.Option(help="Hard negatives per question.")] = 1,
    mine_depth: Annotated[int, typer.Option(
        help="Candidates per retriever (dense, BM25) searched for positives.")] = 100,
    positives: Annotated[str, typer.Option(
        help="Each question's positive: interleaved (the first passage holding an answer among "
             "the dense and BM25 candidates, rank by rank) or bm25 (DPR's rule: BM25's first "
             "such passage; questions with none skipped; needs BM25).")] = "interleaved",
    passage_encoder: Annotated[str, typer.Option(
        help="frozen (the index's vectors) or train (re-encoded with gradient).")] = "frozen",
    scale: Annotated[float | None, typer.Option(
        help="Score scale s (default: 20 for unit-norm encoders, else 1).")] = None,
    refresh_every: Annotated[int, typer.Option(
        help="With --passage-encoder train: steps between background index refreshes.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Steps between dev evaluations (0: end).")] = 0,
    eval_limit: Annotated[int | None, typer.Option(help="Dev questions evaluated.")] = None,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: end).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for data order and dropout.")] = 0,
    max_minutes: Annotated[float | None, typer.Option(
        help="Time budget of this call, loading and mining included: fewer steps if --steps / "
             "--epochs would not fit (default none).")] = None,
    device: Annotated[str, typer.Option(help="Where the encoders run: " + DEVICE_HELP)] = "auto",
) -> None:
    """Train the retriever with DPR's contrastive loss on answer-bearing passages."""
    from margin.evaluation.examples import read_examples
    from margin.training.contrastive import RetrieverTrainConfig
    from margin.training.contrastive import train_retriever as run
    from margin.training.recipe import interleave
    from margin.training.schedule import said_cut

    config = RetrieverTrainConfig(
        steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup,
        hard_negatives=hard_negatives, mine_depth=mine_depth, positives=positives,
        passage_encoder=passage_encoder, scale=scale, refresh_every=refresh_every,
        eval_every=eval_every, eval_limit=eval_limit,
        save_every=save_every, seed=seed, device=device, max_minutes=max_minutes,
    )
    most = None if limit is None else heldout + limit
    sets = [read_examples(f, data_format, limit=most)[heldout:] for f in train_files]
    dev_set = read_examples(dev, data_format) if dev is not None else None
    result = run(interleave(*sets), out, config, index=index, dev=dev_set, resume=resume,
                 query_encoder=query_encoder, bm25_index=bm25_index)
    best = "" if result.best_recall is None else (
        f", best dev recall@5 {result.best_recall['recall@5']:.3f} at step {result.best_step}")
    steps = (said_cut(result.steps, result.planned, config.max_minutes)
             if result.steps < result.planned else f"{result.steps} steps")
    typer.echo(f"trained {steps} on {result.questions} questions ({result.skipped} "
               f"without a passage holding an answer, skipped) in {result.wall_s:.0f} s, loss "
               f"{result.loss:.3f}{best}; question encoder in {result.question_encoder}")
    if result.passage_encoder is not None:
        typer.echo(f"passage encoder in {result.passage_encoder}: build its index with `margin "
                   f"index build --encoder {result.passage_encoder}`")
