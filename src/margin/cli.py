"""The ``margin`` command line. Each command is a thin shell over the Python API."""

from __future__ import annotations

import sys

import typer

from margin.errors import MarginError

app = typer.Typer(
    name="margin",
    help="Retrieval-Augmented Generation (Lewis et al., 2020): index, search, ask.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Retrieval-Augmented Generation (Lewis et al., 2020): index, search, ask."""


def main(argv: list[str] | None = None) -> int:
    """Console entry point: a MarginError becomes one line on stderr and a non-zero exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except MarginError as exc:
        print(f"margin: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("margin: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
