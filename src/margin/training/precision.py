"""Mixed precision for fine-tuning: which autocast dtype ``--precision`` means on a device, and
LoRA's frozen linear weights kept in that dtype for a step (margin.training.train runs both).

Why a module of its own: the choice is made twice, once to refuse a precision the machine cannot
run before anything loads (margin.training.config.TrainConfig) and once to set up the run, and
:class:`FrozenCasts` is a bf16 speed-up whose exactness tests/test_precision.py proves on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from margin.errors import MarginError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device`` (None: plain fp32).

    "auto" is bf16 on a GPU that supports it (else fp16) and fp32 on a CPU; "bf16" is also
    allowed on a CPU, where it pays on one that computes bf16 natively (``native_bf16``: 1.21x a
    step of the default model's fine-tune on this project's 2-core EPYC, BENCHMARKS.md
    "Fine-tuning step: fp32 and bf16 autocast on the CPU"); fp16 needs a GPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
        return torch.bfloat16 if bf16 else torch.float16
    if precision == "bf16" and device.type == "cpu":
        return torch.bfloat16
    raise MarginError(f"--precision {precision} needs a GPU; use fp32, bf16 or auto on "
                      f"{device.type.upper()}")


class FrozenCasts:
    """The frozen weights of a model's linear layers, kept in the autocast dtype beside fp32.

    Autocast casts a linear layer's weight to bf16 on every call, and caches the cast only for
    weights that train: under LoRA the frozen base weights were cast again in each of a step's
    forward passes (the shared prompt prefix, every length group), which cost as much time as
    bf16 saved in the matrix products. ``active()`` swaps the bf16 copies in for a step's forwards
    and backwards, the very values autocast would have made, and the fp32 weights back for
    everything else (saving, merging the adapters, dev evaluation, the caller's model). Weights
    tied to an embedding stay as they are: a bf16 embedding would make the residual stream bf16.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        self.pairs = [
            (m.weight, m.weight.data, m.weight.data.to(dtype)) for m in model.modules()
            if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
            and id(m.weight) not in tied and m.weight.dtype != dtype
        ]

    @contextmanager
    def active(self) -> Iterator[None]:
        for weight, _, low in self.pairs:
            weight.data = low
        try:
            yield
        finally:
            for weight, high, _ in self.pairs:
                weight.data = high
