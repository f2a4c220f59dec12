"""Trajectories over steps: log-probs with the dominant Case behind them, and the gradient geometry."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ._data import (TraceLike, dominant_case, finite, gradient_terms, inrun_series, nanmean, opened,
                    pair_cosine, probe_slice, run_label, safe_div)
from ._style import CASE_COLORS, CASE_LABELS, corner_text, message_figure, new_figure, response_colors, themed


def _spans(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the step interval each record stands for (bounded by the midpoints)."""
    s = steps.astype(np.float64)
    if len(s) == 1:
        return s - 0.5, s + 0.5
    mid = (s[1:] + s[:-1]) / 2
    return np.r_[2 * s[0] - mid[0], mid], np.r_[mid, 2 * s[-1] - mid[-1]]


def _shade_cases(ax: Axes, steps: np.ndarray, dominant: np.ndarray) -> set[int]:
    """Background of each record's interval in the colour of its dominant Case; the Cases drawn."""
    start, end = _spans(steps)
    for a, b, c in zip(start, end, dominant):
        ax.axvspan(a, b, color=CASE_COLORS[int(c)], alpha=0.16, lw=0, zorder=0)
    ax.set_xlim(start[0], end[-1])
    return {int(c) for c in dominant}


def _mean_and_pairs(ax: Axes, steps: np.ndarray, values: np.ndarray, color: str, label: str) -> None:
    """values [S, N]: a thin line per probe and the mean over probes, bold with markers."""
    alpha = float(np.clip(3.0 / max(values.shape[1], 1), 0.05, 0.3))
    ax.plot(steps, values, color=color, lw=0.7, alpha=alpha)
    ax.plot(steps, nanmean(values, axis=1), color=color, lw=2, marker="o", ms=3.5, label=label)


def _case_handles(cases: set[int]) -> list[Patch]:
    return [Patch(color=CASE_COLORS[c], alpha=0.35, label=f"dominant {CASE_LABELS[c]}") for c in sorted(cases)]


@themed
def logp_trajectories(trace: TraceLike, *, probe: str | None = None) -> Figure:
    """log π(y_w|x) and log π(y_l|x) over steps (mean bold, each probe thin), raw and divided by the
    response length |y|, on a background coloured by each record's dominant Case (margin-pitfalls Fig. 2)."""
    with opened(trace) as tr:
        label, steps, names = run_label(tr), tr.steps, tr.names
        sel = probe_slice(tr, probe)
        logp, case, lengths = finite(tr.logp)[:, sel], tr.case[:, sel], tr.lengths[sel]
    title = f"Log-prob trajectories · {label}" + (f" · probe {probe}" if probe else "")
    if not len(steps):
        return message_figure(title, "no records yet")
    fig = new_figure(11.0, 4.4, title)
    axes = fig.subplots(1, 2, sharex=True)
    colors = dict(zip(names, response_colors(names)))
    dominant = dominant_case(case)
    for ax, normalized in zip(axes, (False, True)):
        cases = _shade_cases(ax, steps, dominant)
        for name in ("chosen", "rejected"):
            j = names.index(name)
            values = safe_div(logp[:, :, j], lengths[None, :, j]) if normalized else logp[:, :, j]
            _mean_and_pairs(ax, steps, values, colors[name], name)
        ax.set_xlabel("training step")
        ax.set_ylabel("log π(y|x) / |y| (nats per token)" if normalized else "log π(y|x) (nats)")
        ax.set_title("length-normalized" if normalized else "sequence log-prob")
    if not np.isfinite(logp).any():
        corner_text(axes[0], "no finite log-prob")
    if len(steps) == 1:
        corner_text(axes[1], "one record: no trajectory yet")
    lines = [Line2D([], [], color=colors[n], lw=2, marker="o", ms=3.5, label=f"{n} (mean; thin: each probe)")
             for n in ("chosen", "rejected")]
    fig.legend(handles=lines + _case_handles(cases), loc="outside right upper")
    return fig


@themed
def gradient_geometry(trace: TraceLike, *, probe: str | None = None) -> Figure:
    """cos(a_w, a_l) over steps (margin-pitfalls Fig. 4a/7) and the bilevel Theorem 1 terms
    ‖a_w‖² − ⟨a_w,a_l⟩ (Δπ_w ∝ it) and ⟨a_w,a_l⟩ − ‖a_l‖² (Δπ_l ∝ it) (bilevel Fig. 1b), for the probes
    and, when recorded, for the training pairs of every step (in-run, dashed)."""
    with opened(trace) as tr:
        label, steps, names = run_label(tr), tr.steps, tr.names
        gram = tr.gram[:, probe_slice(tr, probe)]
        inrun = inrun_series(tr.inrun())
    title = f"Gradient geometry · {label}" + (f" · probe {probe}" if probe else "")
    if not len(steps) and inrun is None:
        return message_figure(title, "no records yet")
    w, l = names.index("chosen"), names.index("rejected")
    fig = new_figure(11.0, 4.4, title)
    ax_cos, ax_terms = fig.subplots(1, 2, sharex=True)
    colors = dict(zip(names, response_colors(names)))
    cosine = pair_cosine(gram, w, l)
    term_w, term_l = gradient_terms(gram, w, l)
    _mean_and_pairs(ax_cos, steps, cosine, "0.25", "probes")
    _mean_and_pairs(ax_terms, steps, term_w, colors["chosen"], r"chosen: $\|a_w\|^2 - \langle a_w,a_l\rangle$")
    _mean_and_pairs(ax_terms, steps, term_l, colors["rejected"], r"rejected: $\langle a_w,a_l\rangle - \|a_l\|^2$")
    if inrun is not None:
        ax_cos.plot(inrun.step, inrun.cosine, color="0.25", ls="--", lw=1.2, label="training pairs (in-run)")
        ax_terms.plot(inrun.step, inrun.term_w, color=colors["chosen"], ls="--", lw=1.2, label="chosen, in-run")
        ax_terms.plot(inrun.step, inrun.term_l, color=colors["rejected"], ls="--", lw=1.2, label="rejected, in-run")
    else:
        corner_text(ax_cos, "in-run geometry not recorded", "lower right")
    if not np.isfinite(cosine).any():
        corner_text(ax_cos, "no finite Gram for the probes")
    ax_cos.set_ylim(-1.05, 1.05)
    ax_cos.axhline(0, color="0.5", lw=0.8)
    ax_terms.axhline(0, color="0.5", lw=0.8)
    ax_cos.set_ylabel(r"$\cos(a_w, a_l)$")
    ax_cos.set_title("gradient cosine (mean bold, each probe thin)")
    ax_terms.set_ylabel(r"gradient term ($\nabla\log\pi$ inner products)")
    ax_terms.set_title("Theorem 1 terms: sign of Δπ (DPO-like losses)")
    for ax in (ax_cos, ax_terms):
        ax.set_xlabel("training step")
        ax.legend(loc="best", fontsize=7.5)
    return fig
