"""`marginscope plot`: every figure of one or several traces, as files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import plots
from ..errors import MarginscopeError
from .common import out, user_errors


def parse_formats(text: str) -> list[str]:
    """"png,svg" → ["png", "svg"]; a one-line error for an unknown format."""
    formats = [f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in plots.FORMATS]
    if bad or not formats:
        raise MarginscopeError(f"--format {text!r}: choose from {', '.join(plots.FORMATS)} (comma-separated)")
    return formats


@user_errors
def plot_command(
    traces: list[Path] = typer.Argument(..., help="Trace files (.h5); several are also compared side by side."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the figures (created if needed)."),
    fmt: str = typer.Option("png", "--format", "-f", help="Comma-separated: png, svg, pdf."),
    probe: Optional[str] = typer.Option(None, "--probe", help="Probe id for the per-probe figures (default: the first, "
                                        "or the first with per-token data)."),
    step: Optional[int] = typer.Option(None, "--step", help="Logged step for the single-step figures (default: the last)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory to show token texts "
                                             "instead of ids."),
    figure: list[str] = typer.Option([], "--figure", help="Only this figure (repeatable): "
                                     + ", ".join(dict.fromkeys([*plots.FIGURES, *plots.COMPARISONS])) + "."),
) -> None:
    """Draw the figures of one or several traces into a directory (PNG by default), named
    <run>-<figure>.<format>, plus comparison-<figure>.<format> for several traces.

    Example:

        marginscope plot run-dpo.h5 run-ipo.h5 -o figures --format png,svg --probe p3 --step 40
    """
    written = plots.save_all(traces, output, formats=parse_formats(fmt), probe=probe, step=step,
                             tokenizer=tokenizer, names=figure or None)
    for path in written:
        out.print(str(path), markup=False, highlight=False)
    out.print(f"wrote {len(written)} file(s) to {output}", markup=False, highlight=False)
