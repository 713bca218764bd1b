"""What every benchmark writes alongside its numbers: the machine, its load, and BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

from margin._io import atomic_path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: the machine is shared, so every figure carries them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine(device: str = "cpu") -> str:
    """The cores and CPU model, torch's version and, on a GPU, the card's name."""
    import torch

    line = f"nproc {len(os.sched_getaffinity(0))}, {cpu_model()}; torch {torch.__version__}"
    if device.startswith("cuda"):
        line += f"; GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return line


def provenance(script: str, load_before: str, device: str = "cpu") -> list[str]:
    """The lines that end every section: the exact command, the machine and its load, the date."""
    command = " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])
    return [
        f"- command: `{command}`",
        f"- machine: {machine(device)}; load average at the start {load_before}, at the end "
        f"{load_average()}",
        f"- date: {datetime.date.today().isoformat()}",
        "",
    ]


def write_section(path: Path, section: str) -> None:
    """Put ``section`` in ``path``, replacing the one with the same ``## `` heading; atomic."""
    heading = section.splitlines()[0]
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + section
    with atomic_path(path) as tmp:
        tmp.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
