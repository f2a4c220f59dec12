"""Case figures: the case map (margin-pitfalls §3.2) and the Case fractions over steps."""

from __future__ import annotations

from typing import Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ._data import (CasePoints, TraceLike, Traces, case_points, case_shares, constant, finite, median_or, nanmean,
                    opened, opened_all, probe_index, quadrant_case, run_label, safe_div, step_index)
from ._style import (CASE_COLORS, CASE_LABELS, CASE_MARKERS, STEP_CMAP, corner_text, footnote, message_figure,
                     new_figure, note, response_colors, themed)

Coordinates = Literal["auto", "raw", "normalized"]
_RAW_LABELS = (r"$\langle a_w, a_l\rangle\,/\,\|a_w\|^2$", r"$\langle a_w, a_l\rangle\,/\,\|a_l\|^2$")
_NORM_LABELS = (r"$\langle a_w, a_l\rangle\,/\,\|a_w\|^2 \;\div\; (d_w/d_l)$",
                r"$\langle a_w, a_l\rangle\,/\,\|a_l\|^2 \;\div\; (d_l/d_w)$")


def _panel_points(tr, probe: str | None, step: int | None) -> CasePoints | str:
    """The case-map points of one run (optionally one probe / one step), or why there are none."""
    steps = tr.steps
    if not len(steps):
        return "no records yet"
    names = tr.names
    w, l = names.index("chosen"), names.index("rejected")
    pts = case_points(tr.gram, tr.d_w, tr.d_l, tr.case, steps, w, l)
    keep = np.ones(len(pts.x), bool)
    if probe is not None:
        keep &= pts.probe == probe_index(tr, probe)
    if step is not None:
        keep &= pts.step == steps[step_index(tr, steps, step)]
    pts = CasePoints(**{k: v[keep] for k, v in vars(pts).items()})
    if not np.isfinite(pts.x + pts.y).any():
        return "no finite Gram: ⟨a_w,a_l⟩/‖a‖² is undefined for every pair (geometry not recorded?)"
    return pts


def _limits(values: list[np.ndarray], pin: float) -> tuple[float, float]:
    """Axis range covering the bulk (1–99 %) of the finite values, 0 and the threshold `pin` with room."""
    v = np.concatenate([x[np.isfinite(x)] for x in values]) if values else np.zeros(0)
    lo, hi = (np.quantile(v, [0.01, 0.99]) if v.size > 50 else (v.min(), v.max())) if v.size else (0.0, 1.0)
    lo, hi = min(lo, 0.0, pin), max(hi, 0.0, pin)
    pad = 0.12 * (hi - lo or 1.0)
    return float(lo - pad), float(hi + pad)


def _draw_regions(ax: Axes, tx: float, ty: float, flip_x: bool, flip_y: bool) -> None:
    """Threshold lines, the four shaded regions named in their corners, and the |cos| = 1 bound."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    for (right, top), (xa, xb, ya, yb) in {(False, False): (x0, tx, y0, ty), (True, False): (tx, x1, y0, ty),
                                           (False, True): (x0, tx, ty, y1), (True, True): (tx, x1, ty, y1)}.items():
        case = quadrant_case(right, top, flip_x, flip_y)
        ax.fill_between([xa, xb], ya, yb, color=CASE_COLORS[case], alpha=0.09, lw=0, zorder=0)
        ax.text(0.98 if right else 0.02, 0.98 if top else 0.02, CASE_LABELS[case], transform=ax.transAxes,
                ha="right" if right else "left", va="top" if top else "bottom", fontsize=8, color=CASE_COLORS[case],
                fontweight="bold", zorder=5,
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.axvline(tx, color="0.3", lw=1, ls="--", zorder=1)
    ax.axhline(ty, color="0.3", lw=1, ls="--", zorder=1)
    # x·y = cos²(a_w, a_l) ≤ 1 (also in normalized coordinates, since (d_w/d_l)(d_l/d_w) = 1).
    for sign in (1.0, -1.0):
        xs = np.geomspace(1e-3, 1e3, 200) * sign
        ax.plot(xs, 1.0 / xs, color="0.55", lw=0.8, ls=":", zorder=1)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def _flips(pts: CasePoints, coordinates: str) -> tuple[np.ndarray, np.ndarray]:
    """Per point, whether its x and y conditions are swapped by a negative coefficient."""
    return (pts.neg_w, pts.neg_l) if coordinates == "normalized" else (pts.neg_l, pts.neg_w)


def _drawn_flips(pts: CasePoints, coordinates: str) -> tuple[bool, bool]:
    """Regions are drawn for the sign pattern every point shares, else for positive coefficients."""
    fx, fy = _flips(pts, coordinates)
    return (bool(fx.all()) if len(fx) else False), (bool(fy.all()) if len(fy) else False)


def _scatter(ax: Axes, pts: CasePoints, norm: Normalize, trajectory: bool) -> None:
    if trajectory:
        order = np.argsort(pts.step, kind="stable")
        ax.plot(pts.x[order], pts.y[order], color="0.45", lw=0.8, zorder=2)
    for case in np.unique(pts.case):
        sel = pts.case == case
        ax.scatter(pts.x[sel], pts.y[sel], c=pts.step[sel], cmap=STEP_CMAP, norm=norm, gid=f"case-{case}",
                   marker=CASE_MARKERS[int(case)], s=26, edgecolors="white", linewidths=0.4, zorder=3)


@themed
def case_map(traces: Traces, *, probe: str | None = None, step: int | None = None,
             coordinates: Coordinates = "auto") -> Figure:
    """Each (record, pair) at (⟨a_w,a_l⟩/‖a_w‖², ⟨a_w,a_l⟩/‖a_l‖²), coloured by step, marker = its Case.

    Chosen rises iff x ≤ d_w/d_l and rejected falls iff y ≤ d_l/d_w (d_w, d_l > 0; margin-pitfalls
    §3.2, DESIGN §2). "raw" draws the thresholds at their median; "normalized" divides x by d_w/d_l
    and y by d_l/d_w, so every pair's own thresholds sit at 1; "auto" picks raw when the thresholds
    are the same for every point (DPO, IPO, …) and normalized otherwise. Markers give each point's
    recorded Case (from the Δ signs), which stays right where a negative coefficient flips the regions.
    A panel per run; with `probe`, that probe's path through the map.
    """
    with opened_all(traces) as trs:
        panels = [(run_label(tr), _panel_points(tr, probe, step)) for tr in trs]
    data = [p for _, p in panels if isinstance(p, CasePoints)]
    if coordinates == "auto":
        coordinates = "raw" if all(constant(p.t_w) and constant(p.t_l) for p in data) else "normalized"
    if coordinates == "normalized":
        panels = [(label, p if isinstance(p, str) else CasePoints(**{**vars(p), "x": safe_div(p.x, p.t_w),
                                                                     "y": safe_div(p.y, p.t_l)}))
                  for label, p in panels]
        data = [p for _, p in panels if isinstance(p, CasePoints)]
        tx = ty = 1.0
    else:
        tx = median_or(np.concatenate([p.t_w for p in data]) if data else np.ones(1), 1.0)
        ty = median_or(np.concatenate([p.t_l for p in data]) if data else np.ones(1), 1.0)
    fig = new_figure(4.4 * len(panels) + 1.2, 4.6, "Case map: gradient geometry against the loss's thresholds")
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    xlim, ylim = _limits([p.x for p in data], tx), _limits([p.y for p in data], ty)
    all_steps = np.concatenate([p.step for p in data]) if data else np.zeros(1)
    norm = Normalize(float(all_steps.min()), float(all_steps.max()))
    labels = _NORM_LABELS if coordinates == "normalized" else _RAW_LABELS
    for ax, (label, pts) in zip(axes, panels):
        ax.set_title(label)
        if isinstance(pts, str):
            note(ax, pts)
            continue
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        flips = _drawn_flips(pts, coordinates)
        _draw_regions(ax, tx, ty, *flips)
        _scatter(ax, pts, norm, trajectory=probe is not None)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        caveats = _caveats(pts, xlim, ylim, coordinates, tx, ty, flips)
        if caveats:
            footnote(ax, caveats)
    if data:
        _case_legend(fig, {int(c) for p in data for c in np.unique(p.case)})
        if norm.vmax > norm.vmin:
            fig.colorbar(ScalarMappable(norm, STEP_CMAP), ax=list(axes), label="step", shrink=0.8)
    return fig


def _caveats(pts: CasePoints, xlim, ylim, coordinates: str, tx: float, ty: float,
             drawn: tuple[bool, bool]) -> str:
    lines = []
    if coordinates == "raw" and not (constant(pts.t_w) and constant(pts.t_l)):
        lines.append(f"thresholds vary per pair: lines at the median d_w/d_l = {tx:.3g}, d_l/d_w = {ty:.3g}")
    if any(drawn):
        shared = " and ".join(name for name, neg in (("d_w", pts.neg_w), ("d_l", pts.neg_l)) if neg.all())
        lines.append(f"regions drawn for {shared} < 0, the sign every point shares")
    fx, fy = _flips(pts, coordinates)
    other = int(((fx != drawn[0]) | (fy != drawn[1])).sum())
    if other:
        lines.append(f"{other} point(s) with coefficients of other signs: their regions differ (marker = Case)")
    ok = np.isfinite(pts.x) & np.isfinite(pts.y)
    out = int((ok & ((pts.x < xlim[0]) | (pts.x > xlim[1]) | (pts.y < ylim[0]) | (pts.y > ylim[1]))).sum())
    if out:
        lines.append(f"{out} point(s) outside the view")
    if (~ok).sum():
        lines.append(f"{int((~ok).sum())} point(s) undefined (NaN or zero norm)")
    return "\n".join(lines)


def _case_legend(fig: Figure, cases: set[int]) -> None:
    handles = [Line2D([], [], marker=CASE_MARKERS[c], ls="", color="0.4", markersize=6, label=CASE_LABELS[c])
               for c in sorted(cases)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), title="recorded Case (marker)")


@themed
def case_fractions(trace: TraceLike) -> Figure:
    """Fraction of probes in each Case per record (stacked) above the mean log π of every response.

    Cases from the signs of the first-order Δlog π (DESIGN §2); log-probs are sequence sums in nats.
    """
    with opened(trace) as tr:
        label, steps, case, logp, names = run_label(tr), tr.steps, tr.case, finite(tr.logp), tr.names
    title = f"Case fractions and mean log-probs · {label}"
    if not len(steps):
        return message_figure(title, "no records yet")
    fig = new_figure(8.0, 5.8, title)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.2, 1])
    frac = case_shares(case)
    shown = [c for c in (1, 2, 3, 4, 0) if c or frac[:, 0].any()]
    if len(steps) == 1:
        base = 0.0
        for c in shown:
            top.bar(steps, frac[:, c], bottom=base, width=0.8, color=CASE_COLORS[c], label=CASE_LABELS[c])
            base += frac[0, c]
        corner_text(bottom, "one record: no trajectory yet", "lower right")
    else:
        top.stackplot(steps, *(frac[:, c] for c in shown), colors=[CASE_COLORS[c] for c in shown],
                      labels=[CASE_LABELS[c] for c in shown], alpha=0.9)
    top.set_ylim(0, 1)
    top.set_ylabel("fraction of probes")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    colors = response_colors(names)
    for j, name in enumerate(names):
        bottom.plot(steps, nanmean(logp[:, :, j], axis=1), marker="o", ms=3,
                    color=colors[j], label=name)
    bottom.set_ylabel("mean log π(y|x) (nats)")
    bottom.set_xlabel("training step")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="response")
    return fig
