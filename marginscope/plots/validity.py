"""First-order validity: the self view and the actual-update view against the observed Δlog π."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..dynamics.summary import first_order_fit
from ..trace.summary import intervals
from ._data import TraceLike, finite, opened, probe_slice, run_label
from ._style import STEP_CMAP, corner_text, message_figure, new_figure, note, response_colors, themed

NOT_RECORDED = ("actual-update first order not recorded in this trace (a version-2 trace, or the tracker's "
                "update measurement failed; ms.Tracker records it at every record after the first)")
_VIEWS = {
    "self": ("self view",
             "predicted Δlog π per unit learning rate\n(one step on the pair alone, at the start record)"),
    "actual": ("actual update",
               "first order along the actual update (nats)\n½⟨a(θ_start) + a(θ_end), θ_end − θ_start⟩"),
}


def _panel(ax: Axes, x: np.ndarray, y: np.ndarray, colour_step: np.ndarray, norm: Normalize, color: str,
           view: str) -> bool:
    """Scatter of one view against the observed change, its fit through 0 and statistics; False
    (and a note) when there is no finite pair."""
    fit = first_order_fit(x, y)
    if not fit.n:
        note(ax, NOT_RECORDED if view == "actual" and not np.isfinite(x).any() else
             "no finite prediction / observation pair")
        return False
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], y[ok], c=colour_step[ok], cmap=STEP_CMAP, norm=norm, s=18, edgecolors=color, linewidths=0.6)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axvline(0, color="0.5", lw=0.8)
    xs = np.array([x[ok].min(), x[ok].max()])
    if view == "actual":
        ax.plot(xs, xs, color="0.4", ls=":", lw=1.0, label="observed = first order")
    if np.isfinite(fit.slope):
        ax.plot(xs, fit.slope * xs, color=color, lw=1.5, label="fit through 0")
    slope = "η̂" if view == "self" else "slope"
    corner_text(ax, f"{slope} = {fit.slope:.3g}\nr = {fit.r:.2f}\nsign = {fit.sign_agreement:.0%}\nn = {fit.n}")
    ax.legend(loc="lower right", fontsize=7)
    return True


@themed
def first_order(trace: TraceLike, *, probe: str | None = None) -> Figure:
    """How far the first-order pictures explain the observed change, a row per response (DESIGN.md
    §2, §2b): left, the self view recorded at the start record s of each interval,
    Δlog π_i = d_w K[i,w] − d_l K[i,l] (per unit learning rate, one plain step on the pair alone);
    right, the actual-update first order ½⟨a_i(θ_s) + a_i(θ_s+1), θ_s+1 − θ_s⟩ (nats, recorded at
    s+1); both against the observed change log π_i(s+1) − log π_i(s) (nats), coloured by step.

    Lines: the least-squares fit through the origin, observed ≈ slope · view (for the self view η̂, an
    effective learning rate × steps between records; ≈ 1 for the actual update when the first order
    holds, dotted). r is Pearson's correlation and "sign" the share of points whose signs agree (the
    Case's validity); `ms.dynamics.summary.first_order_fit` computes all three. A trace without the
    actual-update view says so in its panels.
    """
    with opened(trace) as tr:
        label, n_records, names = run_label(tr), len(tr.steps), tr.names
        iv = intervals(tr, probe_slice(tr, probe))
    title = f"First-order validity: self view and actual update vs observed Δlog π · {label}" + (
        f" · probe {probe}" if probe else "")
    if n_records < 2:
        return message_figure(title, "no records yet" if not n_records else
                              "needs two records (the observed change is between consecutive records)")
    observed = finite(iv.observed)
    views = {"self": finite(iv.predicted), "actual": finite(iv.actual)}
    colour_step = np.broadcast_to(iv.end[:, None], observed.shape[:2])
    norm = Normalize(float(iv.end[0]), float(iv.end[-1]))
    colors = response_colors(names)
    fig = new_figure(10.0, 3.6 * len(names) + 0.6, title)
    axes = fig.subplots(len(names), 2, squeeze=False)
    drawn = False
    for j, name in enumerate(names):
        for ax, (view, x) in zip(axes[j], views.items()):
            heading, xlabel = _VIEWS[view]
            ax.set_title(f"{name} · {heading}")
            drawn |= _panel(ax, x[..., j], observed[..., j], colour_step, norm, colors[j], view)
            ax.set_xlabel(xlabel)
        axes[j, 0].set_ylabel("observed Δlog π over the interval (nats)")
    if drawn and norm.vmax > norm.vmin:
        fig.colorbar(ScalarMappable(norm, STEP_CMAP), ax=list(axes.ravel()), label="step ending the interval",
                     shrink=0.6)
    return fig
