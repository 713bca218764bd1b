"""Fine-tuning RAG end to end, as the paper does (Lewis et al., 2020, Sec. 2.4 and App. C).

The objective is the negative marginal log-likelihood of each target, Σ_j −log p(y_j|x_j), with
the retrieved passage z summed out over the top k (RAG.loss, margin.marginalize). There is no
supervision on which passage to retrieve. What learns:

- the generator p_theta (all its weights, or LoRA adapters with ``lora=True``),
- the question encoder q(x), through the document prior p(z|x) = softmax_z(s · d(z)ᵀq(x)),
  recomputed in torch from the passage vectors the index returns.

The passage encoder d(z) and the index stay frozen, as in the paper: re-indexing is costly (with
``passage_encoder="train"`` d(z) learns too and the index is re-encoded as it goes:
margin.training.end2end). Retrieval runs outside autograd, a batch at a time. When the question
encoder is frozen (``freeze_retriever``, the paper's "frozen retriever" ablation, Table 6) or
retrieval is BM25, the top-k never changes, so it is computed once for the whole training set and
reused every epoch.

A run writes to its output directory::

    OUT/log.jsonl   one JSON object per logged step, dev evaluation and run end
    OUT/last/       the latest model checkpoint (margin format: ``margin ask --model OUT/last``)
    OUT/best/       the checkpoint with the best dev exact match (when dev data is given)
    OUT/state/      what ``--resume`` needs (margin.checkpoint): weights, optimizer, RNGs, position
    OUT/refresh/    with a trained passage encoder: its snapshots and the re-encoded indexes

Example::

    rag = RAG.load("default", "default")
    examples = read_examples("nq-train.tsv")
    train(rag, examples, "runs/nq", TrainConfig(k=5, steps=200, lora=True))

This module is the loop and what it writes; beside it: the settings (margin.training.config), the
run's steps, learning rates and batches (margin.training.schedule), mixed precision
(margin.training.precision), several processes (margin.training.data_parallel) and the
``margin finetune`` recipe (margin.training.recipe).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from margin._io import check_out_dir
from margin.checkpoint import (
    load_state,
    read_state_record,
    save_state,
    trainable_tensors,
)
from margin.devices import resolve_device
from margin.errors import MarginError, require
from margin.evaluation.examples import Example
from margin.evaluation.metrics import exact_match
from margin.rag import RAG
from margin.retrieval.encoders import Encoder
from margin.retrieval.retriever import Retrieved, ensure_default_bm25_index
from margin.training.config import TrainConfig
from margin.training.data_parallel import (
    SINGLE,
    World,
    barrier,
    init_world,
    sum_gradients,
    sum_value,
    with_ray_retrieval,
)
from margin.training.end2end import PassageTower, load_passage_encoder, save_with_index
from margin.training.precision import FrozenCasts, autocast_dtype
from margin.training.schedule import (
    TimeBudget,
    lr_factor,
    micro_batches,
    pick_target,
    total_steps,
)

# Settings that may change between an interrupted run and its --resume (the rest must not).
_RESUMABLE_CHANGES = ("eval_every", "save_every", "log_every", "eval_limit", "eval_batch_size",
                      "device", "max_minutes")
_clock = time.perf_counter  # the training's clock (a test drives its own)


@dataclass
class TrainResult:
    """What a run did."""

    steps: int  # optimizer steps taken in total (resumed runs included)
    loss: float  # mean training loss over the last logged window
    best_dev_em: float | None  # best dev exact match seen (None without dev data)
    best_step: int | None  # the step of that checkpoint
    wall_s: float  # seconds this call ran
    out: Path  # the output directory
    planned: int = 0  # steps asked for (more than ``steps`` when a time budget cut the run)


# ----------------------------------------------------------------------------- the top-k


class TopK:
    """Top-k retrieval for training questions: cached once when it cannot change, else live."""

    def __init__(self, rag: RAG, questions: Sequence[str], k: int, cached: bool, batch: int):
        self.rag, self.questions, self.k = rag, list(questions), k
        self.cache: Retrieved | None = None
        if cached:
            parts = [
                rag.retrieve(self.questions[i : i + batch], k)
                for i in range(0, len(self.questions), batch)
            ]
            self.cache = Retrieved(
                passages=[ps for part in parts for ps in part.passages],
                scores=np.concatenate([part.scores for part in parts]),  # (n, k)
                rows=np.concatenate([part.rows for part in parts]),  # (n, k)
                vectors=None,  # frozen q: the prior is the softmax of the cached scores
            )

    def __call__(self, rows: np.ndarray) -> Retrieved:
        if self.cache is None:  # the question encoder moves: retrieve with its current weights
            return self.rag.retrieve([self.questions[i] for i in rows], self.k)
        c = self.cache
        return Retrieved([c.passages[i] for i in rows], c.scores[rows], c.rows[rows], None)


# ----------------------------------------------------------------------------- setting up


@dataclass
class _Parts:
    """What the loop holds besides the RAG."""

    modules: dict[str, torch.nn.Module]  # "generator", "question_encoder", "passage_encoder"
    params: dict[str, torch.nn.Parameter]  # their trainable parameters, by name
    peft_model: Any  # the LoRA wrapper of the generator, or None
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    casts: FrozenCasts | None = None  # LoRA's frozen weights kept in `dtype` too
    passage_encoder: Encoder | None = None  # d(z), when it trains (margin.training.end2end)


def prepare(rag: RAG, config: TrainConfig) -> _Parts:
    """Freeze what must not learn, add LoRA, choose device and precision; seed everything."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    device = resolve_device(config.device)
    gen_model = rag.generator.model
    encoder = rag.question_encoder
    dense = rag.retriever is None or rag.retriever.kind != "bm25"
    learn_q = not config.freeze_retriever and encoder is not None and dense
    learn_g = not config.freeze_generator
    if not (learn_q or learn_g):
        raise MarginError(
            "nothing to train: the generator is frozen and the retriever is frozen or BM25; "
            "drop --freeze-generator or --freeze-retriever"
        )
    gen_model.to(device)
    gen_model.requires_grad_(learn_g)
    peft_model = None
    if config.lora and learn_g:
        peft = require("peft", "pip install 'margin[train]'")
        targets: Any = config.lora_targets
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lora = peft.LoraConfig(  # type: ignore[attr-defined]
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
            target_modules=targets,
        )
        # injects adapters into gen_model in place: the generator keeps calling the same object
        peft_model = peft.get_peft_model(gen_model, lora)  # type: ignore[attr-defined]
    modules: dict[str, torch.nn.Module] = {"generator": gen_model}
    if encoder is not None:
        encoder.module.to(device)
        encoder.module.requires_grad_(learn_q)
        modules["question_encoder"] = encoder.module
    passages = None
    if config.passage_encoder == "train":  # a copy of the index's own, learning from here on
        passages = load_passage_encoder(rag, str(device))
        modules["passage_encoder"] = passages.module.requires_grad_(True)
    if config.gradient_checkpointing:
        _enable_checkpointing(rag, learn_g, learn_q)
    for module in modules.values():
        module.train(any(p.requires_grad for p in module.parameters()))
    params = trainable_tensors(modules)
    dtype = autocast_dtype(config.precision, device)
    casts = FrozenCasts(gen_model, dtype) if dtype is not None and peft_model is not None else None
    return _Parts(modules, params, peft_model, device, dtype, casts, passages)


def param_groups(params: dict[str, torch.nn.Parameter], config: TrainConfig) -> list[dict]:
    """AdamW's parameter groups: one at ``lr``, or, with ``retriever_lr``, the question (and a
    trained passage) encoder's parameters in a second group at that rate (the schedule scales
    both alike)."""
    if config.retriever_lr is None:
        return [{"params": list(params.values()), "lr": config.lr}]
    towers = ("question_encoder.", "passage_encoder.")
    encoder = [p for n, p in params.items() if n.startswith(towers)]
    rest = [p for n, p in params.items() if not n.startswith(towers)]
    groups = [{"params": rest, "lr": config.lr}, {"params": encoder, "lr": config.retriever_lr}]
    return [g for g in groups if g["params"]]


def _enable_checkpointing(rag: RAG, learn_g: bool, learn_q: bool) -> None:
    from margin.generation.causal import CausalGenerator

    if learn_g:
        if isinstance(rag.generator, CausalGenerator):
            raise MarginError(
                "gradient checkpointing drops the KV cache a causal generator scores with; "
                "use --lora or a smaller --k/--batch-size instead"
            )
        rag.generator.model.gradient_checkpointing_enable()  # type: ignore[operator]
    if learn_q:
        inner = getattr(rag.question_encoder, "module", None)
        model = inner[0].auto_model if hasattr(inner, "__getitem__") else inner  # type: ignore[index]
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    rag: RAG, examples: Sequence[Example], k: int, mode: str, batch_size: int = 8
) -> float:
    """Exact match of greedy answers over ``examples`` (SQuAD-normalised, any gold answer)."""
    if not examples:
        return 0.0
    hits = 0
    modes = [m for m in (getattr(rag.generator, "model", None),
                         getattr(rag.question_encoder, "module", None)) if m is not None]
    was = [m.training for m in modes]
    for m in modes:
        m.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = examples[i : i + batch_size]
                answers = rag.ask([e.input for e in batch], k=k, mode=mode, decoding="greedy")
                hits += sum(exact_match(a.answer, e.answers) for a, e in zip(answers, batch,
                                                                              strict=True))
    finally:
        for m, training in zip(modes, was, strict=True):
            m.train(training)
    return hits / len(examples)


# ----------------------------------------------------------------------------- the loop


def train(
    rag: RAG,
    examples: Sequence[Example],
    out: str | Path,
    config: TrainConfig | None = None,
    dev: Sequence[Example] | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str = "",
    on_step: Callable[[dict[str, Any]], None] | None = None,
    world: World = SINGLE,
) -> TrainResult:
    """Fine-tune ``rag`` on ``examples``; write logs and checkpoints under ``out``.

    ``resume`` continues from ``out/state`` (same model, data and settings); ``model_name``
    records what was loaded so a resume with another model is refused. ``on_step`` receives each
    step's log record (after any save), e.g. to stop a run early. ``world``: this process's
    place among data-parallel processes (margin.training.data_parallel); each takes its share of
    every micro-batch, the gradients are summed, and rank 0 alone writes and evaluates.
    """
    config = config or TrainConfig()
    out = Path(out)
    if not examples:
        raise MarginError("no training examples; give a non-empty --train file")
    if world.size > 1 and resolve_device(config.device).index is not None:
        raise MarginError(
            f"--device {config.device} would put all {world.size} processes on one GPU; each "
            "takes its own (LOCAL_RANK) with --device auto or cuda"
        )
    if world.size > 1 and config.passage_encoder == "train":
        raise MarginError("--passage-encoder train re-encodes the index in one process; drop it "
                          "or run without torchrun")
    start_time = _clock()
    parts = prepare(rag, config)
    tower = None if parts.passage_encoder is None else PassageTower(
        parts.passage_encoder, out / "refresh", config.refresh_every, str(parts.device))
    n, total = len(examples), total_steps(len(examples), config)
    planned = total  # the length asked for; `total` is cut to fit config.max_minutes
    budget = None if config.max_minutes is None else TimeBudget(config.max_minutes)
    data_id = _data_fingerprint(examples)
    optimizer = torch.optim.AdamW(param_groups(parts.params, config),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # reads `total` when it steps: a cut run
        optimizer, lambda s: lr_factor(s, config.warmup, total)  # decays to 0 at its new end
    )
    scaler = torch.amp.GradScaler("cuda") if parts.dtype == torch.float16 else None
    step, epoch, position = 0, 0, 0
    best: tuple[float, int] | None = None
    state_dir = out / "state"
    if resume:
        if not (state_dir / "state.json").is_file():
            raise MarginError(f"{state_dir}: no training state to resume; run without --resume")
        _check_resumable(read_state_record(state_dir), config, model_name, data_id)
        record = load_state(state_dir, parts.params, optimizer, scheduler)
        step, epoch, position = record["step"], record["epoch"], record["position"]
        total = record.get("total", total)  # a run cut to a time budget keeps its length
        best = tuple(record["best"]) if record.get("best") else None  # type: ignore[assignment]
        if world.main and "log_bytes" in record:  # the lines of steps after the save are redone
            _truncate(out / "log.jsonl", record["log_bytes"])
        if tower is not None:  # on the index the run was using, its pending refresh going on
            tower.resume(rag, record)
    elif state_dir.exists():
        raise MarginError(f"{out} already holds a training run; pass --resume or a new --out")
    elif world.main and (out / "log.jsonl").exists():  # a run stopped before its first save:
        (out / "log.jsonl").unlink()  # nothing to resume, so its log would only mislead
    out.mkdir(parents=True, exist_ok=True)
    learn_q = "question_encoder" in parts.modules and any(
        p.requires_grad for p in parts.modules["question_encoder"].parameters()
    )
    topk = TopK(rag, [e.input for e in examples], config.k, cached=not learn_q and tower is None,
                batch=config.retrieval_batch_size)
    batches = micro_batches(n, config, epoch, position)
    decode_mode = "token" if config.mode == "both" else config.mode  # for dev EM and checkpoints
    bar = _progress(total, step, progress and world.main)
    window: list[float] = []
    seen, tick = 0, time.perf_counter()
    loss_value = float("nan")
    try:
        while step < total:
            if tower is not None:  # between two steps: a step never retrieves from two indexes
                _note(out, tower.before_step(rag, step))
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            with parts.casts.active() if parts.casts else nullcontext():
                for _ in range(config.grad_accum):
                    rows, epoch, position = next(batches)
                    mine = world.shard(rows)
                    seen += len(rows)
                    if not len(mine):  # a short last batch with fewer rows than processes
                        continue
                    # this process's share of the micro-batch mean: its rows' mean x its share
                    loss = _batch_loss(rag, examples, mine, epoch, topk, config, parts, tower)
                    scaled = loss * (len(mine) / len(rows)) / config.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    step_loss += scaled.item()
            sum_gradients(list(parts.params.values()), world)
            step_loss = sum_value(step_loss, world)
            if scaler:
                scaler.unscale_(optimizer)
            grads = [p for p in parts.params.values() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(
                grads, config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            )
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            window.append(step_loss)
            if budget is not None:  # before the scheduler's step: the next lr sees it
                # every process reads the same clock (the mean of theirs), so they agree on a cut
                elapsed = sum_value(_clock() - start_time, world) / world.size
                fit = budget.steps(step, elapsed, total)
                if fit < total:
                    _cut_to_budget(out, world, bar, budget, planned, fit, first=total == planned)
                    total = fit
            scheduler.step()
            record: dict[str, Any] = {"step": step, "epoch": epoch, "loss": step_loss,
                                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(norm)}
            if step % config.log_every == 0 or step == total:
                elapsed = time.perf_counter() - tick
                loss_value = sum(window) / len(window)
                record.update(mean_loss=loss_value, examples_per_s=seen / max(elapsed, 1e-9),
                              elapsed_s=_clock() - start_time)
                if world.main:
                    _append(out / "log.jsonl", record)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.3f}",
                                    ex_s=f"{seen / max(elapsed, 1e-9):.2f}")
                    bar.update(config.log_every if step % config.log_every == 0 else step - bar.n)
                window, seen, tick = [], 0, time.perf_counter()
            if tower is not None:  # a background refresh every N steps; the last one here
                _note(out, tower.after_step(rag, step, total, progress))
            evaluate_now = dev and world.main and (
                step == total or (config.eval_every and step % config.eval_every == 0)
            )
            if evaluate_now:
                assert dev is not None
                subset = list(dev)[: config.eval_limit] if config.eval_limit else list(dev)
                em = evaluate(rag, subset, config.k, decode_mode, config.eval_batch_size)
                _append(out / "log.jsonl", {"step": step, "dev_em": em, "dev_n": len(subset)})
                if best is None or em > best[0]:
                    best = (em, step)
                    save_with_index(rag, out / "best", tower, parts.peft_model, decode_mode,
                                    config.k)
            saving = step == total or (config.save_every and step % config.save_every == 0)
            if saving and world.main:
                save_with_index(rag, out / "last", tower, parts.peft_model, decode_mode, config.k)
                save_state(state_dir, parts.params, optimizer, scheduler, {
                    "step": step, "epoch": epoch, "position": position, "total": total,
                    "best": list(best) if best else None, "config": asdict(config),
                    "model": model_name, "data": data_id, "log_bytes": _size(out / "log.jsonl"),
                    **(tower.state(rag) if tower is not None else {}),
                })
                if tower is not None:
                    tower.prune(rag)
            if on_step is not None:
                on_step(record)
    finally:
        if tower is not None:  # a refresh still running is stopped
            tower.close()
    if bar is not None:
        bar.close()
    for module in parts.modules.values():
        module.eval()
    wall = _clock() - start_time
    if world.main:
        _append(out / "log.jsonl", {"done": True, "steps": step, "wall_s": wall,
                                    "best_dev_em": best[0] if best else None})
    barrier(world)  # the others return once rank 0's checkpoint is on disk
    return TrainResult(step, loss_value, best[0] if best else None, best[1] if best else None,
                       wall, out, planned)


def _cut_to_budget(out: Path, world: World, bar, budget: TimeBudget, planned: int, fit: int,
                   first: bool) -> None:
    """Say (once) and log (every time) that the run was cut to ``fit`` steps to end in time;
    margin.training.contrastive's loop says it with this too."""
    if bar is not None:
        bar.total = fit
        bar.refresh()
    if not world.main:
        return
    _append(out / "log.jsonl", {"cut_to": fit, "planned": planned, "s_per_step": budget.step_s,
                                "max_minutes": budget.minutes})
    if first:
        from tqdm.auto import tqdm

        tqdm.write(f"margin: a step takes {budget.step_s:.1f} s here, so {planned} steps would "
                   f"not end within the {budget.minutes:g} minutes left (--max-minutes): "
                   f"training {fit} steps, the learning rate decaying to 0 at the last",
                   file=sys.stderr)


def _batch_loss(
    rag: RAG, examples: Sequence[Example], rows: np.ndarray, epoch: int, topk: TopK,
    config: TrainConfig, parts: _Parts, tower: PassageTower | None = None,
) -> torch.Tensor:
    """Mean −log p(y|x) of one micro-batch (Sec. 2.4), retrieval outside autograd; with a
    trained passage encoder (``tower``) the passages' vectors are re-encoded with gradient."""
    batch = [examples[i] for i in rows]
    targets = [
        pick_target(e.answers, config.target, random.Random(f"{config.seed}:{epoch}:{i}"))
        for e, i in zip(batch, rows, strict=True)
    ]
    with torch.no_grad():
        hits = topk(rows)
    ctx = (torch.autocast(parts.device.type, dtype=parts.dtype) if parts.dtype is not None
           else nullcontext())
    with ctx:
        vectors = None if tower is None else tower.vectors(hits)  # (B, k, d)
        return rag.loss([e.input for e in batch], targets, k=config.k, mode=config.mode, hits=hits,
                        passage_vectors=vectors)


def _check_resumable(record: dict[str, Any], config: TrainConfig, model: str, data: str) -> None:
    saved = record.get("config", {})
    for f in fields(TrainConfig):
        if f.name in _RESUMABLE_CHANGES:
            continue
        if saved.get(f.name, f.default) != getattr(config, f.name):  # new fields: the default
            raise MarginError(
                f"--resume with {f.name}={getattr(config, f.name)!r} but the run used "
                f"{saved.get(f.name)!r}; resume with the original settings or use a new --out"
            )
    if record.get("model") != model:
        raise MarginError(
            f"--resume with model {model!r} but the run trained {record.get('model')!r}; "
            "resume with the original --model"
        )
    if record.get("data") != data:
        raise MarginError("--resume with other training data than the run used; give the same "
                          "--train file (and --limit)")


def _data_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input, list(e.answers)]).encode())
    return h.hexdigest()[:16]


def _note(out: Path, record: dict[str, Any] | None) -> None:
    if record is not None:
        _append(out / "log.jsonl", record)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _truncate(path: Path, size: int) -> None:
    """Cut ``path`` back to its first ``size`` bytes (a log back to what a checkpoint saw)."""
    if _size(path) > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="training", unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- from files


def run(
    train_path: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    model: str = "default",
    index: str = "default",
    dev_path: str | Path | None = None,
    retriever: str = "dense",
    data_format: str = "auto",
    task: str = "qa",
    limit: int | None = None,
    skip_bad_lines: bool = False,
    resume: bool = False,
    progress: bool = True,
    ray_retrieval: bool = False,
    ray_address: str | None = None,
) -> tuple[TrainResult, int]:
    """``margin train``: read data, load the model and index, train. Returns the result and
    the number of malformed lines skipped (``skip_bad_lines``).

    Started by torchrun, each process trains its share (margin.training.data_parallel).
    ``ray_retrieval``: search one shared copy of the index per machine, a Ray actor, instead of
    one per process (``ray_address``: the cluster to join; several processes default to
    ``"auto"``, the one ``ray start --head`` started).
    """
    from margin.evaluation.examples import read_examples_counted

    config = config or TrainConfig()
    check_out_dir(out)
    if retriever not in ("dense", "bm25"):
        raise MarginError(f"unknown retriever {retriever!r}; use 'dense' or 'bm25'")
    if ray_retrieval and retriever == "bm25":
        raise MarginError("--ray-retrieval serves dense indexes; drop it or --retriever bm25")
    if ray_address is not None and not ray_retrieval:
        raise MarginError("--ray-address is the cluster of --ray-retrieval; add --ray-retrieval "
                          "or drop --ray-address")
    examples, skipped = read_examples_counted(train_path, data_format, task, limit, skip_bad_lines)
    dev = None
    if dev_path is not None:
        dev, dev_skipped = read_examples_counted(dev_path, data_format, task, None, skip_bad_lines)
        skipped += dev_skipped
    world = init_world()
    if retriever == "bm25" and index == "default":
        index = str(ensure_default_bm25_index(progress))
    if ray_retrieval:
        address = ray_address or ("auto" if world.size > 1 else None)
        rag = with_ray_retrieval(model, index, address, world, progress)
    else:
        rag = RAG.load(model=model, index=index, progress=progress, device=config.device)
    if retriever == "bm25" and rag.retriever is not None and rag.retriever.kind != "bm25":
        raise MarginError(f"--retriever bm25 needs a BM25 index, but {index} is dense; "
                          "build one with `margin index build --kind bm25`")
    result = train(rag, examples, out, config, dev=dev, resume=resume,
                   progress=progress and world.main, model_name=f"{model}|{index}", world=world)
    return result, skipped
