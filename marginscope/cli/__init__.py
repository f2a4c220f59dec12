"""The `marginscope` command line: a thin shell over the library (one module per command group)."""

from __future__ import annotations

import typer

from .. import __version__
from .demo import demo_command
from .inspect import inspect_command
from .measure import measure_command
from .plot import plot_command
from .probes import probes_app
from .report import report_command
from .reproduce import reproduce_command
from .train import train_command

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
app.command("demo")(demo_command)
app.command("train")(train_command)
app.command("plot")(plot_command)
app.command("report")(report_command)
app.command("reproduce")(reproduce_command)
app.add_typer(probes_app, name="probes", help="Build, sample, extend (top output y*), validate and show probe files.")


def main() -> None:
    app()
