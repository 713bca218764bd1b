"""Contrastive retriever training: the DPR objective (Karpukhin et al., 2020, Sec. 3.2).

Each question x_i of a batch of B has one positive passage p_i⁺ (distant supervision: a passage
holding a gold answer, chosen by the rule ``positives`` names, margin.training.mining) and H
hard negatives; every other question's
passages in the batch are in-batch negatives. With sim(q, p) = s · E_Q(q)ᵀE_P(p), the loss is the
negative log-likelihood of the positive among all B·(1+H) passages of the batch (DPR eq. 2):

    L(x_i) = −log  exp(sim(x_i, p_i⁺)) / Σ_j exp(sim(x_i, p_j))

:func:`contrastive_loss` is that, a pure function. A column that holds the question's answer but
is not its positive (another question's passage, the same fact) is left out of its sum rather
than pushed down (:func:`false_negatives`). ``s`` is 1 for DPR (inner products, as the paper);
unit-norm (cosine) encoders such as the default all-MiniLM-L6-v2 give scores in [-1, 1], whose
softmax would be nearly flat, so they use s = 20 (margin.model_config.DEFAULT_COSINE_SCALE, the
scale RAG's prior uses for them and sentence-transformers' MultipleNegativesRankingLoss uses).

What learns: the question encoder E_Q, in full, always; the passage encoder E_P with
``passage_encoder="train"`` (a copy of the index's encoder, passages re-encoded with gradient).
With ``"frozen"`` the passage vectors are the index's stored ones, exactly what the index
searches, and nothing is re-encoded. A trained E_P makes the index stale: with ``refresh_every``
N a snapshot of E_P is re-encoded into a new index in a background process
(margin.retrieval.refresh) every N steps, and the run swaps it in between two steps once it is
complete. Mining fresh hard negatives and dev recall use the index in use: at most N steps plus
one re-encoding old (docs/training.md).

A run writes to its output directory::

    OUT/log.jsonl          one JSON object per logged step, dev evaluation, refresh and run end
    OUT/mining-step<N>.json  the positives and hard negatives in use after step N
    OUT/last/, OUT/best/   question_encoder/ (+ passage_encoder/ when it trains), retriever.json;
                           best by dev recall@5 (when dev data is given)
    OUT/state/             what ``--resume`` needs (margin.checkpoint)
    OUT/refresh/           passage encoder snapshots and refreshed indexes

``margin search --query-encoder OUT/best/question_encoder`` uses the result on the index it was
trained against (its directory records that pairing: margin.retrieval.encoders.save_pairing);
``margin index build --encoder OUT/best/passage_encoder`` builds the index for a trained E_P.

    cfg = RetrieverTrainConfig(steps=500, batch_size=16, hard_negatives=1)
    result = train_retriever(read_examples("nq-train.tsv"), "runs/dpr", cfg, dev=dev)
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from margin._io import atomic_path, write_json_atomic
from margin.checkpoint import load_state, read_state_record, save_state, trainable_tensors
from margin.devices import resolve_device
from margin.errors import MarginError
from margin.evaluation.examples import Example
from margin.evaluation.metrics import answer_needles, has_answer, padded_normal
from margin.model_config import DEFAULT_COSINE_SCALE
from margin.retrieval.encoders import Encoder, load_encoder_from_spec, save_pairing
from margin.retrieval.reader import LoadedIndex, ensure_encoder_matches, open_index
from margin.retrieval.refresh import prune_refreshes
from margin.retrieval.retriever import Retriever, ensure_default_bm25_index, resolve_index
from margin.training.config import PASSAGE_ENCODER, check_max_minutes
from margin.training.data_parallel import SINGLE
from margin.training.mining import POSITIVES, Mined, Mining, Positives, mine, renew, search_rows
from margin.training.schedule import TimeBudget, epoch_order, lr_factor
from margin.training.train import _append, _cut_to_budget, _data_fingerprint, _size, _truncate

RECALL_KS = (1, 5, 20)  # dev answer recall@k logged; the best checkpoint is the best recall@5
# settings that may change between an interrupted run and its --resume (the rest must not)
_RESUMABLE_CHANGES = ("eval_every", "eval_limit", "save_every", "log_every", "batch_size_encode",
                      "device", "max_minutes")
_clock = time.perf_counter  # the training's clock (a test drives its own)


@dataclass
class RetrieverTrainConfig:
    """How to train the retriever; each field is a ``margin train-retriever`` flag of the same
    name (``hard_negatives``: ``--hard-negatives``), except ``weight_decay``, ``max_grad_norm``,
    ``log_every`` and ``batch_size_encode``, set from Python (tests/test_train_config.py holds
    this and the defaults to the CLI)."""

    steps: int | None = None  # optimizer steps; None: `epochs` passes over the mined questions
    epochs: int = 1  # passes over the questions with a positive, when `steps` is None
    batch_size: int = 16  # questions per step; each brings 1 positive + `hard_negatives`
    lr: float = 2e-5  # AdamW peak learning rate (DPR: 2e-5), warm-up then linear decay to 0
    warmup: int = 0  # optimizer steps of linear warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 2.0  # clip the global gradient norm (DPR: 2.0; 0: no clipping)
    hard_negatives: int = 1  # hard negatives per question (0: in-batch negatives only)
    mine_depth: int = 100  # candidates taken from each retriever (dense, BM25) when mining
    positives: Positives = "interleaved"  # "interleaved": first answer-bearing candidate of the
    # dense and BM25 rankings interleaved; "bm25": BM25's first (DPR's rule; needs BM25)
    passage_encoder: str = "frozen"  # "frozen": the index's stored vectors; "train": E_P learns
    scale: float | None = None  # s in sim = s·E_Qᵀ E_P; None: 20 for unit-norm encoders, else 1
    refresh_every: int = 0  # with a trained E_P: steps between background index refreshes
    eval_every: int = 0  # steps between dev recall evaluations (0: only at the end)
    eval_limit: int | None = None  # dev questions evaluated (None: all)
    save_every: int = 0  # steps between checkpoints and resumable states (0: only at the end)
    log_every: int = 1  # steps between log.jsonl lines and progress updates
    batch_size_encode: int = 64  # questions per batch when mining and evaluating (no gradient)
    device: str = "auto"  # where the encoders run: auto, cpu, cuda[:N]
    max_minutes: float | None = None  # a time budget for this call (loading and mining count):
    # once a few steps are timed, the run is cut to the steps that fit (never lengthened), its
    # learning rate decaying to 0 at the new end; None: no budget
    seed: int = 0  # seeds the data order and dropout

    def __post_init__(self) -> None:
        if self.passage_encoder not in PASSAGE_ENCODER:
            raise MarginError(f"unknown --passage-encoder {self.passage_encoder!r}; use "
                              "'frozen' or 'train'")
        if self.positives not in POSITIVES:
            raise MarginError(f"unknown --positives {self.positives!r}; use 'interleaved' or "
                              "'bm25'")
        for name in ("epochs", "batch_size", "mine_depth", "log_every", "batch_size_encode"):
            if getattr(self, name) < 1:
                raise MarginError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "hard_negatives", "refresh_every", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise MarginError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise MarginError(f"steps must be at least 1, got {self.steps}")
        if not 0 < self.lr < math.inf or (self.scale is not None
                                           and not 0 < self.scale < math.inf):
            raise MarginError("lr and scale must be positive and finite")
        check_max_minutes(self.max_minutes)
        if self.refresh_every and self.passage_encoder != "train":
            raise MarginError("--refresh-every re-encodes the index with a trained passage "
                              "encoder; add --passage-encoder train or drop it")
        resolve_device(self.device)  # a device this machine lacks is refused before loading


@dataclass
class RetrieverTrainResult:
    """What a run did and where its encoders are."""

    steps: int  # optimizer steps taken in total (resumed runs included)
    planned: int  # optimizer steps asked for (more than ``steps`` when a time budget cut them)
    loss: float  # mean training loss over the last logged window
    questions: int  # training questions with a positive (trained on)
    skipped: int  # training questions without one (left out)
    best_recall: dict[str, float] | None  # dev answer recall@k of the best checkpoint
    best_step: int | None  # its step
    question_encoder: Path  # OUT/best/question_encoder (OUT/last/... without dev data)
    passage_encoder: Path | None  # beside it when the passage encoder trained
    index: Path  # the index in use at the end (a refreshed one after a swap)
    refreshes: int  # refreshed indexes swapped in by this call
    wall_s: float  # seconds this call ran
    out: Path  # the output directory


# ----------------------------------------------------------------------------- the math


def contrastive_loss(
    q: torch.Tensor, p: torch.Tensor, positive: torch.Tensor, exclude: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """DPR's loss (Karpukhin et al., 2020, eq. 2), mean over the batch.

    q: (B, d) question vectors; p: (N, d) every passage of the batch (positives, hard and
    in-batch negatives); positive: (B,) the column of each question's positive; exclude: (B, N)
    True where a column is left out of a question's softmax (a false negative).
    """
    scores = scale * q @ p.T  # (B, N)
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, positive)


def batch_columns(batch: Sequence[Mined]) -> tuple[np.ndarray, np.ndarray]:
    """The passage rows of a batch, each question's positive then its hard negatives, in order:
    ``(N,)`` rows and ``(B,)`` the column of each question's positive."""
    rows: list[int] = []
    positive: list[int] = []
    for m in batch:
        positive.append(len(rows))
        rows += [m.positive, *m.negatives]
    return np.asarray(rows, dtype=np.int64), np.asarray(positive, dtype=np.int64)


def false_negatives(texts: Sequence[str], examples: Sequence[Example],
                    positive: np.ndarray) -> np.ndarray:
    """``(B, N)`` True where column j holds question i's answer but is not its positive: another
    question's passage that answers it too, which DPR's loss must not push down."""
    out = np.zeros((len(examples), len(texts)), dtype=bool)  # (B, N)
    normal = [padded_normal(text) for text in texts]  # each passage normalised once
    for i, ex in enumerate(examples):
        needles = answer_needles(ex.answers)
        for j, text in enumerate(texts):
            holds = (has_answer([text], ex.answers, ex.regex) if ex.regex
                     else any(n in normal[j] for n in needles))
            out[i, j] = j != positive[i] and holds
    return out


def default_scale(encoder: Encoder) -> float:
    """s for an encoder: 20 (DEFAULT_COSINE_SCALE) when its vectors are unit-norm, else 1."""
    return DEFAULT_COSINE_SCALE if encoder.spec.get("normalize") else 1.0


def dev_recall(encoder: Encoder, index: LoadedIndex, dev: Sequence[Example],
               ks: Sequence[int] = RECALL_KS, batch: int = 64) -> dict[str, float]:
    """Answer recall@k on ``dev``: the share of questions with a gold answer in the top k that
    ``encoder`` retrieves from ``index`` (``margin eval``'s has_answer rule)."""
    if not dev:
        return {f"recall@{k}": 0.0 for k in ks}
    rows = search_rows(index, encoder.encode_queries([e.input for e in dev], batch), max(ks))
    firsts = []
    for ex, ranked in zip(dev, rows, strict=True):
        texts = [p.text for p in index.store.get(ranked[ranked >= 0])]
        hit = [i for i, t in enumerate(texts) if has_answer([t], ex.answers, ex.regex)]
        firsts.append(hit[0] if hit else len(texts) + max(ks))
    first = np.asarray(firsts)
    return {f"recall@{k}": float((first < k).mean()) for k in ks}


# ----------------------------------------------------------------------------- the loop


def train_retriever(
    data: Sequence[Example],
    out: str | Path,
    config: RetrieverTrainConfig | None = None,
    index: str | Path = "default",
    dev: Sequence[Example] | None = None,
    progress: bool = True,
    resume: bool = False,
    query_encoder: str | Path | None = None,
    bm25_index: str | Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> RetrieverTrainResult:
    """Train the retriever of ``index`` on ``data`` with DPR's loss; write under ``out``.

    index: a dense index directory or "default". query_encoder: the question encoder to start
    from (None: the index's own encoder; a DPR index needs its question encoder named).
    bm25_index: a BM25 index of the same passages, for mining (default index: built and cached;
    another index without one: dense candidates only). resume: continue the run in ``out``.
    on_step: receives each step's log record (e.g. to stop a run).
    """
    config = config or RetrieverTrainConfig()
    out, start_time = Path(out), _clock()
    if not data:
        raise MarginError("no training examples; give a non-empty --train file")
    state_dir = out / "state"
    if resume and not (state_dir / "state.json").is_file():
        raise MarginError(f"{state_dir}: no training state to resume; run without --resume")
    if not resume and state_dir.exists():
        raise MarginError(f"{out} already holds a training run; pass --resume or a new --out")
    if config.positives == "bm25" and not _has_bm25(index, bm25_index):
        raise MarginError(f"--positives bm25 picks positives from BM25's ranking; give "
                          f"--bm25-index, a BM25 index of the passages of {index}")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    device = str(resolve_device(config.device))
    start_index = resolve_index(index, progress=progress, device=device)
    retriever = Retriever.load(start_index, query_encoder=query_encoder, progress=progress,
                               device=device)
    if retriever.index.dense is None:
        raise MarginError(f"{start_index} is a BM25 index; train a dense retriever's index")
    q_enc = retriever.encoder
    assert q_enc is not None
    built = retriever.index.manifest.encoder
    assert built is not None
    p_enc = None
    if config.passage_encoder == "train":
        p_enc = load_encoder_from_spec(dict(built["spec"], role="passage"), device=device)
        ensure_encoder_matches(retriever.index.manifest, p_enc)
    scale = config.scale or default_scale(q_enc)
    modules = {"question_encoder": q_enc.module}
    if p_enc is not None:
        modules["passage_encoder"] = p_enc.module
    for module in modules.values():
        module.requires_grad_(True).train()
    params = trainable_tensors(modules)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr,
                                  weight_decay=config.weight_decay)
    run_id = {"index": str(start_index), "index_fingerprint": built["fingerprint"],
              "query_encoder": str(query_encoder or ""), "data": _data_fingerprint(data)}
    current = retriever.index
    bm25 = _bm25(index, bm25_index, current, progress and not resume)
    if resume:
        record = read_state_record(state_dir)
        _check_resumable(record, config, run_id)
        mining = Mining.load(out / record["mining"])
    else:
        record = None
        mining = _mine(data, None, q_enc, current, bm25, config, progress)
        if not mining.questions:
            raise MarginError(
                f"none of the {len(data)} training questions has a gold answer in its top "
                f"{config.mine_depth} passages; use a corpus that holds the answers")
        out.mkdir(parents=True, exist_ok=True)
        (out / "log.jsonl").unlink(missing_ok=True)  # a run stopped before its first save
        mining.save(out / "mining-step0.json")
        _append(out / "log.jsonl", {"mined": len(mining.questions), "skipped": mining.skipped,
                                    "depth": mining.depth, "sources": list(mining.sources),
                                    "positives": mining.positives, "scale": scale})
    n = len(mining.questions)
    total = config.steps or config.epochs * -(-n // config.batch_size)
    planned = total  # the length asked for; `total` is cut to fit config.max_minutes
    budget = None if config.max_minutes is None else TimeBudget(config.max_minutes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # reads `total` when it steps: a cut run
        optimizer, lambda s: lr_factor(s, config.warmup, total))  # decays to 0 at its new end
    step, epoch, position, best, mining_file = 0, 0, 0, None, "mining-step0.json"
    if record is not None:
        load_state(state_dir, params, optimizer, scheduler)
        step, epoch, position = record["step"], record["epoch"], record["position"]
        best, mining_file = record.get("best"), record["mining"]
        total = record.get("total", total)  # a run cut to a time budget keeps its length
        if step < total:  # a finished run keeps its log as it is
            _truncate(out / "log.jsonl", record["log_bytes"])
        if record["current_index"] != str(current.path):
            current = open_index(record["current_index"])
    resumed_at = step
    refresher = _make_refresher(current.path, out / "refresh", device) if config.refresh_every \
        else None
    saving = dict(config=config, scale=scale, frozen_fp=built["fingerprint"])
    examples = list(data)
    bar = _progress(total, step, progress)
    window: list[float] = []
    loss_value, refreshes = float("nan"), 0
    try:
        while step < total:
            if refresher is not None:  # between two steps: a step never mixes two indexes
                new = refresher.poll()
                if new is not None:  # fresh hard negatives from the new index
                    current, refreshes = open_index(new), refreshes + 1
                    fresh = _mine(examples, mining, q_enc, current, bm25, config, False)
                    mining, mining_file = renew(mining, fresh), f"mining-step{step}.json"
                    mining.save(out / mining_file)
                    _append(out / "log.jsonl", {"step": step, "index": str(new)})
            order = epoch_order(n, config.seed, epoch)
            batch = [mining.questions[i] for i in order[position : position + config.batch_size]]
            position += len(batch)
            if position >= n:
                epoch, position = epoch + 1, 0
            loss = _batch_loss(batch, examples, q_enc, p_enc, current, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(
                list(params.values()),
                config.max_grad_norm if config.max_grad_norm > 0 else float("inf"))
            optimizer.step()
            step += 1
            window.append(loss.item())
            if budget is not None:  # before the scheduler's step: the next lr sees it
                fit = budget.steps(step, _clock() - start_time, total)
                if fit < total:
                    _cut_to_budget(out, SINGLE, bar, budget, planned, fit, first=total == planned)
                    total = fit
            scheduler.step()
            rec: dict[str, Any] = {"step": step, "epoch": epoch, "loss": window[-1],
                                   "lr": scheduler.get_last_lr()[0], "grad_norm": float(norm)}
            if step % config.log_every == 0 or step == total:
                loss_value = sum(window) / len(window)
                rec.update(mean_loss=loss_value, elapsed_s=_clock() - start_time)
                _append(out / "log.jsonl", rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.3f}")
                    bar.update(step - bar.n)
                window = []
            if refresher is not None and step % config.refresh_every == 0 and step < total:
                _start_refresh(refresher, p_enc, out, step)
            if dev and (step == total or (config.eval_every and step % config.eval_every == 0)):
                subset = list(dev)[: config.eval_limit] if config.eval_limit else list(dev)
                recall = dev_recall(q_enc, current, subset, batch=config.batch_size_encode)
                _append(out / "log.jsonl", {"step": step, "dev_n": len(subset),
                                            **{f"dev_{k}": v for k, v in recall.items()}})
                if best is None or recall["recall@5"] > best[0]["recall@5"]:
                    best = [recall, step]
                    _save_encoders(out / "best", q_enc, p_enc, current, step, recall, **saving)
            if step == total or (config.save_every and step % config.save_every == 0):
                _save_encoders(out / "last", q_enc, p_enc, current, step, None, **saving)
                save_state(state_dir, params, optimizer, scheduler, {
                    "step": step, "epoch": epoch, "position": position, "total": total,
                    "best": best, "config": asdict(config), **run_id, "mining": mining_file,
                    "current_index": str(current.path), "log_bytes": _size(out / "log.jsonl"),
                })
                prune_refreshes(out / "refresh", Path(current.path))
            if on_step is not None:
                on_step(rec)
    finally:
        if refresher is not None:
            refresher.close()
        if bar is not None:
            bar.close()
    for module in modules.values():
        module.eval()
    wall = _clock() - start_time
    if step > resumed_at or not _logged_done(out / "log.jsonl"):  # else: a finished run read back
        _append(out / "log.jsonl", {"done": True, "steps": step, "wall_s": wall,
                                    "best_dev_recall": best[0] if best else None})
    where = out / ("best" if best else "last")
    return RetrieverTrainResult(
        step, planned, loss_value, n, mining.skipped, best[0] if best else None,
        best[1] if best else None, where / "question_encoder",
        where / "passage_encoder" if p_enc is not None else None,
        Path(current.path), refreshes, wall, out)


def _batch_loss(batch: Sequence[Mined], examples: Sequence[Example], q_enc: Encoder,
                p_enc: Encoder | None, index: LoadedIndex, scale: float) -> torch.Tensor:
    """DPR's loss on one batch: questions embedded with gradient, passages too (trained E_P) or
    read from the index (frozen E_P)."""
    rows, positive = batch_columns(batch)  # (N,), (B,)
    asked = [examples[m.example] for m in batch]
    passages = index.store.get(rows)
    exclude = false_negatives([p.text for p in passages], asked, positive)  # (B, N)
    q = q_enc.embed_queries([e.input for e in asked])  # (B, d)
    if p_enc is None:
        assert index.dense is not None
        p = torch.from_numpy(index.dense.vectors(rows[None])[0]).to(q.device)  # (N, d)
    else:
        p = p_enc.embed_passages(passages)  # (N, d)
    return contrastive_loss(q, p, torch.from_numpy(positive).to(q.device),
                            torch.from_numpy(exclude).to(q.device), scale)


def _mine(examples: Sequence[Example], old: Mining | None, q_enc: Encoder, index: LoadedIndex,
          bm25: LoadedIndex | None, config: RetrieverTrainConfig, progress: bool) -> Mining:
    """Mine ``examples`` (only ``old``'s questions when given) against ``index`` as it is now."""
    which = list(range(len(examples))) if old is None else [m.example for m in old.questions]
    questions = [examples[i].input for i in which]
    vectors = q_enc.encode_queries(questions, config.batch_size_encode, progress)  # (n, d)
    dense = search_rows(index, vectors, config.mine_depth)
    sparse = None if bm25 is None else search_rows(bm25, questions, config.mine_depth)
    return mine(examples, dense, index.store, config.hard_negatives, sparse, which, progress,
                config.positives)


def _bm25(index: str | Path, bm25_index: str | Path | None, dense: LoadedIndex,
          progress: bool) -> LoadedIndex | None:
    """The BM25 index mining also searches: given, the default one, or (said once) none."""
    if not _has_bm25(index, bm25_index):
        if progress:
            print(f"margin: mining positives from the dense retriever only (no --bm25-index for "
                  f"{dense.path})", file=sys.stderr)
        return None
    loaded = open_index(bm25_index or ensure_default_bm25_index(progress))
    if loaded.bm25 is None or loaded.manifest.corpus_checksum != dense.manifest.corpus_checksum:
        raise MarginError(f"--bm25-index {loaded.path} is not a BM25 index of the passages of "
                          f"{dense.path}; build one with `margin index build --kind bm25` over "
                          "the same corpus")
    return loaded


def _has_bm25(index: str | Path, bm25_index: str | Path | None) -> bool:
    """Whether a run over ``index`` mines BM25 candidates too: the default index's own BM25
    index, or one given."""
    return bm25_index is not None or str(index) == "default"


def _save_encoders(where: Path, q_enc: Encoder, p_enc: Encoder | None, index: LoadedIndex,
                   step: int, recall: dict[str, float] | None, config: RetrieverTrainConfig,
                   scale: float, frozen_fp: str) -> None:
    """OUT/best or OUT/last: the encoders in their own formats and what they are, atomically.
    The question encoder is paired with the passage encoder it was trained against: the trained
    one, or the index's (``frozen_fp``)."""
    passage_fp = p_enc.fingerprint if p_enc is not None else frozen_fp
    with atomic_path(where) as tmp:
        tmp.mkdir(parents=True)
        q_enc.save(tmp / "question_encoder")
        save_pairing(tmp / "question_encoder", q_enc.fingerprint, passage_fp)
        if p_enc is not None:
            p_enc.save(tmp / "passage_encoder")
        write_json_atomic(tmp / "retriever.json", {
            "step": step, "scale": scale, "passage_encoder": config.passage_encoder,
            "positives": config.positives,
            "passage_fingerprint": passage_fp, "index": str(index.path), "dev": recall,
        })


def _start_refresh(refresher: Any, p_enc: Encoder | None, out: Path, step: int) -> None:
    """Snapshot the passage encoder (atomically) and re-encode the index with it, unless a
    refresh is still running (then the snapshot is dropped and the log says so)."""
    assert p_enc is not None
    snapshot = out / "refresh" / f"encoder-step{step}"
    with atomic_path(snapshot) as tmp:
        p_enc.save(tmp)
    if refresher.start(snapshot, step):
        _append(out / "log.jsonl", {"step": step, "refresh_started": str(snapshot)})
    else:
        shutil.rmtree(snapshot, ignore_errors=True)
        _append(out / "log.jsonl", {"step": step, "refresh_skipped": "one still running"})


def _logged_done(log: Path) -> bool:
    """Whether the last line of ``log`` is a run's end record."""
    lines = log.read_bytes().splitlines() if log.is_file() else []
    return bool(lines) and json.loads(lines[-1]).get("done") is True


def _make_refresher(index: Path, work: Path, device: str) -> Any:
    from margin.retrieval.refresh import BackgroundRefresh

    return BackgroundRefresh(Path(index), work, device=device)


def _check_resumable(record: dict[str, Any], config: RetrieverTrainConfig,
                     run_id: dict[str, str]) -> None:
    saved = record.get("config", {})
    for f in fields(RetrieverTrainConfig):
        # a setting added since the run was saved reads as its default: what the run did then
        was = saved.get(f.name, f.default)
        if f.name not in _RESUMABLE_CHANGES and was != getattr(config, f.name):
            raise MarginError(
                f"--resume with {f.name}={getattr(config, f.name)!r} but the run used "
                f"{was!r}; resume with the original settings or use a new --out")
    for key, value in run_id.items():
        if record.get(key) != value:
            what = "training data" if key == "data" else key.replace("_", " ")
            raise MarginError(f"--resume with another {what} than the run used; give the same "
                              "--train, --index and --query-encoder, or a new --out")


def _progress(total: int, done: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="training the retriever", unit="step",
                dynamic_ncols=True)
