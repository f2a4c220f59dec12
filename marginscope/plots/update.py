"""What actually happened (DESIGN.md §2b): why each response moved over every interval between
records, and which positions of chosen and rejected the update moved."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..trace.summary import intervals
from ._data import (TraceLike, differing_tokens, finite, load_tokenizer_like, nanmean, opened, position_regions,
                    probe_index, probe_slice, response_token_labels, run_label, step_index, update_segments)
from ._style import corner_text, footnote, message_figure, new_figure, response_colors, themed
from .tokens import DIFF_COLOR, token_ticks
from .validity import NOT_RECORDED

# Legend text and colour of each share of the observed change (`_data.update_segments`).
SEGMENTS = {
    "gradient": ("last step: gradient (this batch, preconditioned)", "#4e79a7"),
    "momentum": ("last step: momentum (earlier batches)", "#a0cbe8"),
    "weight_decay": ("last step: weight decay", "#b07aa1"),
    "residual": ("last step: rounding residual", "#d4a6c8"),
    "last_step": ("last step (split unavailable)", "#86bcb6"),
    "rest": ("rest of the first order: earlier steps, trapezoid correction", "#8cd17d"),
    "curvature": ("curvature: observed − first order", "#bab0ac"),
}
_REST_ALONE = "first order along the update (its last step not captured: no optimizer given)"


def _segment(name: str) -> tuple[str, str]:
    """Legend text and colour of a share (a step part the table does not name: its name, grey)."""
    return SEGMENTS.get(name, (f"last step: {name}", "#79706e"))


def _stacked(ax: Axes, x: np.ndarray, width: float, shares: dict[str, np.ndarray]) -> list[str]:
    """Signed stacked bars [S'] per share (positive shares up from 0, negative ones down); the
    shares drawn (those not 0 everywhere)."""
    up, down = np.zeros(len(x)), np.zeros(len(x))
    drawn = []
    for name, values in shares.items():
        v = np.nan_to_num(values)
        if not np.any(v):
            continue
        bottom = np.where(v >= 0, up, down)
        ax.bar(x, v, width, bottom=bottom, color=_segment(name)[1], label=name, lw=0)
        up, down = up + np.clip(v, 0, None), down + np.clip(v, None, 0)
        drawn.append(name)
    return drawn


@themed
def why_moved(trace: TraceLike, *, probe: str | None = None) -> Figure:
    """Why each response's log-prob moved, a panel per response: over every interval between records
    (bars at the step ending it), the observed Δlog π (nats, black) as the exact sum of (DESIGN.md §2b)

        the last optimizer step's parts ⟨a(θ_t), part⟩ (gradient, momentum, weight decay, rounding
        residual: `tr.step_parts`; unsplit `tr.step_delta` when the optimizer cannot be split)
      + the rest of the first order, actual_delta − step_delta (the interval's earlier steps and the
        trapezoid's correction ½⟨a(θ_prev) − a(θ_now), Δθ⟩)
      + the curvature residual, observed − actual_delta,

    averaged over the probes (over the points where observed and actual_delta are finite), or of one
    probe with `probe`. The step parts cover the last step of each interval only, not the whole
    interval, when records are more than one step apart.
    """
    with opened(trace) as tr:
        label, n_records, names = run_label(tr), len(tr.steps), tr.names
        sel = probe_slice(tr, probe)
        iv = intervals(tr, sel)
        n_probes = len(tr.probe_ids[sel])
        split = tr.metadata.get("step_split")
    scope = f"probe {probe}" if probe else f"mean over {n_probes} probes"
    title = f"Why did it move: the observed Δlog π split by the update · {label} · {scope}"
    if n_records < 2:
        return message_figure(title, "no records yet" if not n_records else
                              "needs two records (the observed change is between consecutive records)")
    shares, valid = update_segments(iv)
    means = {name: nanmean(v, axis=1) for name, v in shares.items()}  # [S−1, R]
    observed = nanmean(np.where(valid, finite(iv.observed), np.nan), axis=1)
    observed_all = nanmean(finite(iv.observed), axis=1)
    lengths = iv.end - iv.start  # optimizer steps per interval
    width = 0.8 * float(max(np.min(np.diff(iv.end)) if len(iv.end) > 1 else lengths[0], 1))
    captured = np.isfinite(finite(iv.step_delta)).any()
    colors = response_colors(names)
    fig = new_figure(11.0, 2.9 * len(names) + 1.0, title)
    axes = fig.subplots(len(names), 1, squeeze=False, sharex=True)[:, 0]
    drawn: set[str] = set()
    for j, (ax, name) in enumerate(zip(axes, names)):
        ax.set_title(name, color=colors[j])
        ax.axhline(0, color="0.5", lw=0.8)
        if valid[..., j].any():
            drawn |= set(_stacked(ax, iv.end, width, {k: v[:, j] for k, v in means.items()}))
            ax.plot(iv.end, observed[:, j], color="black", marker="o", ms=3.5, lw=1.2, label="observed")
        elif np.isfinite(observed_all[:, j]).any():
            ax.plot(iv.end, observed_all[:, j], color="black", marker="o", ms=3.5, lw=1.2, label="observed")
            corner_text(ax, "not explained: no interval where both the observed change and the first order are finite")
        else:  # a corner text, not a note: the panels share their x axis
            corner_text(ax, "no finite observed change")
        ax.set_ylabel("Δlog π (nats)")
    axes[-1].set_xlabel("step ending the interval")
    handles = [Line2D([], [], color="black", marker="o", ms=3.5, lw=1.2, label="observed Δlog π over the interval"
                      + (" (= sum of the bars)" if drawn else ""))]
    handles += [Patch(color=_segment(k)[1], label=_REST_ALONE if k == "rest" and not captured else _segment(k)[0])
                for k in shares if k in drawn]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=7.5)
    caveat = ("Each interval is one optimizer step: the step parts cover it, and the rest is the trapezoid's "
              "correction." if np.all(lengths == 1) else
              "The step parts cover only the last optimizer step of each interval, not the whole interval "
              "(records are more than one step apart); the earlier steps are in the rest of the first order.")
    if not np.isfinite(finite(iv.actual)).any():
        caveat = f"Not explained: {NOT_RECORDED}."
    footnote(axes[-1], f"{caveat} Optimizer split: {split or 'not recorded'}.")
    return fig


@themed
def token_update(trace: TraceLike, *, probe: str | None = None, step: int | None = None,
                 tokenizer: Any | None = None) -> Figure:
    """Which positions the update moved, for one probe (default: the first whose per-token
    actual-update change is recorded) over the interval ending at `step` (default: the last record):
    at every position t of chosen and rejected, the actual-update first order of log π(y_t | x, y_<t)
    (bars, nats; `tr.actual_token_delta` [S, N, R, T], the trapezoid rule of DESIGN.md §2b per token)
    and the observed change of the token's log-prob (dots). The tokens that make the two responses
    differ (`differing_tokens`) are shaded, their labels bold red; the corner gives the sums before, at
    and after them (the positions of margin-pitfalls Theorem 3). Tokens are decoded with `tokenizer`
    (object or directory), else with the token texts the trace stores, else shown as ids."""
    with opened(trace) as tr:
        tokenizer = load_tokenizer_like(tokenizer, tr)
        label, steps, names = run_label(tr), tr.steps, tr.names
        token = finite(tr.actual_token_delta)
        with_data = [n for n in range(token.shape[1]) if np.isfinite(token[:, n]).any()]
        title = f"Per-position update · {label}"
        if len(steps) < 2:
            return message_figure(title, "no records yet" if not len(steps) else
                                  "needs two records (the update is between consecutive records)")
        if probe is None and not with_data:
            return message_figure(title, NOT_RECORDED)
        n = probe_index(tr, probe, default=with_data[0] if with_data else 0)
        s = step_index(tr, steps, step)
        rs = [names.index("chosen"), names.index("rejected")]
        diffs = differing_tokens(tr.input_ids(n, rs[0])[1], tr.input_ids(n, rs[1])[1])
        labels = [response_token_labels(tr, n, r, tokenizer) for r in rs]
        token_logp = finite(tr.token_logp[:, n])
        probe_id = tr.probe_ids[n]
    observed = token_logp[s] - token_logp[s - 1] if s else np.full_like(token_logp[s], np.nan)
    start = f"step {steps[s - 1]} → " if s else ""
    fig = new_figure(11.0, 7.2, f"{title} · probe {probe_id} · {start}step {steps[s]}")
    colors = response_colors(names)
    for ax, r, diff, tick_labels in zip(fig.subplots(2, 1), rs, diffs, labels):
        length = len(tick_labels)
        pos = np.arange(length)
        values = token[s, n, r, :length]
        ax.set_title(f"{names[r]} of probe {probe_id}")
        for t in np.flatnonzero(diff):
            ax.axvspan(t - 0.5, t + 0.5, color=DIFF_COLOR, alpha=0.08, lw=0)
        ax.axhline(0, color="0.5", lw=0.8)
        if np.isfinite(values).any():
            ax.bar(pos, np.nan_to_num(values), 0.7, color=colors[r], label="first order along the actual update")
            regions = position_regions(diff)
            sums = [np.nansum(np.where(regions == k, values, np.nan)) for k in range(3)]
            corner_text(ax, f"Σ before the differing tokens: {sums[0]:+.3g}\nΣ at the differing tokens: "
                            f"{sums[1]:+.3g}\nΣ after them: {sums[2]:+.3g} nats", "upper right")
        else:
            corner_text(ax, "no actual-update change at this record (the first record, or not recorded)")
        if np.isfinite(observed[r, :length]).any():
            ax.plot(pos, observed[r, :length], "o", color="black", ms=4, label="observed Δlog π(y_t)")
        token_ticks(ax, "x", tick_labels, diff, True)
        ax.set_xlim(-0.6, length - 0.4)
        ax.set_ylabel("Δlog π(y_t | x, y_<t) (nats)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=7.5)
    fig.supxlabel("shaded, bold red: tokens that differ between chosen and rejected", fontsize=7.5, color="0.35")
    return fig
