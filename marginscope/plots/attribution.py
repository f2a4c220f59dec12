"""Who pushed it (DESIGN.md §2b): each training pair's first-order effect on the probes' chosen and
rejected responses, through the optimizer's gradient part on the steps before records."""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..trace.summary import displacers as displacer_table
from ._data import TraceLike, opened, run_label, step_index
from ._style import corner_text, footnote, message_figure, new_figure, themed

_LABELLED = 3  # the most negative pairs on chosen, named on the figure


def _label(d) -> str:
    return d.label or textwrap.shorten(d.chosen.strip() or d.prompt.strip(), 28, placeholder="…")


@themed
def displacers(trace: TraceLike, *, probe: str | None = None, step: int | None = None) -> Figure:
    """Scatter of the training pairs: x the effect on chosen, y on rejected (nats; the probe `probe`'s,
    or every probe's summed), over the attributed step `step` (None: all, summed per pair); colour the
    pair's own gradient cosine cos(a_w, a_l) at its last attributed step. Pairs left of 0 pulled the
    chosen responses down; the three that did most are named. A note when nothing was attributed (at
    `step`, when given: a recorded step without attribution, e.g. step 0); an unrecorded step raises."""
    with opened(trace) as tr:
        title = f"Who pushed it — {run_label(tr)}" + (f" · probe {probe}" if probe else " · all probes")
        if not len(tr.steps):
            return message_figure(title, "no records yet")
        if step is not None:
            step_index(tr, tr.steps, step)  # a step that is not recorded: the one-line error of every figure
            inrun = tr.inrun()
            if not np.isfinite(inrun["probe_effect"][inrun["step"] == step]).all(axis=(1, 2)).any():
                # a recorded step without attribution (step 0, an optimizer without split, attribution off):
                # `marginscope plot/report --step S` draws the other figures at S, this one says so
                return message_figure(title + f" · step {step}", f"no per-pair attribution at step {step} (the "
                                      "optimizer step before a record, with in-run pairs and the attribution on: "
                                      "see docs/tracking.md)")
        rows = displacer_table(tr, probe=probe, step=step, n=1 << 30)
        if not rows:
            return message_figure(title, "no per-pair attribution in this trace (it needs the optimizer, in-run "
                                         "pairs and the attribution on: see docs/tracking.md)")
    x = np.array([d.effect for d in rows])
    y = np.array([d.effect_other for d in rows])
    c = np.array([d.cosine for d in rows])
    fig = new_figure(7.0, 5.2, title)
    ax = fig.add_subplot()
    norm = Normalize(-1, 1)
    points = ax.scatter(x, y, c=np.nan_to_num(c), cmap="vlag", norm=norm, s=28, edgecolor="0.3", linewidth=0.4)
    fig.colorbar(points, ax=ax, label="pair's own cos(a_w, a_l)")
    ax.axvline(0, color="0.5", lw=0.8)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("effect on chosen log π (nats)")
    ax.set_ylabel("effect on rejected log π (nats)")
    for d in rows[:_LABELLED]:
        if d.effect < 0:
            ax.annotate(_label(d), (d.effect, d.effect_other), xytext=(4, 4), textcoords="offset points", fontsize=7.5)
    pulled = int((x < 0).sum())
    corner_text(ax, f"{len(rows)} training pairs; {pulled} pulled chosen down\n"
                    f"sum on chosen {x.sum():+.3g}, on rejected {y.sum():+.3g}", loc="upper right")
    footnote(ax, "first order of the optimizer's gradient part on the step before each record, split by "
                 "training pair: κ⟨a_i, c_t ⊙ g_j⟩ (momentum and weight decay are not split by pair)")
    return fig
