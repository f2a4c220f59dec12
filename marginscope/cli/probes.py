"""`marginscope probes …`: build, sample, extend (top output y*), validate and show probe files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from ..compatibility import DEVICE_HELP, resolve_device
from ..errors import InputError, MarginscopeError
from ..loading import load_model, load_tokenizer
from ..probes import ProbeSet, arithmetic, from_preferences, load, problems, sentiment, top
from .common import USER_ERROR, err, out, user_errors

probes_app = typer.Typer(no_args_is_help=True, help="Build, sample, extend, validate and show probe files (JSONL).")
build_app = typer.Typer(no_args_is_help=True, help="Build a synthetic probe set from the source papers.")
probes_app.add_typer(build_app, name="build")

OUTPUT = typer.Option(..., "--output", "-o", help="Probe file to write (JSONL, written atomically).")
SEED = typer.Option(0, "--seed", help="Random seed: the same seed gives a byte-identical file.")


@build_app.command("sentiment")
@user_errors
def build_sentiment(
    output: Path = OUTPUT,
    n: int = typer.Option(64, "--n", help="Number of pairs."),
    style: str = typer.Option("single", "--style", help="single (one word), short (a sentence) or long (+ a suffix)."),
    seed: int = SEED,
) -> None:
    """Sentiment pairs (margin-pitfalls §4.2): a statement with a clear sentiment, chosen names the right
    sentiment and rejected the wrong one, differing in exactly one word. One seed, same statements
    in every style.

    Example:

        marginscope probes build sentiment --style long --n 64 --seed 0 -o probes.jsonl
    """
    _write(sentiment(n, style=style, seed=seed), _output(output))


@build_app.command("arithmetic")
@user_errors
def build_arithmetic(
    output: Path = OUTPUT,
    n: int = typer.Option(16, "--n", help="Number of questions."),
    pairs: int = typer.Option(4, "--pairs-per-question", help="Pairs (correct vs wrong answer) per question, 1 to 5."),
    seed: int = SEED,
) -> None:
    """Arithmetic pairs (bilevel SPO §2.3): questions with a known answer, several pairs of a correct
    (chosen) and a wrong (rejected) answer per question, ids arith-<question>-<pair>.

    Example:

        marginscope probes build arithmetic --n 16 --seed 0 -o arith.jsonl
    """
    _write(arithmetic(n, seed=seed, pairs_per_question=pairs), _output(output))


@probes_app.command("from-preferences")
@user_errors
def from_preferences_command(
    data: Path = typer.Argument(..., help="JSONL, CSV or Parquet file, or a datasets.save_to_disk folder."),
    output: Path = OUTPUT,
    n: int = typer.Option(100, "--n", help="Number of pairs to sample."),
    seed: int = SEED,
    prompt_col: str = typer.Option("prompt", "--prompt-col", help="Column of the prompts."),
    chosen_col: str = typer.Option("chosen", "--chosen-col", help="Column of the chosen responses."),
    rejected_col: str = typer.Option("rejected", "--rejected-col", help="Column of the rejected responses."),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="Tokenizer directory: lengths in tokens, chat templates."),
    min_len: Optional[int] = typer.Option(
        None, "--min-len", help="Keep pairs whose prompt + longer response is at least this long."),
    max_len: Optional[int] = typer.Option(
        None, "--max-len", help="Keep pairs whose prompt + longer response is at most this long."),
    convention: str = typer.Option("trl", "--convention", help="How lengths in tokens are counted (as the "
                                   "pairs will be scored): trl or separate."),
) -> None:
    """Sample probe pairs from a local preference dataset (strings or chat messages).

    Example:

        marginscope probes from-preferences prefs.parquet --n 100 --tokenizer ./ckpt --max-len 512 -o probes.jsonl
    """
    output = _output(output)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    _write(from_preferences(data, n, seed, prompt_col=prompt_col, chosen_col=chosen_col, rejected_col=rejected_col,
                            tokenizer=tok, min_len=min_len, max_len=max_len, convention=convention), output)


@probes_app.command("top")
@user_errors
def top_command(
    probes: Path = typer.Argument(..., help="Probe file (JSONL)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model directory (save_pretrained layout), a .gguf file, or a folder holding one."),
    output: Path = OUTPUT,
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory or .gguf file (default: --model)."),
    method: str = typer.Option("greedy", "--method", help="greedy, or sample: the most probable of --k samples."),
    k: int = typer.Option(8, "--k", help="Samples per prompt (--method sample)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Longest top output, in tokens."),
    seed: int = SEED,
    name: str = typer.Option("top", "--name", help="Name of the extra response."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (saved dtype), float32, float64, bfloat16, float16."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Add each prompt's top output y* from a model (bilevel SPO §2.3) as the extra response "top".

    Example:

        marginscope probes top probes.jsonl --model ./ckpt --method sample --k 8 -o with_top.jsonl
    """
    output = _output(output)
    probe_set = load(probes)
    tok = load_tokenizer(tokenizer if tokenizer is not None else model)
    lm = load_model(model, dtype=dtype, device=resolve_device(device))
    _write(top(probe_set, lm, tok, method=method, k=k, max_new_tokens=max_new_tokens, seed=seed, name=name,
               progress=True), output)


@probes_app.command("validate")
@user_errors
def validate_command(probes: Path = typer.Argument(..., help="Probe file (JSONL).")) -> None:
    """Check a probe file: every problem as file:line: field: message (exit 2), else a one-line summary.

    Example:

        marginscope probes validate probes.jsonl
    """
    if not probes.is_file():
        raise InputError("probe file not found" if not probes.exists() else "not a file", probes)
    found = problems(probes)
    for problem in found:
        out.print(_located(problem), markup=False, highlight=False)
    if found:
        err.print(f"error: {len(found)} problem{'s' * (len(found) > 1)} in {probes}", markup=False, highlight=False)
        raise typer.Exit(USER_ERROR)
    probe_set = load(probes)
    out.print(f"{probes}: OK, {len(probe_set)} probes, responses {', '.join(probe_set.response_names)}",
              markup=False, highlight=False)


@probes_app.command("show")
@user_errors
def show_command(
    probes: Path = typer.Argument(..., help="Probe file (JSONL)."),
    n: int = typer.Option(10, "--n", help="Number of probes shown (the first ones)."),
) -> None:
    """Show the first probes of a file as a table (responses in quotes: leading spaces matter).

    Example:

        marginscope probes show probes.jsonl --n 10
    """
    if n < 1:
        raise MarginscopeError(f"--n must be at least 1; got {n}")
    out.print(_table(load(probes), n))


def _table(probe_set: ProbeSet, n: int) -> Table:
    shown = probe_set[:n]
    table = Table(title=f"{probe_set.source}: {len(shown)} of {len(probe_set)} probes", show_lines=True)
    for header in ("id", "prompt", *probe_set.response_names):
        table.add_column(header)
    for probe in shown:
        table.add_row(Text(probe.id), Text(probe.prompt), *(Text(repr(t)) for t in probe.responses.values()))
    return table


def _located(problem: InputError) -> str:
    """file:line: field: message (parts that are unknown left out)."""
    where = ":".join(str(p) for p in (problem.path, problem.line) if p is not None)
    return ": ".join(p for p in (where, problem.field, problem.reason) if p)


def _output(path: Path) -> Path:
    """Fail before any work when `path` cannot be written."""
    if path.is_dir():
        raise MarginscopeError(f"{path}: is a directory, expected an output .jsonl file path")
    if not path.parent.exists():
        raise MarginscopeError(f"{path}: folder {path.parent} does not exist")
    return path


def _write(probe_set: ProbeSet, output: Path) -> None:
    probe_set.to_jsonl(output)
    out.print(f"wrote {len(probe_set)} probes to {output}", markup=False, highlight=False)
