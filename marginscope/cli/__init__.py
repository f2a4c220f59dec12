"""The `marginscope` command line: a thin shell over the library (one module per command group)."""

from __future__ import annotations

import typer

from .. import __version__
from .inspect import inspect_command
from .measure import measure_command

app = typer.Typer(
    name="marginscope", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Diagnose the training dynamics of DPO and margin-based preference optimization.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"marginscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Diagnose the training dynamics of DPO and margin-based preference optimization."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars only; stderr stays for errors


app.command("measure")(measure_command)
app.command("inspect")(inspect_command)


def main() -> None:
    app()
