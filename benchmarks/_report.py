"""What every benchmark writes alongside its numbers: the machine, its load, and BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from margin._io import atomic_path

ROOT = Path(__file__).resolve().parent.parent  # the checkout the scripts run from


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


def git(*args: str, cwd: Path = ROOT) -> str:
    """``git ARGS`` in ``cwd``; its output, stripped; a failure is one line naming the command."""
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"git {' '.join(args)} failed in {cwd}: {why}")
    return out.stdout.strip()


def commit_of(rev: str) -> str:
    """The full hash of ``rev``'s commit; an unknown revision is one line saying so."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           cwd=ROOT, capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise SystemExit(f"{rev}: no such revision in {ROOT}; give a commit, tag or branch")
    return found.stdout.strip()


def worktree(rev: str, path: Path) -> Path:
    """A detached git worktree of ``rev`` at ``path`` (an earlier revision to measure against):
    reused when one is already there at that commit, else created; ``path`` itself."""
    commit = commit_of(rev)
    if path.exists():
        here = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=path,
                              capture_output=True, text=True, check=False).stdout.splitlines()
        if here == [str(path.resolve()), commit]:
            return path
        raise SystemExit(f"{path} exists and is no worktree at {rev}; remove it or pick another")
    # --force: git may still list a worktree once there whose folder was since deleted
    git("worktree", "add", "--force", "--detach", str(path), commit)
    return path
