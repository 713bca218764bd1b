"""Training checkpoints: a model `margin ask` can load, and the state `margin train --resume` needs.

Two kinds of directory, both written atomically (a reader sees the old one or the new one):

- a **model checkpoint**, margin's own format (margin.models.save_model): the generator with any
  LoRA adapter merged into its weights, the trained question encoder, and the mode and k the model
  was trained with. ``margin ask --model DIR`` loads it; nothing about training is in it.
- a **training state** (``OUT/state``), everything needed to continue as if never stopped::

      state.json              step, epoch, data position, scheduler, python/numpy RNG states,
                              best dev score, the TrainConfig and what it was trained on
      trainable.safetensors   every trainable tensor, by parameter name (LoRA: the adapters only)
      optimizer.safetensors   the optimizer's per-parameter tensors ("<param index>.<name>")
      rng.safetensors         torch's CPU (and CUDA) generator states

  Resuming reloads the same base model, sets up the same trainable parameters, then copies these
  tensors in. It never holds pickle: tensors go to safetensors, everything else to JSON, and
  nothing here calls ``torch.load``.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from margin._io import atomic_path
from margin.errors import MarginError

STATE_FORMAT = "margin-train-state"
STATE_VERSION = 1


# ----------------------------------------------------------------------------- model checkpoints


def save_checkpoint(rag, out: str | Path, peft_model=None, mode: str = "token", k: int = 5) -> Path:
    """Write ``rag`` as a margin model directory, atomically, loadable by ``margin ask``.

    ``peft_model`` is the LoRA wrapper of the generator, if any: a copy with the adapters merged
    into the base weights is saved, so the checkpoint is a plain transformers model again.
    """
    from margin.models import save_model

    saved = copy.copy(rag)
    if peft_model is not None:
        merged = copy.deepcopy(peft_model).merge_and_unload()
        saved.generator = copy.copy(rag.generator)
        saved.generator.model = merged
    config = copy.copy(rag.config)
    config.default_mode, config.default_k = mode, k
    saved.config = config
    return save_model(saved, out)


# ----------------------------------------------------------------------------- training state


def trainable_tensors(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, named ``<module key>.<parameter name>`` (ties counted once)."""
    out: dict[str, torch.nn.Parameter] = {}
    for key, module in modules.items():
        for name, p in module.named_parameters():
            if p.requires_grad:
                out[f"{key}.{name}"] = p
    return out


def save_state(
    path: str | Path,
    params: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    record: dict[str, Any],
) -> Path:
    """Write the training state directory ``path`` atomically (see the module docstring)."""
    path = Path(path)
    opt = optimizer.state_dict()
    opt_tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, entry in opt["state"].items()
        for name, value in entry.items()
        if torch.is_tensor(value)
    }
    opt_scalars = {
        str(index): {n: v for n, v in entry.items() if not torch.is_tensor(v)}
        for index, entry in opt["state"].items()
    }
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    rngs = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            rngs[f"cuda.{i}"] = state
    np_state = np.random.get_state()
    py_state = random.getstate()
    full = dict(
        record,
        format=STATE_FORMAT,
        version=STATE_VERSION,
        scheduler=sched,
        optimizer_groups=opt["param_groups"],
        optimizer_scalars=opt_scalars,
        numpy_rng=[np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
        python_rng=[py_state[0], list(py_state[1]), py_state[2]],
    )
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()},
                  str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rngs, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(full, indent=1, default=_plain) + "\n")
    return path


def read_state_record(path: str | Path) -> dict[str, Any]:
    """The JSON part of a training state (to check it matches the run before loading tensors)."""
    file = Path(path) / "state.json"
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarginError(f"{file} cannot be read ({exc}); resume from another --out") from None
    if record.get("format") != STATE_FORMAT or int(record.get("version", 0)) > STATE_VERSION:
        raise MarginError(f"{file} is not a training state this margin can resume; upgrade margin")
    return record


def load_state(
    path: str | Path,
    params: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler and RNG states from ``path``; return its record."""
    path = Path(path)
    record = read_state_record(path)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing = sorted(set(params) ^ set(saved))[:3]
        raise MarginError(
            f"{path} holds other trainable parameters than this run ({', '.join(missing)} ...); "
            "resume with the same --model, LoRA and freeze options"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for index, scalars in record["optimizer_scalars"].items():
        state[int(index)] = dict(scalars)
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": record["optimizer_groups"]})
    scheduler.load_state_dict(dict(record["scheduler"], lr_lambdas=[None] * len(
        optimizer.param_groups)))
    rngs = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rngs["torch"])
    cuda = [rngs[f"cuda.{i}"] for i in range(len(rngs) - 1) if f"cuda.{i}" in rngs]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, *rest = record["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = record["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return record


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and tuples (optimizer betas), nothing else."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, int | float | str) or value is None:
        return value
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
