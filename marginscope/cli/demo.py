"""`marginscope demo`: the embedded end-to-end example (tiny SFT model, tracked DPO per sentiment style)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..demo.recipe import StyleSummary, run_demo
from .common import out, user_errors


@user_errors
def demo_command(
    output: Path = typer.Option(Path("marginscope-demo"), "--out", "-o", help="Folder for the model cache, traces, figures and report."),
) -> None:
    """Run the embedded demo: tiny model from scratch, tracked DPO per sentiment style, figures, report.

    Trains a tiny GPT-2-style model on the bundled synthetic sentiment corpus (cached), runs DPO with
    the tracker on the sentiment probes of each style (single word, short sentence, long sentence),
    and writes the traces, figures and an HTML report. About a minute on a 2-core CPU.

    Example:

        marginscope demo --out marginscope-demo && marginscope inspect marginscope-demo/run-long.h5
    """
    summaries = run_demo(output, say=lambda line: out.print(line, highlight=False), progress=True)
    out.print(summary_table(summaries))


def summary_table(summaries: list[StyleSummary]) -> Table:
    """Per style: self-view Case fractions at the last record, chosen/rejected trends, mean gradient
    cosine, the Case of what happened over the run, and the r of the self view and of the
    actual-update first order against the observed changes (chosen / rejected)."""
    table = Table(title="DPO on sentiment probes: what happened to chosen and rejected, and why")
    for column in ("style", "self view Case 1/2/3/4", "happened Case 1/2/3/4", "Δ log π chosen",
                   "Δ log π rejected", "mean cos(a_w, a_l)", "r self view (w/l)", "r actual update (w/l)", "trace"):
        table.add_column(column, justify="left" if column in ("style", "trace") else "right")
    fractions = lambda f: "/".join(f"{f[c]:.2f}" for c in (1, 2, 3, 4))  # noqa: E731
    pair = lambda r: f"{r['chosen']:+.2f}/{r['rejected']:+.2f}"  # noqa: E731
    for s in summaries:
        table.add_row(s.style, fractions(s.case_fractions), fractions(s.happened_fractions), f"{s.chosen_trend:+.3f}",
                      f"{s.rejected_trend:+.3f}", f"{s.cosine_mean:+.3f}", pair(s.self_r), pair(s.actual_r),
                      str(s.trace))
    return table
