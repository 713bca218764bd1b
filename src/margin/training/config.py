"""What a fine-tuning run is asked to do: :class:`TrainConfig`, one typed field per setting, each
with its default and a one-line comment, checked when it is made.

Why apart from the loop (margin.training.train): ``margin train`` and ``margin finetune`` build
one from their flags, and the fine-tuning recipe (margin.training.recipe) is one. A bad setting
is refused here, in one line naming the fix, before any model or data is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from margin.devices import resolve_device
from margin.errors import MarginError
from margin.rag import LOSS_MODES
from margin.training.precision import PRECISIONS, autocast_dtype

TARGETS = ("first", "sample")
PASSAGE_ENCODER = ("frozen", "train")  # what `passage_encoder` may be


@dataclass
class TrainConfig:
    """How to fine-tune; every field is a ``margin train`` flag of the same name (``batch_size``:
    ``--batch-size``) except these finer settings, set from Python: ``weight_decay``,
    ``max_grad_norm``, ``lora_alpha``, ``lora_targets``, ``eval_limit``, ``eval_batch_size``,
    ``log_every`` and ``retrieval_batch_size`` (tests/test_train_config.py holds this and the
    defaults to the CLI)."""

    mode: str = "token"  # marginalisation trained: "token" (RAG-Token), "sequence" (RAG-Sequence)
    # or "both" (the mean of the two NLLs; the checkpoint then answers in RAG-Token by default)
    k: int = 5  # passages retrieved per question in training (the paper: 5 or 10)
    steps: int | None = None  # optimizer steps to run; None: `epochs` passes over the data
    epochs: int = 1  # passes over the training set when `steps` is None
    batch_size: int = 4  # questions per forward/backward (micro-batch)
    grad_accum: int = 1  # micro-batches summed into each optimizer step
    lr: float = 3e-5  # AdamW peak learning rate
    retriever_lr: float | None = None  # the question (and trained passage) encoder's peak lr;
    # None: `lr` (LoRA wants a far higher lr than a fully trained encoder: give them their own)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup: int = 0  # optimizer steps of linear warm-up from 0 to `lr`, then linear decay to 0
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    freeze_retriever: bool = False  # keep the question encoder fixed (Table 6 "frozen")
    freeze_generator: bool = False  # keep the generator fixed (train only the retriever)
    passage_encoder: str = "frozen"  # "frozen": d(z) is the index's stored vector (the paper);
    # "train": d(z) re-encoded from the passage's text with gradient (margin.training.end2end)
    refresh_every: int = 0  # with a trained passage encoder: steps between background index
    # refreshes (0: re-encoded once, at the end)
    target: str = "first"  # training target: "first" gold answer, or one "sample"d per epoch
    lora: bool = False  # train LoRA adapters (peft) on the generator instead of all its weights
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    lora_targets: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated names
    gradient_checkpointing: bool = False  # recompute activations in backward (seq2seq, encoder)
    precision: str = "auto"  # "auto": bf16 (else fp16) autocast on a GPU, fp32 on CPU; "bf16"
    # also on a CPU (faster where it computes bf16 natively: margin.devices.native_bf16)
    device: str = "auto"  # where to train: auto (CUDA if any, else CPU), cpu, cuda[:N] (a resume
    # may change it: the optimizer state follows the parameters)
    eval_every: int = 0  # optimizer steps between dev evaluations (0: only at the end)
    eval_limit: int | None = None  # dev examples evaluated (None: all)
    eval_batch_size: int = 8  # questions per batch when answering dev questions
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    log_every: int = 1  # optimizer steps between log.jsonl lines and progress updates
    max_minutes: float | None = None  # a time budget for this call of train(): once a few steps
    # are timed, the run is cut to the steps that fit (never lengthened), its learning rate
    # decaying to 0 at the new end; None: no budget
    retrieval_batch_size: int = 64  # questions per batched retrieval when caching the top-k
    seed: int = 0  # seeds data order, target sampling, dropout and LoRA initialisation

    def __post_init__(self) -> None:
        if self.mode not in LOSS_MODES:
            raise MarginError(f"unknown mode {self.mode!r}; use 'token', 'sequence' or 'both'")
        if self.target not in TARGETS:
            raise MarginError(f"unknown target {self.target!r}; use 'first' or 'sample'")
        if self.precision not in PRECISIONS:
            raise MarginError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")
        # a device this machine lacks, or a precision it cannot run, is refused before any loading
        device = resolve_device(self.device)
        if device.type != "cuda":  # every precision runs on a GPU
            autocast_dtype(self.precision, device)
        if self.retriever_lr is not None and not 0 < self.retriever_lr < math.inf:
            raise MarginError(f"retriever_lr must be positive and finite, got {self.retriever_lr}")
        for name in ("k", "epochs", "batch_size", "grad_accum", "log_every", "eval_batch_size",
                     "retrieval_batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise MarginError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "refresh_every"):  # 0: none / at the end
            if getattr(self, name) < 0:
                raise MarginError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise MarginError(f"steps must be at least 1, got {self.steps}")
        if not 0 < self.lr < math.inf:  # nan too: it trained, and ruined the weights
            raise MarginError(f"lr must be positive and finite, got {self.lr}")
        check_max_minutes(self.max_minutes)
        if self.passage_encoder not in PASSAGE_ENCODER:
            raise MarginError(f"unknown passage_encoder {self.passage_encoder!r}; use 'frozen' or "
                              "'train'")
        if self.refresh_every and self.passage_encoder != "train":
            raise MarginError("--refresh-every re-encodes the index with a trained passage "
                              "encoder; add --passage-encoder train or drop it")
        if self.passage_encoder == "train" and self.freeze_retriever:
            raise MarginError("--freeze-retriever keeps the retriever fixed but --passage-encoder "
                              "train trains its passage encoder; drop one of them")
        if self.freeze_generator and self.lora:
            raise MarginError("--lora trains the generator; drop it or drop --freeze-generator")


def check_max_minutes(max_minutes: float | None) -> None:
    """Refuse a time budget that is not positive and finite (None: no budget; inf overflowed
    the step count once steps were timed); the retriever's config (margin.training.contrastive)
    checks its own with this too."""
    if max_minutes is not None and not 0 < max_minutes < math.inf:
        raise MarginError(f"max_minutes must be positive and finite, got {max_minutes}; leave "
                          "it unset for no time budget")
