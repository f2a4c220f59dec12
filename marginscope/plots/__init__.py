"""Figures drawn from traces: `ms.plots.<name>(trace, ...) -> matplotlib.figure.Figure`.

Every function takes a `Trace` or a path (comparisons: a list of them), reads what it needs, and
returns a figure on an Agg canvas in one seaborn look (no window, nothing to close). A trace that
cannot feed a figure (no records, NaN, no per-token data, no in-run rows) gives a figure with a note.

    import marginscope as ms
    fig = ms.plots.case_map("run.h5")                     # or [run_a, run_b]: a panel per run
    fig.savefig("case_map.png")
    ms.plots.save_all(["dpo.h5", "ipo.h5"], "figures/", formats=("png", "svg"))

See docs/figures.md for what each figure shows and how to read it.
"""

from __future__ import annotations

import inspect
import io
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import matplotlib as mpl
from matplotlib.figure import Figure

from ..errors import MarginscopeError
from ._data import TraceLike, Traces, as_list, load_tokenizer_like, opened, opened_all
from ._style import DPI, theme_rc
from .attribution import displacers
from .cases import case_fractions, case_map
from .compare import compare_runs
from .mass import mass_shift
from .tokens import token_heatmap, token_heatmap_steps
from .trajectories import gradient_geometry, logp_trajectories
from .update import token_update, why_moved
from .validity import first_order

# Figures of one run, in reading order.
FIGURES: dict[str, Callable[..., Figure]] = {
    "case_map": case_map, "case_fractions": case_fractions, "logp_trajectories": logp_trajectories,
    "gradient_geometry": gradient_geometry, "token_heatmap": token_heatmap,
    "token_heatmap_steps": token_heatmap_steps, "mass_shift": mass_shift, "first_order": first_order,
    "why_moved": why_moved, "token_update": token_update, "displacers": displacers,
}
# Figures of several runs together.
COMPARISONS: dict[str, Callable[..., Figure]] = {"case_map": case_map, "compare_runs": compare_runs}
FORMATS = ("png", "svg", "pdf")


def _call(fn: Callable[..., Figure], traces: Traces, options: dict[str, Any]) -> Figure:
    """fn(traces, **the options it accepts that are set)."""
    accepted = inspect.signature(fn).parameters
    return fn(traces, **{k: v for k, v in options.items() if k in accepted and v is not None})


def _check_names(names: Sequence[str] | None, known: dict[str, Callable]) -> list[str]:
    if names is None:
        return list(known)
    unknown = [n for n in names if n not in FIGURES and n not in COMPARISONS]
    if unknown:
        raise MarginscopeError(f"unknown figure {unknown[0]!r}; known: {', '.join(dict.fromkeys([*FIGURES, *COMPARISONS]))}")
    return [n for n in known if n in names]


def run_figures(trace: TraceLike, *, probe: str | None = None, step: int | None = None, tokenizer: Any = None,
                names: Sequence[str] | None = None) -> Iterator[tuple[str, Figure]]:
    """(name, figure) for every figure of FIGURES (or `names`), drawn one at a time from one trace."""
    options = {"probe": probe, "step": step, "tokenizer": load_tokenizer_like(tokenizer)}
    with opened(trace) as tr:
        for name in _check_names(names, FIGURES):
            yield name, _call(FIGURES[name], tr, options)


def comparison_figures(traces: Traces, *, probe: str | None = None, step: int | None = None,
                       names: Sequence[str] | None = None) -> Iterator[tuple[str, Figure]]:
    """(name, figure) for every figure of COMPARISONS (or `names`) over several traces."""
    with opened_all(traces) as trs:
        for name in _check_names(names, COMPARISONS):
            yield name, _call(COMPARISONS[name], trs, {"probe": probe, "step": step})


def run_keys(traces: Sequence[TraceLike]) -> list[str]:
    """A distinct file-name stem per trace ("run", "run-2" when two files share a name)."""
    keys: list[str] = []
    for trace in traces:
        stem = Path(trace.path if hasattr(trace, "path") else os.fspath(trace)).stem
        key, i = stem, 1
        while key in keys:
            i += 1
            key = f"{stem}-{i}"
        keys.append(key)
    return keys


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = DPI) -> bytes:
    """`fig` encoded as png, svg or pdf, in the marginscope look."""
    buffer = io.BytesIO()
    with mpl.rc_context(theme_rc()):
        fig.savefig(buffer, format=fmt, dpi=dpi)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Save `fig` to `path` (format from the suffix: png, svg or pdf)."""
    path = Path(path)
    path.write_bytes(figure_bytes(fig, path.suffix.lstrip("."), dpi))
    return path


def save_all(traces: Traces, out_dir: str | os.PathLike, *, formats: Sequence[str] = ("png",),
             probe: str | None = None, step: int | None = None, tokenizer: Any = None,
             names: Sequence[str] | None = None, dpi: int = DPI) -> list[Path]:
    """Write every figure of every trace to `out_dir` as `<run>-<figure>.<format>`, and for several
    traces the comparisons as `comparison-<figure>.<format>`; returns the paths written."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise MarginscopeError(f"unknown figure format {bad[0] if bad else ''!r}; choose from {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MarginscopeError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    items = as_list(traces)
    tokenizer = load_tokenizer_like(tokenizer)
    written = []

    def write(key: str, figures: Iterator[tuple[str, Figure]]) -> None:
        for name, fig in figures:
            written.extend(save_figure(fig, out / f"{key}-{name}.{fmt}", dpi) for fmt in formats)

    with opened_all(items) as trs:
        for key, tr in zip(run_keys(trs), trs):
            write(key, run_figures(tr, probe=probe, step=step, tokenizer=tokenizer, names=names))
        if len(trs) > 1:
            write("comparison", comparison_figures(trs, probe=probe, step=step, names=names))
    return written


__all__ = ["COMPARISONS", "FIGURES", "FORMATS", "case_fractions", "case_map", "compare_runs", "comparison_figures",
           "figure_bytes", "first_order", "gradient_geometry", "logp_trajectories", "mass_shift", "run_figures", "run_keys",
           "save_all", "save_figure", "token_heatmap", "token_heatmap_steps", "token_update", "why_moved",
           "displacers"]
