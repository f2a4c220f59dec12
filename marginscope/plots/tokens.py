"""Per-token gradient heatmaps (margin-pitfalls Fig. 4b): G[t,s] = ⟨∇log π(w_t|·), ∇log π(l_s|·)⟩."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from ..errors import MarginscopeError
from ._data import (TraceLike, differing_tokens, finite, load_tokenizer_like, opened, probe_index,
                    response_token_labels, run_label, token_cosine, token_gram_probes)
from ._style import diverging_cmap, message_figure, new_figure, themed

DIFF_COLOR = "#c0143c"
_MAX_LABELS = 48
_MAX_BOXES = 400  # beyond, the differing × differing block is too large to box cell by cell


@dataclass(frozen=True)
class TokenGrams:
    """The per-token Gram rows of one probe, with its token labels."""

    probe_id: str
    steps: np.ndarray  # [S'] steps with a row
    gram: np.ndarray  # [S', T_w, T_l]
    cosine: np.ndarray  # [S', T_w, T_l]
    labels_w: list[str]
    labels_l: list[str]
    diff_w: np.ndarray  # bool [T_w]: chosen tokens outside the common blocks
    diff_l: np.ndarray  # bool [T_l]


def _token_grams(tr, probe: str | None, tokenizer: Any | None) -> TokenGrams | str:
    """The per-token Grams of `probe` (default: the first probe that has them), or why there are none."""
    recorded = token_gram_probes(tr)
    ids = tr.probe_ids
    if probe is None and not recorded:
        return ("no per-token Gram in this trace (record one with "
                "Tracker(..., per_token='head', per_token_probes=[...]) or measure --per-token)")
    n = probe_index(tr, probe, default=recorded[0] if recorded else 0)
    if n not in recorded:
        shown = ", ".join(ids[i] for i in recorded[:8]) or "none"
        return f"probe {ids[n]!r} has no per-token Gram (recorded for: {shown})"
    tg = tr.token_gram(n)
    w, l = tr.names.index("chosen"), tr.names.index("rejected")
    diff_w, diff_l = differing_tokens(tr.input_ids(n, w)[1], tr.input_ids(n, l)[1])
    tok = load_tokenizer_like(tokenizer, tr)
    return TokenGrams(ids[n], tg["step"], finite(tg["gram"]), token_cosine(tg["gram"], tg["sqnorm_w"], tg["sqnorm_l"]),
                      response_token_labels(tr, n, w, tok), response_token_labels(tr, n, l, tok), diff_w, diff_l)


def _row_of(tg: TokenGrams, step: int | None, path) -> int:
    if step is None:
        return len(tg.steps) - 1
    hits = np.flatnonzero(tg.steps == step)
    if not len(hits):
        shown = ", ".join(str(s) for s in tg.steps[:12]) + (", …" if len(tg.steps) > 12 else "")
        raise MarginscopeError(f"{path}: no per-token Gram of probe {tg.probe_id!r} at step {step} (steps: {shown})")
    return int(hits[0])


def token_ticks(ax: Axes, axis: str, labels: list[str], diff: np.ndarray, show: bool) -> None:
    """Token tick labels (every k-th when long), the differing tokens in bold red."""
    stride = max(1, math.ceil(len(labels) / _MAX_LABELS))
    pos = np.arange(0, len(labels), stride)
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    if not show:
        set_ticks(pos, [""] * len(pos))
        return
    set_ticks(pos, [labels[i] for i in pos], rotation=90 if axis == "x" else 0, fontsize=7.5)
    for text, i in zip(ax.get_xticklabels() if axis == "x" else ax.get_yticklabels(), pos):
        if diff[i]:
            text.set_color(DIFF_COLOR)
            text.set_fontweight("bold")


def _heatmap(ax: Axes, matrix: np.ndarray, vmax: float, tg: TokenGrams, show_x: bool = True,
             show_y: bool = True) -> AxesImage:
    """One T_w × T_l heatmap: chosen tokens down, rejected across; differing×differing cells boxed."""
    im = ax.imshow(matrix, cmap=diverging_cmap(), vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.grid(False)
    token_ticks(ax, "x", tg.labels_l, tg.diff_l, show_x)
    token_ticks(ax, "y", tg.labels_w, tg.diff_w, show_y)
    if tg.diff_w.sum() * tg.diff_l.sum() <= _MAX_BOXES:
        for t in np.flatnonzero(tg.diff_w):
            for s in np.flatnonzero(tg.diff_l):
                ax.add_patch(Rectangle((s - 0.5, t - 0.5), 1, 1, fill=False, ec="black", lw=1.0))
    if show_x:
        ax.set_xlabel("rejected tokens $l_s$")
    if show_y:
        ax.set_ylabel("chosen tokens $w_t$")
    return im


def _absmax(values: np.ndarray) -> float:
    v = np.abs(values[np.isfinite(values)])
    return float(v.max()) if v.size and v.max() > 0 else 1.0


def _size(tg: TokenGrams, panels_x: int, panels_y: int) -> tuple[float, float]:
    t_w, t_l = len(tg.labels_w), len(tg.labels_l)
    cell = 0.22 if max(t_w, t_l) <= _MAX_LABELS else 0.12
    return (min(18.0, panels_x * min(8.0, 1.4 + cell * t_l) + 1.2),
            min(16.0, panels_y * min(7.5, 1.4 + cell * t_w) + 0.8))


_CAPTION = "bold red: tokens that differ between chosen and rejected; boxed: differing × differing cells"


@themed
def token_heatmap(trace: TraceLike, *, probe: str | None = None, step: int | None = None,
                  tokenizer: Any | None = None) -> Figure:
    """Per-token gradient cosine G[t,s]/(‖∇w_t‖‖∇l_s‖) and raw inner product G[t,s] of one probe at
    one step (margin-pitfalls Fig. 4b); tokens decoded with `tokenizer` (object or directory), else ids."""
    with opened(trace) as tr:
        label, tg = run_label(tr), _token_grams(tr, probe, tokenizer)
        row = None if isinstance(tg, str) else _row_of(tg, step, tr.path)
    title = f"Per-token gradient geometry · {label}"
    if isinstance(tg, str):
        return message_figure(title, tg)
    fig = new_figure(*_size(tg, 2, 1), f"{title} · probe {tg.probe_id} · step {tg.steps[row]}")
    ax_cos, ax_raw = fig.subplots(1, 2)
    im = _heatmap(ax_cos, tg.cosine[row], 1.0, tg)
    fig.colorbar(im, ax=ax_cos, label=r"$\cos(\nabla\log\pi(w_t), \nabla\log\pi(l_s))$", shrink=0.85)
    im = _heatmap(ax_raw, tg.gram[row], _absmax(tg.gram[row]), tg, show_y=False)
    fig.colorbar(im, ax=ax_raw, label=r"$G[t,s] = \langle\nabla\log\pi(w_t), \nabla\log\pi(l_s)\rangle$", shrink=0.85)
    ax_cos.set_title("cosine")
    ax_raw.set_title("inner product")
    fig.supxlabel(_CAPTION, fontsize=7.5, color="0.35")
    return fig


@themed
def token_heatmap_steps(trace: TraceLike, *, probe: str | None = None, steps: Sequence[int] | None = None,
                        max_panels: int = 6, tokenizer: Any | None = None) -> Figure:
    """Small multiples of the per-token gradient cosine of one probe over steps (`steps`, default
    up to `max_panels` recorded steps evenly spaced, first and last included), one colour scale."""
    with opened(trace) as tr:
        label, tg = run_label(tr), _token_grams(tr, probe, tokenizer)
        rows = None if isinstance(tg, str) else (
            [_row_of(tg, s, tr.path) for s in steps] if steps is not None
            else sorted(set(np.linspace(0, len(tg.steps) - 1, min(max_panels, len(tg.steps))).round().astype(int))))
    title = f"Per-token gradient cosine over steps · {label}"
    if isinstance(tg, str):
        return message_figure(title, tg)
    ncols = min(3, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig = new_figure(*_size(tg, ncols, nrows), f"{title} · probe {tg.probe_id}")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    im = None
    for i, (ax, row) in enumerate(zip(axes, rows)):
        bottom = i + ncols >= len(rows)
        im = _heatmap(ax, tg.cosine[row], 1.0, tg, show_x=bottom, show_y=i % ncols == 0)
        ax.set_title(f"step {tg.steps[row]}")
    for ax in axes[len(rows):]:
        fig.delaxes(ax)
    fig.colorbar(im, ax=list(axes[:len(rows)]), label=r"$\cos(\nabla\log\pi(w_t), \nabla\log\pi(l_s))$", shrink=0.85)
    fig.supxlabel(_CAPTION, fontsize=7.5, color="0.35")
    return fig
