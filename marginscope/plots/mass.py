"""Where the probability mass goes: log π of y_w, y_l and the top output y* over steps (bilevel
Fig. 2a), per-position argmax and target probabilities, and the tokens that gained the most."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._data import (TraceLike, finite, load_tokenizer_like, nanmean, opened, probe_index, response_token_labels,
                    run_label, step_index, token_text, topk_gains)
from ._style import corner_text, message_figure, new_figure, note, response_colors, themed

_TOP_TOKENS = 10
_ANNOTATE_MAX_T = 30


def _delta_panel(ax: Axes, steps: np.ndarray, logp: np.ndarray, names: list[str], colors: list[str],
                 scope: str) -> None:
    """Mean Δlog π(y|x) since the first record for every response (y* = "top" drawn thick)."""
    delta = nanmean(logp - logp[:1], axis=1)
    for j, name in enumerate(names):
        shown = {"chosen": "$y_w$ (chosen)", "rejected": "$y_l$ (rejected)", "top": "$y^*$ (top)"}.get(name, name)
        ax.plot(steps, delta[:, j], color=colors[j], marker="o", ms=3, lw=2.4 if name == "top" else 1.6, label=shown)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"mean Δlog π(y|x) since step {steps[0]} (nats)")
    ax.set_title(f"(a) log-prob change, {scope}")
    ax.legend(loc="best", fontsize=7.5)
    if "top" not in names:
        corner_text(ax, "no 'top' response in this probe set: y* not shown", "lower left")


def _position_panel(ax: Axes, tr_data: dict, r: int, s0: int, s1: int, color: str, tokenizer: Any,
                    title: str) -> None:
    """π(argmax) and π(target) at every position of response r (log scale), first vs later record;
    positions whose argmax token changed are labelled with the new one."""
    length = int(tr_data["lengths"][r])
    pos = np.arange(length)
    target = np.exp(tr_data["token_logp"][:, r, :length])
    top = tr_data["topk_prob"][:, r, :length, 0].astype(np.float64)
    steps = tr_data["steps"]
    for s, ls, alpha in ((s0, "--", 0.6), (s1, "-", 1.0)):
        ax.plot(pos, top[s], color="0.2", ls=ls, marker=".", alpha=alpha, label=f"π(argmax), step {steps[s]}")
        ax.plot(pos, target[s], color=color, ls=ls, marker=".", alpha=alpha, label=f"π(target), step {steps[s]}")
    ax.set_xticks(pos, tr_data["labels"][r], rotation=90, fontsize=7.5)
    argmax = tr_data["topk_ids"][:, r, :length, 0]
    if length <= _ANNOTATE_MAX_T:
        for t in np.flatnonzero(argmax[s1] != argmax[s0]):
            if np.isfinite(top[s1, t]) and top[s1, t] > 0:
                ax.annotate(token_text(int(argmax[s1, t]), tokenizer), (t, top[s1, t]), xytext=(0, 5),
                            textcoords="offset points", ha="center", fontsize=6.5, color="0.2", rotation=60)
    values = np.concatenate([top[[s0, s1]].ravel(), target[[s0, s1]].ravel()])
    values = values[np.isfinite(values) & (values > 0)]
    ax.set_yscale("log")
    ax.set_ylim(max(float(values.min()) / 3, 1e-12) if values.size else 1e-4, 3.0)
    ax.set_ylabel("probability (log scale)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=6.5, ncols=2)


def _gains_panel(ax: Axes, tr_data: dict, s0: int, s1: int, tokenizer: Any, probe_id: str) -> None:
    """The tokens whose top-k probability, summed over the probe's positions, rose the most."""
    ax.set_title(f"(b) tokens gaining probability, probe {probe_id}")
    if s0 == s1:
        note(ax, "one record: nothing to compare yet")
        return
    gains = topk_gains(tr_data["topk_ids"][s0], tr_data["topk_prob"][s0], tr_data["topk_ids"][s1],
                       tr_data["topk_prob"][s1])
    best = sorted(((g, t) for t, g in gains.items() if g > 0), reverse=True)[:_TOP_TOKENS]
    if not best:
        note(ax, "no token gained probability within the recorded top-k")
        return
    values = [g for g, _ in best][::-1]
    labels = [token_text(t, tokenizer) for _, t in best][::-1]
    ax.barh(np.arange(len(best)), values, color="#59a14f")
    ax.set_yticks(np.arange(len(best)), labels)
    ax.set_xlabel(r"$\sum_{\mathrm{positions}}\ \Delta\pi(v)$ within the top-k (all responses)")
    ax.grid(axis="y", visible=False)


@themed
def mass_shift(trace: TraceLike, *, probe: str | None = None, step: int | None = None,
               tokenizer: Any | None = None) -> Figure:
    """(a) mean Δlog π of y_w, y_l and y* since the first record (bilevel Thm 2 / Fig. 2a: when π_w
    and π_l both fall the mass flows mainly to y*); for one probe (default: the first), between the
    first record and `step` (default: the last): (b) the tokens whose top-k probability rose the most,
    summed over positions; (c, d) π(argmax) and π(target) at each position of chosen and rejected
    (teacher forcing)."""
    with opened(trace) as tr:
        tokenizer = load_tokenizer_like(tokenizer, tr)
        label, steps, names = run_label(tr), tr.steps, tr.names
        n = probe_index(tr, probe)
        s1 = step_index(tr, steps, step) if len(steps) else 0
        scope = f"probe {probe}" if probe else "all probes"
        logp = finite(tr.logp)[:, [n]] if probe else finite(tr.logp)
        data = {"steps": steps, "lengths": tr.lengths[n], "token_logp": finite(tr.token_logp[:, n]),
                "topk_ids": tr.topk_ids[:, n], "topk_prob": finite(tr.topk_prob[:, n]),
                "labels": [response_token_labels(tr, n, r, tokenizer) for r in range(len(names))]}
        probe_id = tr.probe_ids[n]
    title = f"Mass shift · {label}"
    if not len(steps):
        return message_figure(title, "no records yet")
    colors = response_colors(names)
    fig = new_figure(12.0, 8.4, f"{title} · step {steps[0]} → {steps[s1]}")
    (ax_a, ax_b), (ax_c, ax_d) = fig.subplots(2, 2)
    _delta_panel(ax_a, steps[:s1 + 1], logp[:s1 + 1], names, colors, scope)
    for ax, name, tag in ((ax_c, "chosen", "c"), (ax_d, "rejected", "d")):
        r = names.index(name)
        _position_panel(ax, data, r, 0, s1, colors[r], tokenizer, f"({tag}) per position, {name} of probe {probe_id}")
    _gains_panel(ax_b, data, 0, s1, tokenizer, probe_id)
    return fig
