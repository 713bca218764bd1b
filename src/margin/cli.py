"""The ``margin`` command line. Each command is a thin shell over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from margin.cli_index import index_app
from margin.cli_options import Device, ModelIndex, check_at_least, check_passage_cache_mb
from margin.cli_retriever import train_retriever
from margin.errors import MarginError

app = typer.Typer(
    name="margin",
    help="Retrieval-Augmented Generation (Lewis et al., 2020): index, search, ask.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(index_app, name="index")  # the group lives in margin.cli_index

MAX_QUERY_CHARS = 4096  # longer stdin lines are refused rather than silently truncated


@app.callback()
def _root() -> None:
    """Retrieval-Augmented Generation (Lewis et al., 2020): index, search, ask."""


# ----------------------------------------------------------------------------- search


@app.command()
def search(
    queries: Annotated[
        list[str] | None, typer.Argument(help="Queries; read from stdin if none.")
    ] = None,
    index: Annotated[str, typer.Option(help="Index directory, or 'default'.")] = "default",
    k: Annotated[int, typer.Option("--k", "-k", help="Passages per query.")] = 5,
    query_encoder: Annotated[
        str | None, typer.Option(help="Question encoder (needed for DPR context-encoder indexes).")
    ] = None,
    allow_encoder_mismatch: Annotated[bool, typer.Option(
        help="Search even with a question encoder whose weights differ from the index's.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per query.")] = False,
    device: Device = "auto",
) -> None:
    """Top-k passages for each query, with scores."""
    from margin.retrieval.retriever import Retriever

    check_at_least("--k", k)
    questions = _read_queries(queries)
    retriever = Retriever.load(index, query_encoder=query_encoder, device=device,
                               allow_encoder_mismatch=allow_encoder_mismatch)
    hits = retriever.retrieve(questions, k=k)
    for qi, question in enumerate(questions):
        passages = hits.passages[qi]
        scores = hits.scores[qi]
        if as_json:
            obj = {
                "query": question,
                "passages": [p.to_json(s) for p, s in zip(passages, scores, strict=True)],
            }
            typer.echo(json.dumps(obj, ensure_ascii=False))
            continue
        _print_hits(question, passages, scores)


def _print_hits(question, passages, scores) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{question}[/bold]")
    for rank, (p, s) in enumerate(zip(passages, scores, strict=True), 1):
        text = p.text if len(p.text) <= 200 else p.text[:200] + "..."
        console.print(f"  {rank}. [cyan]{p.title}[/cyan] ({float(s):.3f}) {text}", highlight=False)


# ----------------------------------------------------------------------------- ask

DEMO_QUESTIONS = (
    "Who painted the Mona Lisa?",
    "What is the capital of Australia?",
    "Which planet is known as the Red Planet?",
    "Who wrote the play Romeo and Juliet?",
)


@app.command()
def ask(
    questions: Annotated[
        list[str] | None, typer.Argument(help="Questions; read from stdin if none.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="'default', a margin model or a transformers RAG directory.")
    ] = "default",
    index: ModelIndex = "auto",
    k: Annotated[
        int | None, typer.Option("--k", "-k", help="Passages per question (model default: 5).")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(help="token or sequence (model default: token).")
    ] = None,
    decoding: Annotated[str, typer.Option(help="greedy, beam, thorough or fast.")] = "greedy",
    beams: Annotated[int | None, typer.Option(
        help="Beams for beam/thorough/fast decoding (model default if unset).")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Longest answer in tokens (model default if unset).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per question.")] = False,
    passage_cache_mb: Annotated[float | None, typer.Option(help="MiB of passage KV kept "
        "for later questions (causal models; default 0: off).")] = None,
    device: Device = "auto",
) -> None:
    """Answer questions with provenance: passages, priors p(z|x) and posteriors p(z|x,y)."""
    from margin.rag import RAG, decoding_method

    items = _read_queries(questions)
    for name, value in (("--k", k), ("--beams", beams), ("--max-new-tokens", max_new_tokens)):
        check_at_least(name, value)  # 0 is the user's, not "the model's default"
    if mode is not None:
        decoding_method(mode, decoding)  # reject a bad combination before loading anything
    check_passage_cache_mb(passage_cache_mb)
    rag = RAG.load(model=model, index=index, device=device)
    if passage_cache_mb is not None and hasattr(rag.generator, "set_passage_cache"):
        rag.generator.set_passage_cache(int(passage_cache_mb * 2**20))
    answers = rag.ask(
        items, k=k, mode=mode, decoding=decoding, num_beams=beams, max_new_tokens=max_new_tokens
    )
    for answer in answers:
        if as_json:
            typer.echo(json.dumps(answer.to_json(), ensure_ascii=False))
        else:
            _print_answer(answer)


@app.command()
def demo(
    k: Annotated[int, typer.Option("--k", "-k", help="Passages retrieved per question.")] = 5,
    device: Device = "auto",
) -> None:
    """Answer a few questions over the bundled Wikipedia corpus, with provenance."""
    import time

    from rich.console import Console

    from margin.rag import RAG

    check_at_least("--k", k)
    console = Console(stderr=True)
    start = time.perf_counter()
    console.print("[dim]loading the default model and index (built on first use)...[/dim]")
    rag = RAG.load(model="default", index="default", device=device)
    loaded = time.perf_counter()
    console.print(f"[dim]ready in {loaded - start:.1f} s[/dim]")
    for mode in ("token", "sequence"):
        answers = rag.ask(list(DEMO_QUESTIONS), k=k, mode=mode, decoding="greedy")
        typer.echo(f"\n=== RAG-{mode.capitalize()} (greedy, k={k}) ===")
        for answer in answers:
            _print_answer(answer)
    console.print(f"[dim]answered in {time.perf_counter() - loaded:.1f} s[/dim]")


@app.command()
def train(
    train_file: Annotated[Path, typer.Option("--train", help="Training data file.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: log, checkpoints, state.")],
    model: Annotated[str, typer.Option(help="'default' or a margin model directory.")] = "default",
    index: Annotated[str, typer.Option(help="Index directory, or 'default'.")] = "default",
    dev: Annotated[Path | None, typer.Option(help="Dev data; best exact match is kept.")] = None,
    retriever: Annotated[str, typer.Option(help="dense or bm25.")] = "dense",
    data_format: Annotated[str, typer.Option("--format", help="auto, dpr-tsv, kilt, ...")] = "auto",
    task: Annotated[str, typer.Option(help="qa, generation or fever.")] = "qa",
    limit: Annotated[int | None, typer.Option(help="First N examples only.")] = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="Skip bad lines, count them.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    mode: Annotated[str, typer.Option(
        help="token, sequence, or both (the mean of the two objectives).")] = "token",
    k: Annotated[int, typer.Option("--k", "-k", help="Passages per question.")] = 5,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: --epochs).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data when --steps is unset.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Questions per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 3e-5,
    retriever_lr: Annotated[float | None, typer.Option(
        help="The question (and passage) encoder's peak learning rate (default: --lr).")] = None,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    freeze_retriever: Annotated[bool, typer.Option(help="Freeze the question encoder.")] = False,
    freeze_generator: Annotated[bool, typer.Option(help="Keep the generator fixed.")] = False,
    passage_encoder: Annotated[str, typer.Option(
        help="frozen (the paper), or train it too, re-encoding the index.")] = "frozen",
    refresh_every: Annotated[int, typer.Option(
        help="With a trained passage encoder: steps between index refreshes (0: at the end).")
    ] = 0,
    target: Annotated[str, typer.Option(help="first answer, or sample one per epoch.")] = "first",
    lora: Annotated[bool, typer.Option(help="LoRA on the generator.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations.")] = False,
    precision: Annotated[str, typer.Option(
        help="auto (GPU: bf16 or fp16; CPU: fp32), fp32, bf16 (CPU too) or fp16 (GPU).")] = "auto",
    eval_every: Annotated[int, typer.Option(help="Steps between dev evaluations (0: end).")] = 0,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: end).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for data order, sampling and init.")] = 0,
    max_minutes: Annotated[float | None, typer.Option(
        help="Time budget: fewer steps if --steps / --epochs would not fit (default none).")
    ] = None,
    ray_retrieval: Annotated[bool, typer.Option(
        help="Search one shared index per machine, a Ray actor (needs margin[ray]).")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster for --ray-retrieval; under torchrun 'auto' (ray start --head).")] = None,
    device: Device = "auto",
) -> None:
    """Fine-tune RAG end to end (Sec. 2.4): question encoder and generator learn, index frozen
    (unless --passage-encoder train)."""
    from margin.training.config import TrainConfig
    from margin.training.schedule import said_cut
    from margin.training.train import run

    config = TrainConfig(
        mode=mode, k=k, steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
        lr=lr, retriever_lr=retriever_lr, warmup=warmup, freeze_retriever=freeze_retriever,
        freeze_generator=freeze_generator, passage_encoder=passage_encoder,
        refresh_every=refresh_every, target=target, lora=lora, lora_r=lora_r,
        gradient_checkpointing=gradient_checkpointing, precision=precision,
        eval_every=eval_every, save_every=save_every, seed=seed, device=device,
        max_minutes=max_minutes,
    )
    result, skipped = run(
        train_file, out, config, model=model, index=index, dev_path=dev, retriever=retriever,
        data_format=data_format, task=task, limit=limit, skip_bad_lines=skip_bad_lines,
        resume=resume, ray_retrieval=ray_retrieval, ray_address=ray_address,
    )
    best = "" if result.best_dev_em is None else (
        f", best dev EM {result.best_dev_em:.3f} at step {result.best_step} ({out / 'best'})"
    )
    steps = (said_cut(result.steps, result.planned, max_minutes)
             if result.steps < result.planned else f"{result.steps} steps")
    typer.echo(f"trained {steps} in {result.wall_s:.0f} s, loss {result.loss:.3f}"
               f"{best}; model in {out / 'last'}")
    if skipped:
        typer.echo(f"skipped {skipped} malformed line(s)")


app.command("train-retriever")(train_retriever)  # the command lives in margin.cli_retriever


@app.command("eval")
def eval_(
    data: Annotated[Path, typer.Option("--data", help="Examples file (QA, generation or FEVER).")],
    task: Annotated[str, typer.Option(help="qa, generation or fever.")] = "qa",
    data_format: Annotated[
        str, typer.Option("--format", help="auto, dpr-tsv, dpr-jsonl, kilt or jsonl.")
    ] = "auto",
    model: Annotated[str, typer.Option(help="'default' or a model directory.")] = "default",
    index: ModelIndex = "auto",
    bm25_index: Annotated[
        str, typer.Option(help="BM25 index for --retriever bm25 ('default': default corpus).")
    ] = "default",
    retriever: Annotated[
        str, typer.Option(help="dense, dense-frozen, bm25 or none; a comma list: ablation table.")
    ] = "dense",
    k: Annotated[
        str, typer.Option("--k", "-k", help="Passages per question; a comma list: sweep + plot.")
    ] = "5",
    mode: Annotated[
        str | None, typer.Option(help="token, sequence or both (comma); default: the model's.")
    ] = None,
    decoding: Annotated[
        str, typer.Option(help="greedy, beam, thorough, fast; a comma list compares them.")
    ] = "greedy",
    beams: Annotated[int, typer.Option(help="Beams for beam/thorough/fast decoding.")] = 4,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Longest answer in tokens (model default if unset).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="First N examples only.")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions per generation batch.")] = 8,
    out: Annotated[Path, typer.Option("--out", help="Output directory (resumable).")] = Path(
        "eval"
    ),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    regex: Annotated[bool, typer.Option(help="Gold answers are regexes (CuratedTrec).")] = False,
    device: Device = "auto",
) -> None:
    """Evaluate on a task's data: metrics.json, predictions.jsonl, report.md (resumable)."""
    from margin.evaluation.evaluate import run_eval
    from margin.evaluation.grid import EvalConfig
    from margin.evaluation.report import summary_table

    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip())
    except ValueError:
        raise MarginError(f"--k {k!r} is not a comma list of integers; e.g. --k 1,5,10") from None
    config = EvalConfig(
        task=task, data=str(data), format=data_format, model=model, index=index,
        bm25_index=bm25_index, retrievers=_comma(retriever), ks=ks,
        modes=_comma(mode) if mode else (), decodings=_comma(decoding), beams=beams,
        max_new_tokens=max_new_tokens, limit=limit, batch_size=batch_size, out=str(out),
        seed=seed, regex=regex, device=device,
    )
    results = run_eval(config)
    typer.echo(summary_table(task, results), nl=False)
    typer.echo(f"wrote {out}/ (metrics.json, predictions.jsonl, report.md)")


def _comma(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())

@app.command()
def serve(
    model: Annotated[
        str, typer.Option(help="'default', a margin model or a transformers RAG directory.")
    ] = "default",
    index: Annotated[
        list[str] | None,
        typer.Option(help="'auto', 'default', DIR or NAME=DIR; repeat for several (first active)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    index_root: Annotated[
        Path | None, typer.Option(help="Admins may register index directories under it only.")
    ] = None,
    continuous_batching: Annotated[bool, typer.Option(
        help="RAG-Token greedy requests join the running decode between steps (causal models)."
    )] = True,
    passage_cache_mb: Annotated[float | None, typer.Option(help="MiB of passage KV kept "
        "for later questions (causal models; default 1024; 0: off).")] = None,
    device: Device = "auto",
) -> None:
    """Serve the HTTP API and web page; admin endpoints need $MARGIN_ADMIN_TOKEN."""
    import os

    from margin.devices import resolve_device
    from margin.errors import require

    require("fastapi", "pip install 'margin[serve]'")
    require("uvicorn", "pip install 'margin[serve]'")
    from margin.serving.config import ADMIN_TOKEN_ENV, ServeConfig
    from margin.serving.server import serve as run

    resolve_device(device)  # refused before the banner, not after it
    check_passage_cache_mb(passage_cache_mb)
    if index_root is not None and not index_root.is_dir():  # else every registration fails
        raise MarginError(f"--index-root {index_root} is not a directory; give the folder that "
                          "holds the indexes admins may register")
    token = os.environ.get(ADMIN_TOKEN_ENV) or None
    cache = {} if passage_cache_mb is None else {"passage_cache_mb": passage_cache_mb}
    config = ServeConfig(host=host, port=port, index_root=index_root, admin_token=token,
                         device=device, continuous_batching=continuous_batching, **cache)
    run(model, index or [], config)  # says where it serves once the address is free


@app.command()
def finetune(
    data: Annotated[
        list[Path], typer.Argument(help="Dev files; their first --heldout lines are kept out.")
    ],
    name: Annotated[str, typer.Option(help="Installed model name (--model NAME).")] = "finetuned",
    model: Annotated[str, typer.Option(help="Model to start from.")] = "default",
    index: Annotated[str, typer.Option(help="Index directory, or 'default'.")] = "default",
    heldout: Annotated[int, typer.Option(help="Leading examples per file held out.")] = 500,
    limit: Annotated[int | None, typer.Option(help="Training examples per file.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (recipe default).")] = None,
    epochs: Annotated[int | None, typer.Option(
        help="Passes over every selected question, instead of the recipe's steps.")] = None,
    k: Annotated[int | None, typer.Option(
        help="Passages per question in training (recipe: 2).")] = None,
    mode: Annotated[str | None, typer.Option(
        help="Marginalisation trained: token, sequence or both (recipe: token).")] = None,
    all_questions: Annotated[bool, typer.Option(
        help="Train on every question, not only those with an answer in their passages.")] = False,
    ungrounded: Annotated[float | None, typer.Option(
        help="Share of questions with no answer in their passages (recipe: 0.125).")] = None,
    precision: Annotated[str | None, typer.Option(
        help="auto, fp32, bf16 (CPU too) or fp16 (GPU) (recipe: auto).")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="Time budget of the whole run: fewer steps if the recipe's would not fit "
             "(recipe: 55; 0: none).")] = None,
    retriever: Annotated[str, typer.Option(
        help="First train the retriever: 'train' the question and passage encoders and "
             "re-encode the index, 'question' the question encoder alone, or 'none' "
             "(recipe: train).")] = "train",
    device: Device = "auto",
) -> None:
    """Train the retriever, then fine-tune the default model over it, on training slices, and
    install the result as --name (`make finetune`)."""
    from dataclasses import replace

    from margin.training.recipe import FINETUNE_RECIPE, FINETUNE_UNGROUNDED
    from margin.training.recipe import finetune as run_finetune
    from margin.training.schedule import said_cut

    if all_questions and ungrounded is not None:
        raise MarginError("--ungrounded sets a share of the selected questions; --all-questions "
                          "trains on every one: drop one of the two")

    if steps is not None and epochs is not None:
        raise MarginError("--steps and --epochs both set the training's length: drop one of "
                          "the two")
    config = replace(FINETUNE_RECIPE, device=device)
    if steps is not None or epochs is not None:  # epochs: as many steps as the questions take
        config = replace(config, steps=steps, epochs=1 if epochs is None else epochs)
    if k is not None:
        config = replace(config, k=k)
    if mode is not None:
        config = replace(config, mode=mode)
    if precision is not None:
        config = replace(config, precision=precision)
    if max_minutes is not None:
        config = replace(config, max_minutes=max_minutes or None)
    done = run_finetune(data, name=name, config=config, model=model, index=index,
                        heldout=heldout, limit=limit, all_questions=all_questions,
                        ungrounded=FINETUNE_UNGROUNDED if ungrounded is None else ungrounded,
                        retriever=retriever)
    if done.retriever is not None:
        learned = done.retriever
        typer.echo(f"retriever: {learned.steps} steps on {learned.questions} questions with an "
                   f"answer-bearing passage ({learned.skipped} without one skipped); searching "
                   f"{done.path / 'index' if done.index else learned.index}")
    if all_questions:
        chosen = f"{done.ungrounded} questions"
    else:
        chosen = (f"{done.grounded} questions with a gold answer in their passages and "
                  f"{done.ungrounded} without")
    if done.steps < done.planned:  # each step draws a batch of the chosen questions at random
        per_step = config.batch_size * config.grad_accum
        chosen = (f"{said_cut(done.steps, done.planned, config.max_minutes)} of {per_step} "
                  f"questions, drawn from {chosen}")
    else:
        chosen = f"on {chosen}"
    typer.echo(f"trained {chosen} (the training slices hold {done.total}); "
               f"installed {done.path}; use it with --model {name}")


def _print_answer(answer) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold]Q: {answer.question}[/bold]", highlight=False)
    console.print(
        f"A: [green]{answer.answer}[/green]  (log p = {answer.logprob:.2f}, RAG-{answer.mode}, "
        f"{answer.decoding})",
        highlight=False,
    )
    for i, p in enumerate(answer.passages):
        bar = "#" * round(20 * p.posterior)
        console.print(
            f"  [{i}] prior {p.prior:4.2f} posterior {p.posterior:4.2f} {bar:<20} "
            f"[cyan]{p.title[:30]}[/cyan]",
            highlight=False,
        )
    if answer.token_docs:
        shown = " ".join(f"{t.strip()}[{z}]" for t, z in answer.token_docs if t.strip())
        console.print(f"  tokens by supporting passage: {shown}", highlight=False)


# ----------------------------------------------------------------------------- helpers


def _read_queries(queries: list[str] | None) -> list[str]:
    """Queries from the command line, else one per non-blank stdin line."""
    if queries:
        items = list(queries)
    elif sys.stdin is not None and not sys.stdin.isatty():
        try:
            items = [line.strip() for line in sys.stdin if line.strip()]
        except UnicodeDecodeError as exc:
            raise MarginError(f"stdin is not UTF-8 (byte 0x{exc.object[exc.start]:02x}); "
                              "re-encode the queries as UTF-8") from None
    else:
        items = []
    if not items:
        raise MarginError("no query given; pass it as an argument or one per line on stdin")
    for i, q in enumerate(items, 1):
        if not q.strip():
            raise MarginError(f"query {i} is blank; give a non-blank query")
        if len(q) > MAX_QUERY_CHARS:
            raise MarginError(f"query {i} is {len(q)} characters; the limit is {MAX_QUERY_CHARS}")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in q):  # undecodable bytes (surrogateescape)
            raise MarginError(f"query {i} is not UTF-8 text; re-encode it as UTF-8")
    return items


def _quiet_libraries() -> None:
    """Keep transformers' per-load progress bars and advice off the user's terminal."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: a MarginError, or a usage mistake (an unknown option, a missing or
    malformed value), becomes one line on stderr and a non-zero exit code."""
    import importlib

    # typer >= 0.2x parses with its own copy of click, whose exceptions are not click's
    usage = importlib.import_module(typer.BadParameter.__module__)
    _quiet_libraries()
    try:
        app(args=argv, prog_name="margin", standalone_mode=False)
    except MarginError as exc:
        print(f"margin: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("margin: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except usage.ClickException as exc:
        if isinstance(exc, getattr(usage, "NoArgsIsHelpError", ())):
            exc.show()  # `margin` or `margin index` alone: the help
        else:
            ctx = getattr(exc, "ctx", None)
            see = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            print(f"margin: error: {exc.format_message().rstrip('.')}{see}", file=sys.stderr)
        return exc.exit_code
    except typer.Abort:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
