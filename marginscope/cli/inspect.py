"""`marginscope inspect`: what a trace holds, in a few tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from ..trace import open_trace, summarize
from ..errors import MarginscopeError
from ..trace.summary import Displacer, TraceSummary, agreement_tables, displacers
from .common import out, user_errors


@user_errors
def inspect_command(
    trace: Path = typer.Argument(..., help="Trace file (.h5) written by measure, train or the tracker."),
    rows: int = typer.Option(12, "--rows", min=2, help="Records shown (evenly spaced, first and last included)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    displacers_: bool = typer.Option(False, "--displacers", help="Show the training pairs that pushed the probes' "
                                     "chosen (or --response) log-probs down the most, from the per-pair attribution."),
    probe: str = typer.Option(None, "--probe", help="With --displacers: one probe's response instead of every probe's summed."),
    response: str = typer.Option("chosen", "--response", help="With --displacers: chosen or rejected."),
    step: int = typer.Option(None, "--step", help="With --displacers: one attributed training step (default: all, summed)."),
    top: int = typer.Option(10, "--top", min=1, help="With --displacers: how many training pairs."),
) -> None:
    """Summarize a trace: the run, its records, the agreement of the views, the in-run pairs and the trends.

    Per record: Case fractions, mean gradient cosine and mean log-prob of every response; then, over
    the run, how well the self view and the actual-update first order explain the observed change
    (r, slope, sign agreement per response), the Case shares of the three views and how often their
    Cases agree; then the in-run totals and the first → last change of every response.

    With --displacers: the training pairs whose share of the optimizer's gradient part moved the
    probes' chosen responses (or --response rejected) down the most, one probe's (--probe) or all
    probes' together, with their effect on the other response, their share of the total and their
    own gradient cosine and Case.

    Example:

        marginscope inspect marginscope-demo/run.h5
        marginscope inspect marginscope-demo/long/run.h5 --displacers --top 5
    """
    if displacers_:
        with open_trace(trace) as tr:
            rows = displacers(tr, probe=probe, response=response, step=step, n=top)
            label = f"probe {probe}" if probe else "all probes"
        _print_displacers(rows, response, label, as_json)
        return
    with open_trace(trace) as tr:
        summary = summarize(tr)
    if as_json:
        out.print_json(json.dumps(summary.__dict__, default=float))
        return
    out.print(_run_table(summary))
    out.print(_records_table(summary, rows))
    for title, header, table_rows, caption in agreement_tables(summary.agreement):
        table = Table(title=title, caption=caption)
        for column in header:
            table.add_column(column, justify="left" if column in ("response", "view", "views") else "right")
        for row in table_rows:
            table.add_row(*row)
        out.print(table)
    if summary.inrun:
        inrun = summary.inrun
        fractions = "  ".join(f"C{c} {inrun[f'inrun_case{c}_frac']:.2f}" for c in (1, 2, 3, 4))
        out.print(f"in-run: {inrun['rows']} pairs over {inrun['steps']} steps, mean cosine "
                  f"{inrun['inrun_cosine_mean']:+.3f}, {fractions}")
        if inrun.get("attributed_rows"):
            out.print(f"per-pair attribution: {inrun['attributed_rows']} pairs at {inrun['attributed_steps']} steps "
                      "(which pushed the probes: marginscope inspect --displacers)")
    if summary.trend:
        out.print("first → last mean Δlog π: " + "  ".join(f"{k} {v:+.3f}" for k, v in summary.trend.items()))


def _print_displacers(rows: list[Displacer], response: str, label: str, as_json: bool) -> None:
    if not rows:
        raise MarginscopeError("the trace holds no per-pair attribution (it needs the optimizer, in-run pairs and "
                               "attribution on; see docs/tracking.md)")
    if as_json:
        out.print_json(json.dumps([row.__dict__ for row in rows], default=float))
        return
    other = "rejected" if response == "chosen" else "chosen"
    table = Table(title=f"training pairs that pushed {response} down the most ({label}; nats, first order of "
                        "the gradient part)")
    for column in ("pair", "prompt", "chosen", "rejected", f"on {response}", f"on {other}", "share",
                   "own cos", "own Case", "steps"):
        table.add_column(column, justify="left" if column in ("pair", "prompt", "chosen", "rejected") else "right",
                         overflow="fold", max_width=28 if column in ("prompt", "chosen", "rejected") else None)
    for r in rows:
        table.add_row(r.label or "—", r.prompt, r.chosen, r.rejected, f"{r.effect:+.4g}", f"{r.effect_other:+.4g}",
                      f"{r.share:.1%}", f"{r.cosine:+.3f}", str(r.case), ",".join(map(str, r.steps)))
    out.print(table)


def _run_table(summary: TraceSummary) -> Table:
    meta = summary.metadata
    table = Table(title=summary.path, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    hparams = meta.get("loss_hparams", {})
    shown = {
        "kind": meta.get("kind", "?"), "model": meta.get("model", "?"),
        "loss": f"{meta.get('loss', '?')} {' '.join(f'{k}={v}' for k, v in hparams.items())}",
        "engine / scope": f"{meta.get('engine_resolved') or meta.get('engine', '?')} / {meta.get('scope', '?')}",
        "probes × responses": f"{summary.n_probes} × {len(summary.names)} ({', '.join(summary.names)})",
        "records": f"{len(summary.records)}" + (f" (steps {summary.records[0]['step']}–{summary.records[-1]['step']})"
                                                if summary.records else ""),
        "top-k / per-token": f"{summary.top_k} / {meta.get('per_token') or 'none'}",
        "created": meta.get("created", "?"),
        "versions": " ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
    }
    for key, value in shown.items():
        table.add_row(key, str(value))
    return table


def _records_table(summary: TraceSummary, rows: int) -> Table:
    table = Table(title="records")
    columns = ["step", "cosine", "C1", "C2", "C3", "C4", *(f"logp {n}" for n in summary.names), "non-finite"]
    for column in columns:
        table.add_column(column, justify="right")
    records = summary.records
    picked = sorted(set(np.linspace(0, len(records) - 1, min(rows, len(records))).round().astype(int).tolist()))
    for i in picked:
        r = records[i]
        table.add_row(str(r["step"]), f"{r['cosine_mean']:+.3f}", *(f"{r[f'case{c}_frac']:.2f}" for c in (1, 2, 3, 4)),
                      *(f"{r[f'logp_{n}_mean']:.3f}" for n in summary.names), str(r["nonfinite"]))
    return table
