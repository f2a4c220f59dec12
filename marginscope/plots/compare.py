"""Several runs (e.g. one per loss) on the same axes."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ._data import Traces, case_shares, finite, nanmean, opened_all, pair_cosine, run_label
from ._style import new_figure, run_colors, themed


@themed
def compare_runs(traces: Traces) -> Figure:
    """Runs side by side on shared axes: mean log π of chosen (solid) and rejected (dashed), mean
    cos(a_w, a_l), the fractions of probes in Case 1 (solid) and Case 2 (dashed), and the mean
    change of the margin log π_w − log π_l since each run's first record."""
    with opened_all(traces) as trs:
        runs = []
        for tr in trs:
            names = tr.names
            w, l = names.index("chosen"), names.index("rejected")
            logp = finite(tr.logp)
            runs.append({"label": run_label(tr), "steps": tr.steps, "w": logp[:, :, w], "l": logp[:, :, l],
                         "cos": pair_cosine(tr.gram, w, l), "frac": case_shares(tr.case)})
    fig = new_figure(11.5, 7.4, f"Comparison of {len(runs)} run(s)")
    (ax_lp, ax_cos), (ax_case, ax_margin) = fig.subplots(2, 2, sharex=True)
    for run, color in zip(runs, run_colors(len(runs))):
        s = run["steps"]
        ax_lp.plot(s, nanmean(run["w"], axis=1), color=color, marker="o", ms=3)
        ax_lp.plot(s, nanmean(run["l"], axis=1), color=color, marker="o", ms=3, ls="--")
        ax_cos.plot(s, nanmean(run["cos"], axis=1), color=color, marker="o", ms=3)
        ax_case.plot(s, run["frac"][:, 1], color=color, marker="o", ms=3)
        ax_case.plot(s, run["frac"][:, 2], color=color, marker="o", ms=3, ls="--")
        margin = run["w"] - run["l"]
        ax_margin.plot(s, nanmean(margin - margin[:1], axis=1) if len(s) else np.zeros(0), color=color,
                       marker="o", ms=3)
    ax_lp.set_ylabel("mean log π(y|x) (nats)")
    ax_lp.set_title("chosen (solid) and rejected (dashed)")
    ax_cos.set_ylabel(r"mean $\cos(a_w, a_l)$")
    ax_cos.set_title("gradient cosine")
    ax_case.set_ylabel("fraction of probes")
    ax_case.set_ylim(-0.03, 1.03)
    ax_case.set_title("Case 1: chosen ↑ rejected ↓ (solid), Case 2: both ↓ (dashed)")
    ax_margin.set_ylabel("mean Δ(log π_w − log π_l) (nats)")
    ax_margin.set_title("margin change since the first record")
    ax_margin.axhline(0, color="0.5", lw=0.8)
    for ax in (ax_case, ax_margin):
        ax.set_xlabel("training step")
    handles = [Line2D([], [], color=c, marker="o", ms=3, label=r["label"]) for r, c in zip(runs, run_colors(len(runs)))]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 4), title="run")
    return fig
