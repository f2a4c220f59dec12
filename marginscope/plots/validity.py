"""First-order validity: predicted against observed Δlog π, per response."""

from __future__ import annotations

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..dynamics.summary import first_order_fit
from ._data import TraceLike, finite, opened, probe_slice, run_label
from ._style import STEP_CMAP, corner_text, message_figure, new_figure, note, response_colors, themed


@themed
def first_order(trace: TraceLike, *, probe: str | None = None) -> Figure:
    """Predicted Δlog π_i = d_w K[i,w] − d_l K[i,l] at record s (per unit learning rate, one step on
    the pair alone; DESIGN §2) against the observed change from record s to s+1, one panel per response.

    The line is the least-squares fit through the origin, observed ≈ η̂ · predicted (η̂ = Σpo/Σp², an
    effective learning rate × steps between records); r is Pearson's correlation and "sign" the
    fraction of points whose predicted and observed changes have the same sign (the Case's validity).
    """
    with opened(trace) as tr:
        label, steps, names = run_label(tr), tr.steps, tr.names
        sel = probe_slice(tr, probe)
        predicted, observed = finite(tr.predicted_delta[:, sel]), finite(tr.observed_delta[:, sel])
    title = f"First-order validity: predicted vs observed Δlog π · {label}" + (f" · probe {probe}" if probe else "")
    if len(steps) < 2:
        return message_figure(title, "no records yet" if not len(steps) else
                              "needs two records (the observed change is between consecutive records)")
    pred, obs = predicted[:-1], observed[1:]  # prediction at record s, change s → s+1
    colour_step = np.broadcast_to(steps[1:, None], pred.shape[:2])
    norm = Normalize(float(steps[1]), float(steps[-1]))
    colors = response_colors(names)
    fig = new_figure(4.0 * len(names) + 1.2, 4.2, title)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    drawn = False
    for j, (ax, name) in enumerate(zip(axes, names)):
        ax.set_title(name)
        p, o = pred[:, :, j], obs[:, :, j]
        fit = first_order_fit(p, o)
        if not fit.n:
            note(ax, "no finite prediction / observation pair")
            continue
        ok = np.isfinite(p) & np.isfinite(o)
        drawn = True
        ax.scatter(p[ok], o[ok], c=colour_step[ok], cmap=STEP_CMAP, norm=norm, s=18, edgecolors=colors[j],
                   linewidths=0.6)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.axvline(0, color="0.5", lw=0.8)
        if np.isfinite(fit.slope):
            xs = np.array([p[ok].min(), p[ok].max()])
            ax.plot(xs, fit.slope * xs, color=colors[j], lw=1.5)
        corner_text(ax, f"η̂ = {fit.slope:.3g}\nr = {fit.r:.2f}\nsign = {fit.sign_agreement:.0%}\nn = {fit.n}")
        ax.set_xlabel("predicted Δlog π per unit learning rate")
        ax.set_ylabel("observed Δlog π to the next record (nats)")
    if drawn and norm.vmax > norm.vmin:
        fig.colorbar(ScalarMappable(norm, STEP_CMAP), ax=list(axes), label="step of the observation", shrink=0.85)
    return fig
