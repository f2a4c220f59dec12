"""`marginscope report`: one self-contained HTML file with the metadata, tables and figures of traces."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import report
from .common import out, user_errors


@user_errors
def report_command(
    traces: list[Path] = typer.Argument(..., help="Trace files (.h5); several are also compared side by side."),
    output: Path = typer.Option(..., "--output", "-o", help="The HTML file to write."),
    probe: Optional[str] = typer.Option(None, "--probe", help="Probe id for the per-probe figures."),
    step: Optional[int] = typer.Option(None, "--step", help="Logged step for the single-step figures (default: the last)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory to show token texts."),
    title: Optional[str] = typer.Option(None, "--title", help="Title of the report (default: the runs' names)."),
) -> None:
    """Write one self-contained HTML report (figures embedded as PNG; no script, no network): run
    metadata, a summary table per run and every figure, plus the comparison of several runs.

    Example:

        marginscope report run-dpo.h5 run-ipo.h5 -o report.html
    """
    path = report.write(traces, output, probe=probe, step=step, tokenizer=tokenizer, title=title)
    out.print(f"wrote {path}", markup=False, highlight=False)
