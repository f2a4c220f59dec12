"""What `marginscope inspect` prints: a trace's run, its records and its in-run rows in a few numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dynamics.summary import finite_mean, inrun_summary, record_summary
from .schema import Trace


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


def summarize(trace: Trace) -> TraceSummary:
    """Summaries of every record of `trace` (see `ms.dynamics.summary.record_summary`)."""
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
        inrun = {"rows": len(rows["step"]), "steps": len(np.unique(rows["step"])),
                 **inrun_summary(cosine, rows["case"])}
    return TraceSummary(str(trace.path), trace.metadata, names, len(trace.probe_ids), trace.top_k,
                        records, inrun, trend)
