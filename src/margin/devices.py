"""Where the models run: a ``--device`` name resolved to a torch device, or one clear error.

Every command that runs a model takes ``--device``: ``auto`` (the default on the command line)
is the first CUDA GPU when torch sees one and the CPU otherwise; ``cpu``, ``cuda``, ``cuda:N``
and ``mps`` ask for one. A device this machine lacks is refused before anything is loaded,
with the fix in the message, rather than failing later inside torch.

The passage index itself stays in FAISS (or BM25) on the CPU wherever the models run: only the
question encoder's vectors cross over, one small (questions, dim) array per search.

Example::

    from margin.devices import resolve_device
    resolve_device("auto")    # device(type='cuda') on a GPU machine, device(type='cpu') elsewhere
    resolve_device("cuda:1")  # MarginError unless torch sees at least two GPUs
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from margin.errors import MarginError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps."
KINDS = ("cpu", "cuda", "mps")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``name`` stands for on this machine; ``None`` or "auto": CUDA, else CPU."""
    import torch  # here, not at the top: the command line imports this module before torch

    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name.strip().lower())
    except (RuntimeError, ValueError):
        raise MarginError(f"unknown device {name!r}; use {DEVICE_HELP}") from None
    if device.type not in KINDS:
        raise MarginError(f"device {name!r} is not supported; use {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MarginError(
                f"device {name!r}: torch sees no CUDA GPU on this machine (torch "
                f"{torch.__version__}); use --device cpu, or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise MarginError(
                f"device {name!r}: this machine has {count} CUDA GPU(s), numbered from 0; "
                f"use cuda:0 to cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MarginError(f"device {name!r}: Apple's MPS backend is not available here; "
                          "use --device cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware, so bf16 autocast is faster
    than fp32 there: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX (oneDNN's bf16
    kernels; elsewhere torch emulates bf16 on the CPU, slower than fp32)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False
