"""What `marginscope inspect` and the report print: a trace's run, its records, its in-run rows and
how well each view of the update explains what happened, in a few numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..dynamics.summary import (case_agreement, case_fractions, finite_mean, first_order_fit, inrun_summary,
                                record_summary)
from .schema import Trace


@dataclass(frozen=True)
class Intervals:
    """The views of every interval between consecutive records, aligned: interval k runs from record
    k to record k+1 (k = 0..S−2). Arrays [S−1, N, R] in nats unless said, Cases int8 [S−1, N]
    (DESIGN.md §2 and §2b; NaN / Case 0 where a view was not recorded)."""

    start: np.ndarray  # int64 [S−1] step of the record opening each interval
    end: np.ndarray  # int64 [S−1] step of the record closing it
    predicted: np.ndarray  # self view at the start: d_w K[i,w] − d_l K[i,l], per unit learning rate
    observed: np.ndarray  # log π(end) − log π(start)
    actual: np.ndarray  # ½⟨a(θ_start) + a(θ_end), θ_end − θ_start⟩ (trapezoid first order)
    step_delta: np.ndarray  # ⟨a(θ_t), θ_t − θ_{t−1}⟩ of the last optimizer step of the interval
    step_parts: dict[str, np.ndarray]  # step_delta split by the optimizer's formula (+ "residual")
    case_self: np.ndarray  # self-view Case at the start record
    case_observed: np.ndarray  # Case by the signs of `observed`
    case_actual: np.ndarray  # Case by the signs of `actual`


def intervals(trace: Trace, probes: slice = slice(None)) -> Intervals:
    """The aligned views of `trace`'s intervals for the probes `probes` (a slice of the probe axis):
    the self view at each interval's start record, the observed change and the actual-update first
    order recorded at its end record, and the last step's delta and parts recorded there."""
    steps = trace.steps

    def end(a: np.ndarray) -> np.ndarray:  # recorded at the interval's closing record
        return a[1:, probes]

    return Intervals(start=steps[:-1], end=steps[1:], predicted=trace.predicted_delta[:-1, probes],
                     observed=end(trace.observed_delta), actual=end(trace.actual_delta),
                     step_delta=end(trace.step_delta), step_parts={k: end(v) for k, v in trace.step_parts.items()},
                     case_self=trace.case[:-1, probes], case_observed=end(trace.case_observed),
                     case_actual=end(trace.case_actual))


def agreement(iv: Intervals, names: list[str]) -> dict[str, Any]:
    """How well each view explains the observed change over the whole run (DESIGN.md §2b): per
    response, `first_order_fit` of the self view (at each interval's start) and of the actual-update
    first order against the observed change ("fits": slope, r, sign_agreement, n; the self view's slope
    is per unit learning rate, the actual one's ≈ 1 when the first order holds); the Case shares of the
    three views over the (interval, probe) pairs ("cases"); and how often their Cases agree
    ("case_agreement", over the pairs determined in both). Empty with fewer than two records."""
    if not len(iv.end):
        return {}
    fits = {name: {"self": asdict(first_order_fit(iv.predicted[..., j], iv.observed[..., j])),
                   "actual": asdict(first_order_fit(iv.actual[..., j], iv.observed[..., j]))}
            for j, name in enumerate(names)}
    views = {"self": iv.case_self, "observed": iv.case_observed, "actual": iv.case_actual}
    cases = {view: {**{f"case{c}_frac": f for c, f in case_fractions(case).items()},
                    "undetermined_frac": float(np.mean(case == 0)) if case.size else float("nan")}
             for view, case in views.items()}
    agree = {"self_observed": case_agreement(iv.case_self, iv.case_observed),
             "actual_observed": case_agreement(iv.case_actual, iv.case_observed),
             "self_actual": case_agreement(iv.case_self, iv.case_actual)}
    return {"intervals": len(iv.end), "actual_recorded": bool(np.isfinite(iv.actual).any()), "fits": fits,
            "cases": cases, "case_agreement": agree}


def _num(value: float, spec: str) -> str:
    return format(value, spec) if np.isfinite(value) else "–"


_VIEW_LABELS = {"self": "self view (one step on the pair alone)", "observed": "observed change",
                "actual": "actual update (first order)"}
_AGREE_LABELS = {"self_observed": "self view & observed", "actual_observed": "actual update & observed",
                 "self_actual": "self view & actual update"}


def agreement_tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The agreement summary (`agreement`) as (title, header, rows, caption) tables of formatted
    text, printed alike by `marginscope inspect` and the report; none when it is empty."""
    if not summary:
        return []
    fit_rows = [[name, _VIEW_LABELS[view], _num(fit["r"], "+.2f"), _num(fit["slope"], ".3g"),
                 _num(fit["sign_agreement"], ".0%"), str(fit["n"])]
                for name, by_view in summary["fits"].items() for view, fit in by_view.items()]
    fit_caption = (f"over {summary['intervals']} interval(s) between records: the self view at each interval's start "
                   "record (slope per unit learning rate) and the actual-update first order at its end (slope ≈ 1 "
                   "when the first order holds), each against the observed change; sign: share of agreeing signs")
    if not summary["actual_recorded"]:
        fit_caption += ("; the actual-update view is not recorded in this trace (a version-2 trace, or the "
                        "tracker's update measurement failed)")
    case_rows = [[_VIEW_LABELS[view], *(_num(shares[f"case{c}_frac"], ".2f") for c in (1, 2, 3, 4)),
                  _num(shares["undetermined_frac"], ".2f")] for view, shares in summary["cases"].items()]
    agree_rows = [[_AGREE_LABELS[k], _num(v, ".0%")] for k, v in summary["case_agreement"].items()]
    return [("first order against the observed change", ["response", "view", "r", "slope", "sign", "points"],
             fit_rows, fit_caption),
            ("Cases of the three views", ["view", "Case 1", "Case 2", "Case 3", "Case 4", "undetermined"], case_rows,
             "shares of the (interval, probe) pairs; the self view at each interval's start record"),
            ("Cases agree", ["views", "agree"], agree_rows,
             "share of the (interval, probe) pairs, over those whose Cases both views determine")]


@dataclass
class TraceSummary:
    """Run metadata, one row of scalars per record, in-run totals and the first→last trend."""

    path: str
    metadata: dict[str, Any]
    names: list[str]
    n_probes: int
    top_k: int
    records: list[dict[str, float]]  # step, cosine_mean, case{1..4}_frac, logp_<name>_mean, nonfinite
    inrun: dict[str, float] = field(default_factory=dict)  # rows, steps, inrun_cosine_mean, inrun_case…
    trend: dict[str, float] = field(default_factory=dict)  # Δ mean log-prob per response, first → last
    agreement: dict[str, Any] = field(default_factory=dict)  # see `agreement`: fits, cases, case_agreement


def summarize(trace: Trace) -> TraceSummary:
    """Summaries of every record of `trace` (see `ms.dynamics.summary.record_summary`) and the
    agreement of the views over the run (`agreement`)."""
    steps, logp, gram, case, flags = trace.steps, trace.logp, trace.gram, trace.case, trace.nonfinite
    names = trace.names
    records = []
    for s, step in enumerate(steps):
        row = {"step": int(step), **record_summary(names, logp[s], gram[s], case[s]),
               "nonfinite": int(flags[s].sum())}
        records.append(row)
    trend = {}
    if len(steps) > 1:
        trend = {name: finite_mean(logp[-1, :, j] - logp[0, :, j]) for j, name in enumerate(names)}
    rows = trace.inrun()
    inrun = {}
    if len(rows["step"]):
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = rows["inner"] / np.sqrt(rows["sq_w"] * rows["sq_l"])
        attributed = np.isfinite(rows["probe_effect"]).all(axis=(1, 2))
        inrun = {"rows": len(rows["step"]), "steps": len(np.unique(rows["step"])),
                 **inrun_summary(cosine, rows["case"]), "attributed_rows": int(attributed.sum()),
                 "attributed_steps": len(np.unique(rows["step"][attributed]))}
    return TraceSummary(str(trace.path), trace.metadata, names, len(trace.probe_ids), trace.top_k,
                        records, inrun, trend, agreement(intervals(trace), names))


@dataclass(frozen=True)
class Displacer:
    """One training pair's share of the attributed steps' gradient part on the probes (nats, summed
    over the steps it was attributed at): `effect` on the response asked for (one probe's, or every
    probe's summed), `effect_other` on the other of chosen/rejected, `share` = effect / Σ_pairs |effect|
    (signed; the shares' absolute values add up to 1 over all pairs); `cosine` and `case` of the pair
    itself at its last attributed step; `steps` the steps it was attributed at; `pair` its index in its step's batch (the
    trace's `pair` column) at the last of them."""

    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    effect: float
    effect_other: float
    share: float
    cosine: float
    case: int
    steps: tuple[int, ...]
    pair: int = -1

    @property
    def anonymous(self) -> bool:
        """Recorded without id or texts (a loop that gave `in_run` no `examples`): one row of one step."""
        return not (self.pair_id or self.prompt or self.chosen or self.rejected)

    @property
    def label(self) -> str:
        """Its id; "" when it has texts but no id; "step S pair P" when it has neither."""
        return self.pair_id or (f"step {self.steps[-1]} pair {self.pair}" if self.anonymous else "")


def displacers(trace: Trace, *, probe: str | None = None, response: str = "chosen", step: int | None = None,
               n: int = 10) -> list[Displacer]:
    """The training pairs that pushed `response` down the most (DESIGN.md §2b, "Who pushed it"), most
    negative effect first: each pair's `probe_effect` on probe `probe` (None: on every probe's
    `response`, summed), over the attributed step `step` (None: every attributed step, a pair seen at
    several summed). A pair is identified by its id, else by its texts; a row with neither (no `examples`
    given to `in_run`) is a pair of its own, not summed with any other. Empty when the trace holds no
    attribution. Raises MarginscopeError for an unknown probe, response or step."""
    from ..errors import MarginscopeError

    names = trace.names
    if response not in names or response not in ("chosen", "rejected"):
        raise MarginscopeError(f"{trace.path}: response {response!r} is not chosen or rejected")
    rows = trace.inrun()
    attributed = np.isfinite(rows["probe_effect"]).all(axis=(1, 2)) if len(rows["step"]) else np.zeros(0, bool)
    if step is not None:
        if not (attributed & (rows["step"] == step)).any():
            known = sorted(set(rows["step"][attributed].tolist()))
            raise MarginscopeError(f"{trace.path}: no attributed training step {step} (attributed steps: "
                                   f"{', '.join(map(str, known)) or 'none'})")
        attributed &= rows["step"] == step
    if not attributed.any():
        return []
    ids = trace.probe_ids
    if probe is not None and probe not in ids:
        raise MarginscopeError(f"{trace.path}: no probe {probe!r}")
    picked = slice(None) if probe is None else slice(ids.index(probe), ids.index(probe) + 1)
    w, l = names.index(response), names.index("rejected" if response == "chosen" else "chosen")
    effect = rows["probe_effect"][attributed][:, picked]
    mine, other = effect[:, :, w].sum(1), effect[:, :, l].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = rows["inner"][attributed] / np.sqrt(rows["sq_w"][attributed] * rows["sq_l"][attributed])
    groups: dict[tuple, list[int]] = {}
    text = {k: rows[k][attributed] for k in ("pair_id", "prompt", "chosen", "rejected")}
    steps, rank, index = rows["step"][attributed], rows["rank"][attributed], rows["pair"][attributed]
    for k in range(len(mine)):
        texts = (text["prompt"][k], text["chosen"][k], text["rejected"][k])
        key = ((text["pair_id"][k],) if text["pair_id"][k] else ("", *texts) if any(texts)
               else ("", int(steps[k]), int(rank[k]), int(index[k])))  # anonymous: this row alone
        groups.setdefault(key, []).append(k)
    total = sum(abs(float(mine[members].sum())) for members in groups.values())
    out = []
    for members in groups.values():
        last = members[int(np.argmax(steps[members]))]
        e = float(mine[members].sum())
        out.append(Displacer(str(text["pair_id"][last]), str(text["prompt"][last]), str(text["chosen"][last]),
                             str(text["rejected"][last]), e, float(other[members].sum()),
                             e / total if total else float("nan"), float(cosine[last]),
                             int(rows["case"][attributed][last]), tuple(sorted(int(s) for s in steps[members])),
                             int(index[last])))
    return sorted(out, key=lambda d: d.effect)[:n]
