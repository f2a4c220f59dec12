"""One self-contained HTML report of one or several traces: run metadata, summary tables and every
figure of `ms.plots`, embedded as base64 PNG. No script, no external stylesheet, font or image: the
file opens offline and can be mailed or attached as is.

    import marginscope as ms
    ms.report.write(["run-dpo.h5", "run-ipo.h5"], "report.html")
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import plots
from .errors import MarginscopeError
from .plots._data import Traces, as_list, load_tokenizer_like, opened_all, run_label
from .trace.schema import Trace
from .trace.summary import TraceSummary, agreement_tables, displacers, summarize

REPORT_DPI = 110
_MAX_ROWS = 12
_MAX_DISPLACERS = 8

# How to read each figure (docs/figures.md has the long form).
CAPTIONS = {
    "case_map": "Each probe at each record, at (⟨a_w,a_l⟩/‖a_w‖², ⟨a_w,a_l⟩/‖a_l‖²). Dashed lines: the "
                "loss's thresholds d_w/d_l and d_l/d_w; lower left is Case 1 (chosen ↑ rejected ↓), right of "
                "the vertical line the chosen response falls (Case 2), above the horizontal one the rejected "
                "rises (Case 3). Colour = step, marker = the recorded Case; dotted: |cos(a_w,a_l)| = 1.",
    "case_fractions": "Share of probes in each Case per record (from the signs of the first-order Δlog π), "
                      "and the mean log-prob of every response.",
    "logp_trajectories": "Chosen and rejected log-probs (bold: mean; thin: each probe), as sums and per token, "
                         "on the colour of each record's dominant Case.",
    "gradient_geometry": "cos(a_w, a_l) over steps, and the bilevel Theorem 1 terms ‖a_w‖² − ⟨a_w,a_l⟩ "
                         "(chosen rises when > 0) and ⟨a_w,a_l⟩ − ‖a_l‖² (rejected falls when < 0), for DPO-like "
                         "losses; dashed: the training pairs of every step (in-run), when recorded.",
    "token_heatmap": "Per-token gradient cosine and inner product between chosen tokens (rows) and rejected "
                     "tokens (columns); red labels mark the tokens that differ (margin-pitfalls Fig. 4b).",
    "token_heatmap_steps": "The per-token gradient cosine of one probe at several steps, on one colour scale.",
    "mass_shift": "(a) mean change of log π(y_w), log π(y_l) and of the top output y*; (b) the tokens that "
                  "gained the most probability within the recorded top-k; (c, d) per position, the probability of "
                  "the argmax token and of the target token, first record against the last.",
    "first_order": "Per response, the self view (predicted Δlog π per unit learning rate, one step on the pair "
                   "alone, at the interval's start) and the first order along the actual update, each against "
                   "the observed change over the interval; line: least-squares fit through 0 (η̂, slope), dotted: "
                   "observed = first order, r: correlation, sign: share of points whose signs agree.",
    "why_moved": "Per response, the observed Δlog π of every interval between records (black) as the sum of the "
                 "last optimizer step's parts (gradient, momentum, weight decay), the rest of the first order along "
                 "the actual update (earlier steps of the interval) and the curvature residual (observed − first "
                 "order); mean over probes. The step parts cover the last step of each interval only.",
    "token_update": "Per position of chosen and rejected, the first-order change along the actual update (bars) "
                    "and the observed change of each token's log-prob (dots); shaded, red labels: the tokens "
                    "that differ; corner: the sums before, at and after them.",
    "compare_runs": "The runs on shared axes: mean log-probs, gradient cosine, Case 1 / Case 2 shares and the "
                    "margin change.",
    "displacers": "Each training pair at (its effect on chosen, its effect on rejected), summed over the probes "
                  "and the steps before records: the first order of its share of the optimizer's gradient part. "
                  "Colour: the pair's own gradient cosine; named: the three that pulled chosen down most.",
}
TITLES = {"case_map": "Case map", "case_fractions": "Case fractions", "logp_trajectories": "Log-prob trajectories",
          "gradient_geometry": "Gradient geometry", "token_heatmap": "Per-token heatmap",
          "token_heatmap_steps": "Per-token heatmaps over steps", "mass_shift": "Mass shift",
          "first_order": "First-order validity", "why_moved": "Why did it move",
          "token_update": "Per-position update", "compare_runs": "Comparison of runs",
          "displacers": "Who pushed it"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#222;background:#fafafa}
header,main{max-width:1280px;margin:0 auto;padding:0 24px}
header{padding-top:20px}
h1{font-size:1.6em;margin:0.2em 0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
nav ul{columns:2;padding-left:1.2em}
table{border-collapse:collapse;font-size:0.85em;margin:0.6em 0;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f0f0f0}td.k,th.k{text-align:left}
figure{background:#fff;border:1px solid #e4e4e4;border-radius:4px;margin:1em 0;padding:10px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:0.85em;color:#444;margin-top:6px}
.muted{color:#777;font-size:0.85em}
details{margin:0.6em 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if not np.isfinite(value) else f"{value:.3f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def _table(header: list[str], rows: Iterable[list[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="k">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="k">{_e(_fmt(v))}</td>' if i < left else f"<td>{_e(_fmt(v))}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(anchor: str, name: str, fig) -> str:
    data = base64.b64encode(plots.figure_bytes(fig, "png", REPORT_DPI)).decode("ascii")
    title = TITLES[name]
    return (f'<figure id="{_e(anchor)}" data-figure="{_e(name)}"><img src="data:image/png;base64,{data}" '
            f'alt="{_e(title)}"><figcaption><b>{_e(title)}.</b> {_e(CAPTIONS[name])}</figcaption></figure>')


def _overview_row(label: str, summary: TraceSummary) -> list[Any]:
    meta, last = summary.metadata, summary.records[-1] if summary.records else {}
    steps = f"{summary.records[0]['step']}–{last['step']}" if summary.records else "none"
    return [label, meta.get("loss", "?"), meta.get("model", "?"), f"{summary.n_probes} × {len(summary.names)}",
            f"{len(summary.records)} ({steps})", *(last.get(f"case{c}_frac", float("nan")) for c in (1, 2, 3, 4)),
            last.get("cosine_mean", float("nan")), summary.trend.get("chosen", float("nan")),
            summary.trend.get("rejected", float("nan")), summary.inrun.get("rows", 0)]


_OVERVIEW = ["run", "loss", "model", "probes × responses", "records (steps)", "Case 1", "Case 2", "Case 3",
             "Case 4", "cos(a_w,a_l)", "Δ chosen", "Δ rejected", "in-run pairs"]


def _records_table(summary: TraceSummary) -> str:
    records = summary.records
    if not records:
        return '<p class="muted">no records yet</p>'
    picked = sorted(set(np.linspace(0, len(records) - 1, min(_MAX_ROWS, len(records))).round().astype(int).tolist()))
    header = ["step", "cos(a_w,a_l)", "Case 1", "Case 2", "Case 3", "Case 4",
              *(f"mean log π {n}" for n in summary.names), "non-finite"]
    rows = [[records[i]["step"], records[i]["cosine_mean"], *(records[i][f"case{c}_frac"] for c in (1, 2, 3, 4)),
             *(records[i][f"logp_{n}_mean"] for n in summary.names), records[i]["nonfinite"]] for i in picked]
    shown = f"{len(picked)} of {len(records)} records, evenly spaced" if len(picked) < len(records) else "every record"
    return _table(header, rows) + f'<p class="muted">{shown}; Case columns are shares of the probes.</p>'


def _agreement_section(summary: TraceSummary) -> str:
    """The agreement of the views over the run: the tables `marginscope inspect` prints."""
    tables = agreement_tables(summary.agreement)
    if not tables:
        return ""
    parts = ["<h3>What happened: the views against the observed change</h3>"]
    for title, header, rows, caption in tables:
        parts.append(f'<p><b>{_e(title)}</b></p>{_table(header, rows, left=1 if header[0] != "response" else 2)}'
                     f'<p class="muted">{_e(caption)}.</p>')
    return "\n".join(parts)


def _displacers_section(tr: Trace, probe: str | None) -> str:
    """The training pairs that pushed the chosen responses down the most (`marginscope inspect --displacers`)."""
    rows = displacers(tr, probe=probe, n=_MAX_DISPLACERS)
    if not rows:
        return ""
    header = ["pair", "prompt", "chosen", "rejected", "on chosen", "on rejected", "share", "own cos", "own Case"]
    body = [[r.label or "—", r.prompt, r.chosen, r.rejected, r.effect, r.effect_other, f"{r.share:.1%}",
             r.cosine, r.case] for r in rows]
    where = f"probe {probe}" if probe else "every probe's chosen response, summed"
    return ("<h3>Who pushed it: the training pairs that pulled chosen down the most</h3>" + _table(header, body, left=4)
            + f'<p class="muted">First-order effect (nats) of each pair\'s share of the optimizer\'s gradient part on '
              f"the steps before records, on {_e(where)}; share = of the pairs' total absolute push on that response.</p>")


def _run_section(anchor: str, tr: Trace, label: str, summary: TraceSummary, options: dict[str, Any]) -> str:
    meta_rows = [[k, v] for k, v in sorted(summary.metadata.items())]
    parts = [f'<section id="{_e(anchor)}"><h2>{_e(label)}</h2>',
             f'<p class="muted">{_e(tr.path)}</p>',
             f"<details open><summary>Run metadata</summary>{_table(['key', 'value'], meta_rows, left=2)}</details>",
             "<h3>Records</h3>", _records_table(summary), _agreement_section(summary),
             _displacers_section(tr, options.get("probe")), "<h3>Figures</h3>"]
    parts += [_figure(f"{anchor}-{name}", name, fig) for name, fig in plots.run_figures(tr, **options)]
    parts.append("</section>")
    return "\n".join(parts)


def render(traces: Traces, *, probe: str | None = None, step: int | None = None, tokenizer: Any = None,
           title: str | None = None) -> str:
    """The HTML text of the report: an overview table, then per run its metadata, a table of its
    records and every figure; with several runs, the comparison figures. See `write`."""
    from . import __version__  # the package's, set after its submodules are imported

    options = {"probe": probe, "step": step, "tokenizer": load_tokenizer_like(tokenizer)}
    with opened_all(as_list(traces)) as trs:
        labels = [run_label(tr) for tr in trs]
        title = title or "marginscope report: " + ", ".join(labels[:4]) + (" …" if len(labels) > 4 else "")
        anchors = [f"run-{key}" for key in plots.run_keys(trs)]
        summaries = [summarize(tr) for tr in trs]
        overview = _table(_OVERVIEW, [_overview_row(lab, summary) for lab, summary in zip(labels, summaries)])
        sections = [_run_section(*args, options) for args in zip(anchors, trs, labels, summaries)]
        if len(trs) > 1:
            figs = [_figure(f"comparison-{name}", name, fig)
                    for name, fig in plots.comparison_figures(trs, probe=probe, step=step)]
            sections.append('<section id="comparison"><h2>Comparison of runs</h2>' + "\n".join(figs) + "</section>")
            anchors.append("comparison")
            labels.append("Comparison of runs")
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    chosen = " · ".join(f"{k} {v}" for k, v in (("probe", probe), ("step", step)) if v is not None)
    toc = "".join(f'<li><a href="#{_e(a)}">{_e(lab)}</a></li>' for a, lab in zip(anchors, labels))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><p class=\"muted\">marginscope {_e(__version__)} · {created} · "
            f"Cases: 1 chosen ↑ rejected ↓, 2 both ↓, 3 both ↑, 4 margin ↓"
            f"{_e(' · figures for ' + chosen) if chosen else ''}</p>"
            f"<nav><ul>{toc}</ul></nav></header><main><section id=\"overview\"><h2>Overview</h2>{overview}"
            f'<p class="muted">Case shares and cosine at the last record; Δ: mean change of the log-prob from the first '
            f"to the last record (nats).</p></section>\n" + "\n".join(sections) + "</main></body></html>\n")


def write(traces: Traces, path: str | os.PathLike, *, probe: str | None = None, step: int | None = None,
          tokenizer: Any = None, title: str | None = None) -> Path:
    """Write the report of `traces` (a trace, a path, or a list of them) to `path`, atomically
    (a temporary file beside it, then a rename); returns the path."""
    path = Path(path)
    if path.is_dir():
        raise MarginscopeError(f"{path}: is a directory; give the report's file name, e.g. {path / 'report.html'}")
    if not path.parent.is_dir():
        raise MarginscopeError(f"{path.parent}: no such directory")
    text = render(traces, probe=probe, step=step, tokenizer=tokenizer, title=title)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
