"""``margin finetune``: the recipe that fine-tunes the default model into ``finetuned`` in under
an hour on a CPU, the questions it trains on, and the installed result.

The recipe has two stages, both on the training slices of development files after a held-out
head (:func:`training_slice`), interleaved (:func:`interleave`):

1. **the retriever** (:data:`FINETUNE_RETRIEVER`, :func:`learn_retrieval`): DPR's contrastive
   loss trains the question and passage encoders of the index (margin.training.contrastive), and
   the index is re-encoded with the trained passage encoder (margin.retrieval.refresh);
2. **RAG** (:data:`FINETUNE_RECIPE`, one :class:`~margin.training.config.TrainConfig`): the
   generator (LoRA) and the question encoder by the RAG loss over the new retrieval, on questions
   mostly chosen so that their passages hold an answer (:func:`select_questions`, which says why).

:func:`finetune` runs both (each resumes when run again) and installs the model under
``$MARGIN_HOME/models`` with the index it trained against when the default index will not serve
it (:func:`index_to_carry`): after stage 1, the re-encoded one. BENCHMARKS.md "Answer quality:
the fine-tuned default" and "Learned retrieval" hold what they measured.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from margin.errors import MarginError
from margin.evaluation.examples import Example
from margin.evaluation.metrics import has_answer
from margin.rag import RAG
from margin.retrieval.retriever import Retriever
from margin.training.config import TrainConfig
from margin.training.contrastive import RetrieverTrainConfig, RetrieverTrainResult, train_retriever
from margin.training.schedule import total_steps
from margin.training.train import train

FINETUNE_RETRIEVER = RetrieverTrainConfig(  # stage 1: BENCHMARKS.md "Learned retrieval", run qp
    # One epoch over the training questions with a mined positive (4,975 of the 16,594 of the
    # two development files): 311 steps of 16 questions, 21 min on a 2-core Xeon with mining,
    # then 2.5 min to re-encode the default index with the trained passage encoder. Held-out
    # answer recall@5 9.2 -> 11.6 (NQ-open), 15.2 -> 19.8 (TriviaQA).
    epochs=1, batch_size=16, lr=2e-5, hard_negatives=1, passage_encoder="train", save_every=50,
)
# What stage 1 trains: both encoders and the index re-encoded ("train"), the question encoder
# alone over the index as it is ("question"), or nothing (the RAG stage alone, as before).
RETRIEVER_STAGES = ("train", "question", "none")

FINETUNE_RECIPE = TrainConfig(  # sized for <= 60 minutes on a 2-core CPU (BENCHMARKS.md)
    # 4 x 2 micro-batches: a batch of 8 questions x k=2 holds ~9.5 GB of activations in fp32.
    # About 15 s a step on a 2-core Xeon with AMX (192 steps took 48.3 min, BENCHMARKS.md
    # "Answer quality: the fine-tuned default"): after stage 1's ~24 min, 120 steps (960
    # questions, ~30 min) fit the hour. The budget cuts the steps so that the whole command,
    # both stages and loading included, ends within 55 minutes on a slower CPU, where stage 1
    # also takes longer (fewer RAG steps are left; on an AVX2-only CPU, stage 1 alone may use
    # the budget: then `--retriever none` or a larger `--max-minutes`).
    # A checkpoint every 16 steps: an interrupted `make finetune` resumes from the last one.
    # The question encoder trains in full, at the paper's rate (3e-5); the generator's LoRA
    # adapters at 5e-4.
    k=2, steps=120, batch_size=4, grad_accum=2, lr=5e-4, retriever_lr=3e-5, warmup=4, lora=True,
    lora_r=16, lora_alpha=32, save_every=16, max_minutes=55,
)
FINETUNE_UNGROUNDED = 0.125  # share of questions without a gold answer in their passages
HELDOUT = 500  # the first lines of each development file are held out for reporting


def training_slice(path: str | Path, heldout: int = HELDOUT, limit: int | None = None,
                   skip_bad_lines: bool = False) -> list[Example]:
    """The examples of ``path`` after its first ``heldout`` (kept for evaluation), at most
    ``limit`` of them."""
    from margin.evaluation.examples import read_examples

    rows = read_examples(path, limit=None if limit is None else heldout + limit,
                         skip_bad_lines=skip_bad_lines)
    if len(rows) <= heldout:
        raise MarginError(f"{path} has {len(rows)} examples, none after the {heldout} held out; "
                          "give a larger file or a smaller --heldout")
    return rows[heldout:]


def interleave(*sets: Sequence[Example]) -> list[Example]:
    """One example from each set in turn, so a short run sees every task."""
    out: list[Example] = []
    for i in range(max(len(s) for s in sets)):
        out += [s[i] for s in sets if i < len(s)]
    return out


def select_questions(
    rag: RAG, examples: Sequence[Example], k: int, grounded: int | None = None,
    ungrounded: int = 0, batch: int = 64, progress: bool = True,
) -> tuple[list[Example], list[Example]]:
    """The first ``grounded`` examples with a gold answer in their top-``k`` passages, those
    answers listed first (the ones written verbatim in a passage before the others), and the
    first ``ungrounded`` examples without one, as they are. ``grounded=None``: every such one.

    Why: a short fine-tune can teach a small generator to read, not to memorise trivia. On a
    question whose passages lack every gold answer (about nine in ten at k = 2 on the default
    corpus), −log p(y|x) is a closed-book loss, and its gradient swamps the rest: trained on
    every question, ``make finetune`` logged 9-32 nats a step with no downward trend. Trained on
    grounded questions alone, the model learnt to read but answered less often from memory when
    the passages miss (BENCHMARKS.md "Answer quality"); a few ungrounded questions keep that
    habit. Listing the found answers first makes the "first" target one the passages hold
    (TriviaQA's first alias is often odd: "🚁" for helicopters). Retrieval is the model's own at
    the start, so the selection is the same when a run resumes. DPR's ``has_answer`` decides
    (margin.evaluation.metrics).
    """
    from tqdm.auto import tqdm

    if rag.retriever is None:
        raise MarginError("this RAG has no retriever; load it with an index")
    kept: list[Example] = []
    others: list[Example] = []
    wanted = None if grounded is None else grounded + ungrounded
    bar = tqdm(total=wanted or len(examples), desc="selecting questions", unit="question",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(examples), batch):
        part = examples[start : start + batch]
        hits = rag.retriever.retrieve([e.input for e in part], k)  # passages only, no vectors
        for ex, passages in zip(part, hits.passages, strict=True):
            texts = [p.text for p in passages]
            found = [a for a in ex.answers if has_answer(texts, [a], ex.regex)]
            if not found:
                if len(others) < ungrounded:
                    others.append(ex)
            elif grounded is None or len(kept) < grounded:
                found.sort(key=lambda a: not any(a in t for t in texts))  # stable: verbatim first
                rest = tuple(a for a in ex.answers if a not in found)
                kept.append(replace(ex, answers=(*found, *rest)))
        bar.update(len(kept) + len(others) - bar.n if wanted else len(part))
        if wanted is not None and len(kept) + len(others) >= wanted:
            break
    bar.close()
    return kept, others


@dataclass(frozen=True)
class Finetuned:
    """What :func:`finetune` installed and what it trained on."""

    path: Path  # the installed model: $MARGIN_HOME/models/<name>
    index: Path | None  # the index installed with it (<path>/index), None: the default one serves
    grounded: int  # questions selected with a gold answer in their passages
    ungrounded: int  # ... without one (all of them with ``all_questions``)
    total: int  # questions in the training slices
    steps: int  # optimizer steps trained
    planned: int  # optimizer steps asked for (more than ``steps`` when the time budget cut them)
    retriever: RetrieverTrainResult | None = None  # stage 1, unless ``retriever="none"``


def finetune(
    data: Sequence[str | Path],
    name: str = "finetuned",
    config: TrainConfig | None = None,
    model: str = "default",
    index: str = "default",
    heldout: int = HELDOUT,
    limit: int | None = None,
    all_questions: bool = False,
    ungrounded: float = FINETUNE_UNGROUNDED,
    progress: bool = True,
    retriever: str = "train",
    retriever_config: RetrieverTrainConfig | None = None,
) -> Finetuned:
    """Train the retriever of ``index`` and then fine-tune ``model`` over it, on the training
    slices of ``data``, and install the result as ``name``.

    Stage 1 (``retriever``, one of :data:`RETRIEVER_STAGES`; ``retriever_config`` defaults to
    :data:`FINETUNE_RETRIEVER`, whose ``passage_encoder`` ``retriever`` overrides): contrastive
    training of the index's encoders, then the index re-encoded (:func:`learn_retrieval`); the
    model then searches the new index with the trained question encoder. ``"none"``: ``model``
    keeps its own question encoder and ``index`` (stage 2 alone).

    By default it trains on the questions :func:`select_questions` picks, as many as the
    recipe's steps take in one pass: a share ``ungrounded`` of them with no gold answer in
    their passages, the rest with one (``all_questions`` trains on every question instead).
    The result lands in ``$MARGIN_HOME/models/<name>``, where ``RAG.load(name)`` and
    ``--model <name>`` find it; the run itself (log, state) stays in
    ``$MARGIN_HOME/runs/<name>`` so an interrupted fine-tune resumes when run again.
    When ``index`` was built with another passage encoder than the default index, the model is
    installed with a copy of it (:func:`index_to_carry`, margin.models.install_model), which
    ``--model <name>`` then searches unless told another index.
    ``config.max_minutes`` bounds the whole call: stage 1, loading and question selection count.
    """
    from margin.assets import margin_home
    from margin.models import check_model_name, install_model

    check_model_name(name)  # before the hour of training, not after it
    if not 0.0 <= ungrounded < 1.0:
        raise MarginError(f"the ungrounded share must be in [0, 1), got {ungrounded}")
    if retriever not in RETRIEVER_STAGES:
        raise MarginError(f"unknown --retriever {retriever!r}; use one of "
                          f"{', '.join(RETRIEVER_STAGES)}")
    began = time.perf_counter()
    config = config or FINETUNE_RECIPE
    examples = interleave(*(training_slice(p, heldout, limit) for p in data))
    run_dir = margin_home() / "runs" / name
    learned = None
    if retriever == "none":
        rag = RAG.load(model=model, index=index, progress=progress, device=config.device)
        identity = f"{model}|{index}"
    else:
        stage = replace(retriever_config or FINETUNE_RETRIEVER, device=config.device,
                        passage_encoder="train" if retriever == "train" else "frozen")
        learned, searched = learn_retrieval(examples, run_dir, stage, index, progress)
        rag = RAG.load(model=model, index=None, progress=progress, device=config.device)
        rag = rag.with_retriever(Retriever.load(searched, query_encoder=learned.question_encoder,
                                                progress=progress, device=config.device))
        identity = f"{model}|{searched}|{learned.question_encoder}"
    total = len(examples)
    counts = (0, total)
    if not all_questions:
        needed = config.steps * config.batch_size * config.grad_accum if config.steps else None
        batch = config.retrieval_batch_size
        if needed is None:  # epochs: every grounded question, and ungrounded ones in proportion
            kept, others = select_questions(rag, examples, config.k, None, total, batch, progress)
            others = others[: round(len(kept) * ungrounded / (1.0 - ungrounded))]
        else:
            extra = round(needed * ungrounded)
            kept, others = select_questions(rag, examples, config.k, needed - extra, extra, batch,
                                            progress)
        if not kept:
            raise MarginError(
                f"none of the {total} training questions has a gold answer in its top "
                f"{config.k} passages; use a corpus that holds the answers, or --all-questions"
            )
        examples, counts = [*kept, *others], (len(kept), len(others))  # train() shuffles
    if config.max_minutes is not None:  # what loading and selecting took counts too
        left = config.max_minutes - (time.perf_counter() - began) / 60
        if left <= 0:
            raise MarginError(f"training the retriever, loading the model and selecting "
                              f"questions took the whole {config.max_minutes:g}-minute budget; "
                              "give a larger --max-minutes, 0 for none, or --retriever none")
        config = replace(config, max_minutes=left)
    result = train(rag, examples, run_dir, config, resume=(run_dir / "state").exists(),
                   progress=progress, model_name=identity)
    carried = index_to_carry(rag)
    target = install_model(result.out / "last", name, index=carried)
    return Finetuned(target, carried, *counts, total, result.steps,
                     total_steps(len(examples), config), learned)


def learn_retrieval(
    examples: Sequence[Example], run_dir: Path, config: RetrieverTrainConfig,
    index: str | Path = "default", progress: bool = True,
) -> tuple[RetrieverTrainResult, Path]:
    """Stage 1 of the recipe: train the encoders of ``index`` on ``examples`` with DPR's loss
    (margin.training.contrastive, into ``run_dir/retriever``), then, when the passage encoder
    trained, re-encode ``index`` with it into ``run_dir/index`` (margin.retrieval.refresh).
    Returns the run's result and the index to search with its question encoder. Both steps
    resume when run again; a finished run is read back, not redone."""
    from margin.devices import resolve_device
    from margin.retrieval.refresh import refresh_index
    from margin.retrieval.retriever import resolve_index

    device = str(resolve_device(config.device))
    out = run_dir / "retriever"
    result = train_retriever(examples, out, config, index=index, progress=progress,
                             resume=(out / "state" / "state.json").is_file())
    source = resolve_index(index, progress=progress, device=device)
    if result.passage_encoder is None:
        return result, source
    refresh_index(source, result.passage_encoder, run_dir / "index", progress=progress,
                  device=device)
    return result, run_dir / "index"


def index_to_carry(rag: RAG) -> Path | None:
    """The index ``rag`` searches, if a model trained against it needs it installed alongside:
    one whose passage encoder (none for BM25) is not the default index's. None: the default
    index serves the model as well (``index="auto"`` falls back to it)."""
    from margin.retrieval.retriever import default_index_dir

    if rag.retriever is None:
        return None
    path = rag.retriever.index.path
    if path.resolve() == default_index_dir().resolve():
        return None
    built = rag.retriever.index_encoder
    return None if built and built["fingerprint"] == default_passage_fingerprint() else path


def default_passage_fingerprint() -> str:
    """The weights' fingerprint of the default index's passage encoder: the default index's
    manifest says it, or (not built yet) the packaged all-MiniLM-L6-v2 itself does."""
    from margin.retrieval.manifest import MANIFEST, Manifest
    from margin.retrieval.retriever import default_index_dir

    built = default_index_dir()
    if (built / MANIFEST).is_file():
        return Manifest.read(built).encoder["fingerprint"]  # type: ignore[index]
    return _packaged_fingerprint()


@functools.cache
def _packaged_fingerprint() -> str:
    from margin.retrieval.encoders import load_encoder

    return load_encoder("default", role="passage").fingerprint
