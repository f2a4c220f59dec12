"""`marginscope reproduce`: test the seed papers' published findings on our own tiny models (or, for the
sentiment study, on a user's pretrained checkpoint: `--model DIR_OR_GGUF`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import MarginscopeError
from ..reproduce import ALL, STUDIES, StudyResult, run
from .common import out, user_errors

DEFAULT_OUT = Path("marginscope-reproduce")


@user_errors
def reproduce_command(
    name: Optional[str] = typer.Argument(None, help="Study to run (see --list), or 'all'."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: marginscope-reproduce/NAME; "
                                          "with 'all', one subfolder per study)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Number of seeds: seeds 0..N-1 (default: the study's own, 3)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Folder of the cached SFT models (default: OUT/sft-models); "
                                         "share one between runs to skip retraining."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Run on your pretrained model (a model "
                                         "directory or a .gguf file) instead of the tiny ones: SFT until it ranks "
                                         "the labels, then the study's DPO runs (sentiment only)."),
    threads: int = typer.Option(1, "--threads", help="torch intra-op threads (default 1: the models are tiny, and "
                                "oversubscribed threads on a shared CPU are many times slower)."),
    list_studies: bool = typer.Option(False, "--list", help="List the studies and exit."),
    smoke: bool = typer.Option(False, "--smoke", hidden=True, help="Seconds-long reduced settings (tests only)."),
) -> None:
    """Run a reproduction study: train tiny models from scratch (cached), run preference optimization
    with the tracker, and print claim | expected | observed | holds for each published claim. Writes
    traces, figures and results.json to the output folder. 1–3 minutes per study on a 2-core CPU.
    With --model, the sentiment study runs on your own pretrained checkpoint instead (tens of minutes
    for a 135M model on 2 cores).

    Example:

        marginscope reproduce --list && marginscope reproduce sentiment --out repro-sentiment

        marginscope reproduce sentiment --model SmolLM2-135M-Instruct.Q4_1.gguf --seeds 2
    """
    if list_studies:
        out.print(studies_table())
        return
    if name is None:
        raise MarginscopeError(f"give a study name ({', '.join(STUDIES)}) or {ALL}; see --list")
    folder = output if output is not None else (DEFAULT_OUT if name == ALL else DEFAULT_OUT / name)
    results = run(name, folder, seeds=seeds, cache=cache, reduced=smoke, threads=threads, model=model,
                  say=lambda line: out.print(line, markup=False, highlight=False))
    for result in results:
        out.print(findings_table(result))
        if result.observations:
            out.print(observations_table(result))
        if result.context:
            out.print(context_line(result), markup=False, highlight=False)
        if result.explanation.get("traces"):
            out.print(explanation_line(result), markup=False, highlight=False)
        out.print(footer(result), markup=False, highlight=False)


def studies_table() -> Table:
    table = Table(title="marginscope reproduce: studies")
    for column in ("name", "what", "source"):
        table.add_column(column)
    for study in STUDIES.values():
        table.add_row(study.name, study.title, study.source)
    table.add_row(ALL, "every study above, each into OUT/<name>, sharing OUT/sft-models", "")
    return table


def findings_table(result: StudyResult) -> Table:
    table = Table(title=f"{result.name}: {result.title}\n({result.source}; seeds {result.seeds})", show_lines=True)
    for column, ratio in (("claim", 3), ("expected", 3), ("observed", 4), ("holds", 1)):
        table.add_column(column, ratio=ratio, overflow="fold")
    for f in result.findings:
        table.add_row(f.claim, f.expected, f.observed, "[green]yes[/green]" if f.holds else "[red]NO[/red]")
    return table


def observations_table(result: StudyResult) -> Table:
    rows = result.observations
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = Table(title=f"{result.name}: per-run observations (seed mean)")
    for column in columns:
        table.add_column(column, justify="left" if isinstance(rows[0].get(column), str) else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    return table


def context_line(result: StudyResult) -> str:
    """The study's context facts (per seed), e.g. how well each SFT model ranks the pairs."""
    def show(value) -> str:
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return "context (per seed): " + "; ".join(f"{k} {show(v)}" for k, v in result.context.items())


def explanation_line(result: StudyResult) -> str:
    """What explains the observed changes: r of the self view and of the actual update, per response."""
    parts = [f"{name} r self view {views['self']['r']:+.2f} / actual update {views['actual']['r']:+.2f}"
             for name, views in result.explanation.items() if name in ("chosen", "rejected")]
    return f"first order vs observed (mean over {result.explanation['traces']} traces): " + "; ".join(parts)


def footer(result: StudyResult) -> str:
    figures = (f"figures FAILED: {result.figures_error.splitlines()[0]}" if result.figures_error
               else f"{len(result.figures)} figure files" if result.figures else "no figures")
    return (f"{result.name}: {result.holding}/{len(result.findings)} claims hold; {figures}; results "
            f"{Path(result.out) / 'results.json'}; {result.seconds:.0f} s")


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:+.3f}"
    return str(value)
