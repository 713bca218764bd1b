"""User-facing errors.

A :class:`MarginError` is a mistake the user can fix (a bad path, a malformed line, an index built
with another encoder). Its message is one line that names the problem and the fix; the CLI prints
it without a traceback and exits non-zero. Anything else escaping is a bug in margin.
"""

from __future__ import annotations


class MarginError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code: int = 2


class MissingDependencyError(MarginError):
    """An optional package is not installed; the message carries the exact install command."""


def require(module: str, install: str) -> object:
    """Import an optional dependency or fail with the exact command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"this needs the '{module}' package, which is not installed; run: {install}"
        ) from exc
