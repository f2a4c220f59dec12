"""ms.plots and `marginscope plot`: every figure renders, without warnings, for every loss of the zoo
and for edge traces; figures carry the right content; the case map's regions match the recorded Cases."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from typer.testing import CliRunner

import marginscope as ms
from marginscope.cli import app
from marginscope.dynamics.summary import first_order_fit
from marginscope.plots import _data
from marginscope.trace.summary import Intervals
from trace_factory import EDGE_CASES, make_trace, tracked_trace

runner = CliRunner()
TOKEN_FIGURES = {"token_heatmap", "token_heatmap_steps", "mass_shift"}


@contextlib.contextmanager
def strict():
    """Every warning is an error (matplotlib's, numpy's, seaborn's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def render(fig) -> np.ndarray:
    """RGBA pixels of the figure drawn on its Agg canvas (low dpi: content, not looks)."""
    fig.set_dpi(40)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())


def assert_drawn(fig) -> None:
    img = render(fig)
    ink = (img[..., :3] < 235).any(axis=-1).mean()
    assert ink > 0.004, f"blank figure ({ink:.4f} of pixels drawn)"


def all_text(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


def draw_every_figure(trace, **options) -> dict:
    figures = {}
    with strict():
        for name, fig in ms.plots.run_figures(trace, **options):
            assert isinstance(fig, matplotlib.figure.Figure)
            assert_drawn(fig)
            figures[name] = fig
    assert list(figures) == list(ms.plots.FIGURES)
    return figures


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tokenizer) -> Path:
    return tracked_trace(tmp_path_factory.mktemp("tracked") / "run.h5", tokenizer)


@pytest.mark.parametrize("loss", ms.losses.names())
def test_every_figure_for_every_loss(loss, tmp_path):
    path = make_trace(tmp_path / f"{loss}.h5", loss=loss)
    figures = draw_every_figure(path)
    assert f"· {loss}" in figures["case_map"].axes[0].get_title()


@pytest.mark.parametrize("edge", sorted(EDGE_CASES))
def test_every_figure_for_edge_traces(edge, tmp_path):
    figures = draw_every_figure(make_trace(tmp_path / f"{edge}.h5", **EDGE_CASES[edge]))
    text = {name: " ".join(all_text(fig).split()) for name, fig in figures.items()}  # notes are wrapped
    if EDGE_CASES[edge].get("steps") == (0,):
        assert all("needs two records" in text[name] for name in ("first_order", "why_moved", "token_update"))
        assert "one record" in text["mass_shift"] and "one record" in text["logp_trajectories"]
    if EDGE_CASES[edge].get("per_token") == ():
        assert "no per-token Gram" in text["token_heatmap"] and "no per-token Gram" in text["token_heatmap_steps"]
    if EDGE_CASES[edge].get("inrun") is False:
        assert "in-run geometry not recorded" in text["gradient_geometry"]
    if edge == "no_gram":
        assert "no finite Gram" in text["case_map"] and "undetermined" in text["case_fractions"]
    if edge == "no_top":
        assert "no 'top' response" in text["mass_shift"]
    if edge == "nan":
        assert "undefined (NaN or zero norm)" in text["case_map"]
    attributed = EDGE_CASES[edge].get("inrun") is not False and EDGE_CASES[edge].get("update") is not False \
        and EDGE_CASES[edge].get("steps") != (0,)
    assert ("no per-pair attribution" in text["displacers"]) is not attributed
    assert ("pulled chosen down" in text["displacers"]) is attributed
    if edge == "no_update":  # as a version-2 trace reads: the self view only
        assert text["first_order"].count("actual-update first order not recorded") == 3
        assert "η̂ = " in text["first_order"] and "slope = " not in text["first_order"]
        assert "Not explained: actual-update first order not recorded" in text["why_moved"]
        assert not [c for c in figures["why_moved"].axes[0].containers]
        assert "actual-update first order not recorded" in text["token_update"]
    elif EDGE_CASES[edge].get("steps") != (0,):
        assert "slope = " in text["first_order"] and "not recorded" not in text["first_order"]
        assert "cover only the last optimizer step of each interval" in text["why_moved"]
        # the NaN trace's first probe has no change at the last record
        assert ("Σ at the differing tokens" in text["token_update"]) == (edge != "nan")
        assert ("no actual-update change at this record" in text["token_update"]) == (edge == "nan")


def test_figures_of_a_trace_with_no_records(tmp_path, probes, tokenizer):
    path = tmp_path / "empty.h5"
    encoded = ms.dynamics.encode(tokenizer, probes)
    ms.trace.write_trace(path, probes=probes, encoded=encoded, names=probes.response_names, metadata={},
                         records=[], top_k=2)
    figures = draw_every_figure(path)
    assert all("no records yet" in all_text(f) or "no per-token Gram" in all_text(f) for f in figures.values())


def test_real_tracker_trace_with_tokenizer(tracked, tokenizer):
    figures = draw_every_figure(tracked, tokenizer=tokenizer)
    text = all_text(figures["token_heatmap"])
    assert "probe p0 · step 6" in text and "positive" in text and "negative" in text


def _region_case(x: float, y: float, tx: float, ty: float, flip_x: bool, flip_y: bool) -> int:
    """DESIGN §2 by hand: chosen rises iff x ≤ t_x and rejected falls iff y ≤ t_y for positive
    coefficients; a negative coefficient swaps the side."""
    chosen_up = bool(x <= tx) != bool(flip_x)
    rejected_down = bool(y <= ty) != bool(flip_y)
    return 1 if chosen_up and rejected_down else 2 if rejected_down else 3 if chosen_up else 4


def _case_map_points(ax) -> list[tuple[int, float, float]]:
    return [(int(c.get_gid().split("-")[1]), float(x), float(y)) for c in ax.collections
            if isinstance(c, PathCollection) and (c.get_gid() or "").startswith("case-") for x, y in c.get_offsets()]


@pytest.mark.parametrize("loss, ref_offset, coordinates", [
    ("dpo", 0.0, "raw"), ("ipo", 0.0, "raw"), ("simpo", 0.0, "raw"), ("simpo", 0.0, "normalized"),
    ("kto", 0.0, "normalized"), ("spo", 20.0, "raw"), ("spo", 20.0, "normalized"), ("spo", 0.0, "normalized")])
def test_case_map_geometry_matches_recorded_cases(loss, ref_offset, coordinates, tmp_path):
    """Coordinates recomputed from the Gram and d_w/d_l put every pair in the region of its recorded
    Case (each side swapped by a negative coefficient); the figure plots exactly those points; the
    region names drawn fit the sign pattern the points share."""
    path = make_trace(tmp_path / "run.h5", loss=loss, ref_offset=ref_offset, n_probes=8, steps=range(0, 20, 2))
    with strict():
        fig = ms.plots.case_map(path, coordinates=coordinates)
    ax = fig.axes[0]
    assert (r"\div" in ax.get_xlabel()) == (coordinates == "normalized")
    with ms.trace.open(path) as tr:
        k, d_w, d_l, case = tr.gram, tr.d_w, tr.d_l, tr.case
    x, y = k[..., 0, 1] / k[..., 0, 0], k[..., 0, 1] / k[..., 1, 1]
    if coordinates == "normalized":
        x, y, flip_x, flip_y = x / (d_w / d_l), y / (d_l / d_w), d_w < 0, d_l < 0
    else:
        flip_x, flip_y = d_l < 0, d_w < 0
    tx = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"][0]
    ty = [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"][1]
    off_line = (np.abs(x - tx) > 1e-9) & (np.abs(y - ty) > 1e-9)
    assert off_line.sum() > 50
    for i in zip(*np.nonzero(off_line)):
        assert _region_case(x[i], y[i], tx, ty, flip_x[i], flip_y[i]) == case[i], (i, x[i], y[i], case[i])
    plotted = sorted((c, round(px, 9), round(py, 9)) for c, px, py in _case_map_points(ax))
    assert plotted == sorted(zip(case.ravel().tolist(), np.round(x, 9).ravel().tolist(), np.round(y, 9).ravel().tolist()))
    drawn_x, drawn_y = bool(flip_x.all()), bool(flip_y.all())
    corners = {t.get_text(): t.get_position() for t in ax.texts if t.get_text().startswith("Case ")}
    assert len(corners) == 4
    for label, (cx, cy) in corners.items():
        right, top = cx > 0.5, cy > 0.5
        expected = _region_case(tx + (1 if right else -1), ty + (1 if top else -1), tx, ty, drawn_x, drawn_y)
        assert label.startswith(f"Case {expected}:"), (label, right, top)
    text = all_text(fig)
    assert ("the sign every point shares" in text) == (drawn_x or drawn_y)
    mixed = int(((flip_x != drawn_x) | (flip_y != drawn_y)).sum())
    assert (f"{mixed} point(s) with coefficients of other signs" in text) == bool(mixed)
    assert any(a.get_ylabel() == "step" for a in fig.axes)


def test_case_map_coordinates_auto(tmp_path):
    """Raw coordinates when every point has the same thresholds (DPO: d_w = d_l), normalized when
    they vary (KTO); raw with varying thresholds draws the median and says so."""
    dpo, kto = make_trace(tmp_path / "dpo.h5"), make_trace(tmp_path / "kto.h5", loss="kto")
    with strict():
        assert r"\div" not in ms.plots.case_map(dpo).axes[0].get_xlabel()
        assert r"\div" in ms.plots.case_map(kto).axes[0].get_xlabel()
        assert "thresholds vary per pair: lines at the median" in all_text(ms.plots.case_map(kto, coordinates="raw"))


def test_case_map_one_probe_one_step_and_several_runs(tmp_path):
    a = make_trace(tmp_path / "a.h5", loss="dpo")
    b = make_trace(tmp_path / "b.h5", loss="simpo", seed=1)
    with strict():
        fig = ms.plots.case_map([a, b])
        assert [ax.get_title() for ax in fig.axes[:2]] == ["a.h5 · dpo", "b.h5 · simpo"]
        one = ms.plots.case_map(a, probe="q1", step=4)
        assert len(_case_map_points(one.axes[0])) == 1
        path = ms.plots.case_map(a, probe="q1")
        assert len(_case_map_points(path.axes[0])) == 4 and len(path.axes[0].lines) >= 3  # its trajectory
    with pytest.raises(ms.MarginscopeError, match=r"step 5 is not recorded \(steps: 0, 2, 4, 6\)"):
        ms.plots.case_map(a, step=5)
    with pytest.raises(ms.MarginscopeError, match=r"no probe 'nope' \(probes: q0, q1, q2, q3\)"):
        ms.plots.logp_trajectories(a, probe="nope")


def test_case_fractions_and_trajectories_content(tmp_path):
    path = make_trace(tmp_path / "run.h5")
    with strict():
        fig = ms.plots.case_fractions(path)
        top, bottom = fig.axes[:2]
        assert top.get_ylabel() == "fraction of probes" and "nats" in bottom.get_ylabel()
        assert len(bottom.lines) == 3  # chosen, rejected, top
        assert [t.get_text() for t in top.get_legend().get_texts()][:2] == ["Case 1: chosen ↑ rejected ↓", "Case 2: both ↓"]
        fig = ms.plots.logp_trajectories(path)
        raw, norm = fig.axes[:2]
        assert raw.get_ylabel() == "log π(y|x) (nats)" and "per token" in norm.get_ylabel()
        assert len(raw.lines) == 2 * (4 + 1)  # chosen and rejected: each probe + the mean
        assert len(raw.patches) == 4  # one dominant-Case span per record
    with ms.trace.open(path) as tr:
        mean_w = np.nanmean(tr.logp[:, :, 0], axis=1)
    np.testing.assert_allclose(raw.lines[4].get_ydata(), mean_w)


def test_gradient_geometry_content(tmp_path):
    path = make_trace(tmp_path / "run.h5")
    with strict():
        fig = ms.plots.gradient_geometry(path)
    cos_ax, terms_ax = fig.axes[:2]
    assert "cos" in cos_ax.get_ylabel() and cos_ax.get_ylim() == (-1.05, 1.05)
    labels = [t.get_text() for t in terms_ax.get_legend().get_texts()]
    assert any("in-run" in s for s in labels) and any(r"\|a_w\|^2 - \langle a_w,a_l\rangle" in s for s in labels)
    with ms.trace.open(path) as tr:
        rows = tr.inrun()
        gram = tr.gram
    inrun_line = [l for l in cos_ax.lines if l.get_label() == "training pairs (in-run)"][0]
    np.testing.assert_array_equal(inrun_line.get_xdata(), np.unique(rows["step"]))
    step1 = rows["step"] == 1
    expected = np.mean(rows["inner"][step1] / np.sqrt(rows["sq_w"][step1] * rows["sq_l"][step1]))
    assert inrun_line.get_ydata()[0] == pytest.approx(expected)
    term_w = gram[..., 0, 0] - gram[..., 0, 1]
    mean_line = [l for l in terms_ax.lines if l.get_label().startswith("chosen: ")][0]
    np.testing.assert_allclose(mean_line.get_ydata(), term_w.mean(axis=1))


def test_token_heatmap_marks_differing_tokens(tracked, tokenizer):
    with ms.trace.open(tracked) as tr:
        ids_w, ids_l = tr.input_ids(0, 0)[1], tr.input_ids(0, 1)[1]
        tg = tr.token_gram(0)
    diff_w, diff_l = _data.differing_tokens(ids_w, ids_l)
    assert diff_w.sum() >= 1 and diff_l.sum() >= 1 and not diff_w.all()
    with strict():
        fig = ms.plots.token_heatmap(tracked, probe="p0", step=2, tokenizer=tokenizer)
    ax_cos, ax_raw = [ax for ax in fig.axes if ax.get_title() in ("cosine", "inner product")]
    labels = [t.get_text() for t in ax_cos.get_yticklabels()]
    assert labels == [_data.token_text(i, tokenizer) for i in ids_w]
    red = [t.get_text() for t in ax_cos.get_xticklabels() if t.get_color() == "#c0143c"]
    assert red == [_data.token_text(i, tokenizer) for i in np.asarray(ids_l)[diff_l]]
    boxes = [p for p in ax_cos.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(boxes) == diff_w.sum() * diff_l.sum()
    row = list(tg["step"]).index(2)
    np.testing.assert_allclose(ax_raw.images[0].get_array().filled(np.nan), tg["gram"][row])
    cos = tg["gram"][row] / np.sqrt(np.outer(tg["sqnorm_w"][row], tg["sqnorm_l"][row]))
    np.testing.assert_allclose(ax_cos.images[0].get_array().filled(np.nan), cos)
    with strict():
        offline = ms.plots.token_heatmap(tracked)  # no tokenizer: the token texts stored in the trace
    assert [t.get_text() for t in offline.axes[0].get_yticklabels()] == labels
    with pytest.raises(ms.MarginscopeError, match="no per-token Gram of probe 'p0' at step 3"):
        ms.plots.token_heatmap(tracked, step=3)
    with strict():
        missing = ms.plots.token_heatmap(tracked, probe="p1")
    assert "probe 'p1' has no per-token Gram (recorded for: p0)" in all_text(missing)


def test_token_heatmap_steps_small_multiples(tracked, tokenizer):
    with strict():
        fig = ms.plots.token_heatmap_steps(tracked, tokenizer=tokenizer)
        two = ms.plots.token_heatmap_steps(tracked, steps=[0, 6])
        capped = ms.plots.token_heatmap_steps(tracked, max_panels=3)
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["step 0", "step 2", "step 4", "step 6"]
    assert [ax.get_title() for ax in two.axes if ax.images] == ["step 0", "step 6"]
    assert [ax.get_title() for ax in capped.axes if ax.images] == ["step 0", "step 4", "step 6"]


def test_mass_shift_content(tracked, tokenizer):
    with strict():
        fig = ms.plots.mass_shift(tracked, probe="p0", tokenizer=tokenizer)
    ax_a = fig.axes[0]
    labels = [t.get_text() for t in ax_a.get_legend().get_texts()]
    assert labels == ["$y_w$ (chosen)", "$y_l$ (rejected)", "$y^*$ (top)"]
    with ms.trace.open(tracked) as tr:
        logp = tr.logp[:, 0]
        ids, prob = tr.topk_ids[:, 0], tr.topk_prob[:, 0]
    np.testing.assert_allclose(ax_a.lines[2].get_ydata(), logp[:, 2] - logp[0, 2])
    gains = _data.topk_gains(ids[0], prob[0], ids[-1], prob[-1])
    best = max(gains, key=gains.get)
    ax_b = fig.axes[1]
    assert ax_b.get_yticklabels()[-1].get_text() == _data.token_text(best, tokenizer)
    assert ax_b.patches[-1].get_width() == pytest.approx(gains[best], rel=1e-6)


def test_topk_gains_and_differing_tokens():
    ids0 = np.array([[5, 6], [7, -1]])
    p0 = np.array([[0.5, 0.2], [0.9, np.nan]])
    ids1 = np.array([[6, 5], [8, 7]])
    p1 = np.array([[0.6, 0.3], [0.5, 0.4]])
    gains = _data.topk_gains(ids0, p0, ids1, p1)
    assert gains == pytest.approx({5: -0.2, 6: 0.4, 7: -0.5, 8: 0.5})
    w, l = _data.differing_tokens([9, 1, 2, 3], [8, 1, 2, 3, 4])
    assert w.tolist() == [True, False, False, False] and l.tolist() == [True, False, False, False, True]


def test_first_order_fit_and_figure(tmp_path):
    fit = first_order_fit(np.array([1.0, -2.0, 3.0, np.nan]), np.array([0.5, -1.0, 1.5, 2.0]))
    assert (fit.slope, fit.r, fit.sign_agreement, fit.n) == (pytest.approx(0.5), pytest.approx(1.0), 1.0, 3)
    assert np.isnan(first_order_fit(np.zeros(3), np.zeros(3)).slope)
    path = make_trace(tmp_path / "run.h5")
    with strict():
        fig = ms.plots.first_order(path)
    with ms.trace.open(path) as tr:
        pred, obs, actual = tr.predicted_delta[:-1], tr.observed_delta[1:], tr.actual_delta[1:]
        names = tr.names
    panels = [ax for ax in fig.axes if " · " in ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"{n} · {v}" for n in names for v in ("self view", "actual update")]
    for j in range(len(names)):
        ax_self, ax_actual = panels[2 * j], panels[2 * j + 1]
        assert "per unit learning rate" in ax_self.get_xlabel() and "actual update (nats)" in ax_actual.get_xlabel()
        for ax, x, symbol in ((ax_self, pred[..., j], "η̂"), (ax_actual, actual[..., j], "slope")):
            expected = first_order_fit(x, obs[..., j])
            text = all_text_of(ax)
            assert f"{symbol} = {expected.slope:.3g}" in text and f"r = {expected.r:.2f}" in text
            assert f"sign = {expected.sign_agreement:.0%}" in text and f"n = {expected.n}" in text
            offsets = [c for c in ax.collections if isinstance(c, PathCollection)][0].get_offsets()
            np.testing.assert_allclose(sorted(map(tuple, offsets)), sorted(zip(x.ravel(), obs[..., j].ravel())))
        assert first_order_fit(actual[..., j], obs[..., j]).r > 0.9  # the factory's actual view explains it
        dotted = [line.get_label() for line in ax_actual.lines if line.get_linestyle() == ":"]
        assert dotted == ["observed = first order"]
    with strict():
        one = ms.plots.first_order(path, probe="q2")
    offsets = [c for c in one.axes[1].collections if isinstance(c, PathCollection)][0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], actual[:, 2, 0])


def all_text_of(ax) -> str:
    return "\n".join(t.get_text() for t in ax.findobj(Text))


def _segments_by_hand(path, probe: int | None = None):
    """The shares of the observed change recomputed from the trace (DESIGN §2b): the last step's
    parts, actual − step_delta, observed − actual; means over the probes (or one probe)."""
    with ms.trace.open(path) as tr:
        sel = slice(None) if probe is None else slice(probe, probe + 1)
        obs, actual, step = tr.observed_delta[1:, sel], tr.actual_delta[1:, sel], tr.step_delta[1:, sel]
        parts = {k: v[1:, sel] for k, v in tr.step_parts.items()}
    shares = {**parts, "rest": actual - step, "curvature": obs - actual}
    return {k: np.nanmean(v, axis=1) for k, v in shares.items()}, np.nanmean(obs, axis=1)


@pytest.mark.parametrize("probe", [None, "q1"])
def test_why_moved_bars_add_up_to_the_observed_change(tmp_path, probe):
    path = make_trace(tmp_path / "run.h5", nan=True)
    with strict():
        fig = ms.plots.why_moved(path, probe=probe)
    expected, observed = _segments_by_hand(path, None if probe is None else 1)
    with ms.trace.open(path) as tr:
        names, steps = tr.names, tr.steps
    panels = fig.axes[:len(names)]
    assert [ax.get_title() for ax in panels] == names
    for j, ax in enumerate(panels):
        bars = {c.get_label(): c for c in ax.containers}
        assert set(bars) == {"gradient", "momentum", "weight_decay", "residual", "rest", "curvature"}
        for name, container in bars.items():
            np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in container], steps[1:])
            np.testing.assert_allclose(container.datavalues, expected[name][:, j], rtol=1e-9, atol=1e-15)
        total = np.sum([c.datavalues for c in bars.values()], axis=0)
        np.testing.assert_allclose(total, observed[:, j], rtol=1e-9)  # the shares add up to what happened
        line = [l for l in ax.lines if l.get_label() == "observed"][0]
        np.testing.assert_allclose(line.get_ydata(), observed[:, j])
        for container in bars.values():  # stacked: positive shares above 0, negative ones below
            for bar in container:
                assert (bar.get_y() >= 0) if bar.get_height() >= 0 else (bar.get_y() <= 0)
    text = " ".join(all_text(fig).split())  # footnotes are wrapped
    assert "Optimizer split: AdamW" in text and "(records are more than one step apart)" in text
    assert ("mean over 4 probes" in text) == (probe is None) and ("probe q1" in text) == (probe is not None)


def test_why_moved_one_step_intervals(tmp_path):
    path = make_trace(tmp_path / "run.h5", steps=range(0, 5))
    with strict():
        text = " ".join(all_text(ms.plots.why_moved(path)).split())
    assert "Each interval is one optimizer step" in text and "cover only the last" not in text


def test_update_segments_fall_back_without_the_split():
    """One interval, three probes: split (AdamW), captured but unsplit, not captured; the shares
    always sum to the observed change."""
    nan = np.nan

    def part(*values: float) -> np.ndarray:  # [1 interval, 3 probes, 1 response]
        return np.array(values, dtype=float).reshape(1, 3, 1)

    iv = Intervals(start=np.array([0]), end=np.array([1]), predicted=part(0, 0, 0), observed=part(1.0, 2.0, 3.0),
                   actual=part(0.9, 1.8, 2.5), step_delta=part(0.6, 1.0, nan),
                   step_parts={"gradient": part(0.5, nan, nan), "momentum": part(0.2, nan, nan),
                               "weight_decay": part(-0.1, nan, nan), "residual": part(0.0, nan, nan)},
                   case_self=np.zeros((1, 3)), case_observed=np.zeros((1, 3)), case_actual=np.zeros((1, 3)))
    shares, valid = _data.update_segments(iv)
    assert list(shares) == ["gradient", "momentum", "weight_decay", "residual", "last_step", "rest", "curvature"]
    assert valid.all()
    got = {k: v.ravel().tolist() for k, v in shares.items()}
    assert got["gradient"] == [0.5, 0.0, 0.0] and got["last_step"] == [0.0, 1.0, 0.0]
    np.testing.assert_allclose(got["rest"], [0.3, 0.8, 2.5])
    np.testing.assert_allclose(got["curvature"], [0.1, 0.2, 0.5])
    np.testing.assert_allclose(sum(np.asarray(v) for v in got.values()), [1.0, 2.0, 3.0])


def test_token_update_content(tracked, tokenizer):
    with ms.trace.open(tracked) as tr:
        names, steps = tr.names, tr.steps
        w, l = names.index("chosen"), names.index("rejected")
        ids = [tr.input_ids(0, r)[1] for r in (w, l)]
        token, token_logp = tr.actual_token_delta, tr.token_logp
    diffs = _data.differing_tokens(*ids)
    with strict():
        fig = ms.plots.token_update(tracked, tokenizer=tokenizer)
    assert "probe p0 · step 4 → step 6" in all_text(fig)
    for ax, r, ids_r, diff in zip(fig.axes[:2], (w, l), ids, diffs):
        t = len(ids_r)
        assert ax.get_title() == f"{names[r]} of probe p0"
        assert [x.get_text() for x in ax.get_xticklabels()] == [_data.token_text(i, tokenizer) for i in ids_r]
        red = [x.get_text() for x in ax.get_xticklabels() if x.get_color() == "#c0143c"]
        assert red == [_data.token_text(i, tokenizer) for i in ids_r[diff]] and red
        values = token[-1, 0, r, :t]
        assert np.isfinite(values).all()
        np.testing.assert_allclose(ax.containers[0].datavalues, values)
        dots = [line for line in ax.lines if line.get_label() == "observed Δlog π(y_t)"][0]
        np.testing.assert_allclose(dots.get_ydata(), token_logp[-1, 0, r, :t] - token_logp[-2, 0, r, :t])
        regions = _data.position_regions(diff)
        text = all_text_of(ax)
        for k, where in enumerate(("before the differing tokens", "at the differing tokens", "after them")):
            assert f"Σ {where}: {values[regions == k].sum():+.3g}" in text
    with strict():
        other = ms.plots.token_update(tracked, probe="p1", step=2)  # no tokenizer: the trace's token texts
    assert "probe p1 · step 0 → step 2" in all_text(other)
    with ms.trace.open(tracked) as tr:
        ids_p1 = tr.input_ids(1, w)[1]
        stored = _data.load_tokenizer_like(None, tr)
    assert [x.get_text() for x in other.axes[0].get_xticklabels()] == [_data.token_text(i, stored) for i in ids_p1]
    with strict():
        first = ms.plots.token_update(tracked, step=0)
    assert "no actual-update change at this record" in all_text(first)
    with pytest.raises(ms.MarginscopeError, match=r"step 3 is not recorded"):
        ms.plots.token_update(tracked, step=3)


def test_position_regions():
    diff = np.array([False, False, True, False, True, False])
    assert _data.position_regions(diff).tolist() == [0, 0, 1, 2, 1, 2]
    assert _data.position_regions(np.zeros(3, bool)).tolist() == [0, 0, 0]


def test_compare_runs_content(tmp_path):
    paths = [make_trace(tmp_path / f"{loss}.h5", loss=loss, seed=i) for i, loss in enumerate(("dpo", "ipo", "kto"))]
    with strict():
        fig = ms.plots.compare_runs(paths)
        assert_drawn(fig)
    ax_lp = fig.axes[0]
    assert len(ax_lp.lines) == 2 * 3
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["dpo.h5 · dpo", "ipo.h5 · ipo", "kto.h5 · kto"]


def test_library_never_touches_pyplot_rcparams_or_backend(tmp_path):
    import matplotlib.pyplot as plt

    path = make_trace(tmp_path / "run.h5")
    backend, before = matplotlib.get_backend(), dict(matplotlib.rcParams)
    with strict():
        fig = ms.plots.case_fractions(path)
    assert plt.get_fignums() == [] and matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == before
    # The look survives a draw outside the theme: tick labels keep the theme's size.
    with matplotlib.rc_context({"xtick.labelsize": 20}):
        render(fig)
    sizes = {t.get_fontsize() for t in fig.axes[1].get_xticklabels()}
    assert sizes == {ms.plots._style.theme_rc()["xtick.labelsize"]}


def test_save_all_formats_and_names(tmp_path):
    a = make_trace(tmp_path / "a" / "run.h5")
    b = make_trace(tmp_path / "b" / "run.h5", loss="ipo")
    names = ["case_map", "token_heatmap", "compare_runs"]
    with strict():
        written = ms.plots.save_all([a, b], tmp_path / "out", formats=("png", "svg", "pdf"), names=names)
    expected = [f"{key}-{fig}.{fmt}" for key in ("run", "run-2") for fig in ("case_map", "token_heatmap")
                for fmt in ("png", "svg", "pdf")]
    expected += [f"comparison-{fig}.{fmt}" for fig in ("case_map", "compare_runs") for fmt in ("png", "svg", "pdf")]
    assert [p.name for p in written] == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(expected)
    assert (tmp_path / "out" / "run-case_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "run-case_map.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "out" / "run-2-token_heatmap.svg").read_bytes()[:2000]
    with pytest.raises(ms.MarginscopeError, match="unknown figure format 'gif'"):
        ms.plots.save_all(a, tmp_path / "x", formats=("gif",))
    with pytest.raises(ms.MarginscopeError, match="unknown figure 'nope'"):
        ms.plots.save_all(a, tmp_path / "x", names=["nope"])


def _cli(*args: str):
    return runner.invoke(app, list(args))


def test_cli_plot(tmp_path, tracked, tokenizer):
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    other = make_trace(tmp_path / "other.h5")
    out = tmp_path / "figs"
    res = _cli("plot", str(tracked), str(other), "-o", str(out), "--format", "png,svg", "--probe", "p0",
               "--tokenizer", str(tok_dir), "--figure", "token_heatmap", "--figure", "compare_runs")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "no probe 'p0'" in res.stderr  # other.h5 has q*
    res = _cli("plot", str(tracked), "-o", str(out), "--format", "png,svg", "--probe", "p0", "--step", "4",
               "--tokenizer", str(tok_dir), "--figure", "token_heatmap", "--figure", "case_map")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["run-case_map.png", "run-case_map.svg",
                                                     "run-token_heatmap.png", "run-token_heatmap.svg"]
    assert "wrote 4 file(s)" in res.stdout
    res = _cli("plot", str(tracked), str(other), "-o", str(tmp_path / "all"))
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "all").glob("*.png"))) == 2 * len(ms.plots.FIGURES) + len(ms.plots.COMPARISONS)


@pytest.mark.parametrize("args, message", [
    (["missing.h5", "-o", "out"], "missing.h5: no such trace file"),
    (["{trace}", "-o", "out", "--format", "png,gif"], "--format 'png,gif': choose from png, svg, pdf"),
    (["{trace}", "-o", "out", "--step", "3"], "step 3 is not recorded"),
    (["{trace}", "-o", "out", "--figure", "nope"], "unknown figure 'nope'"),
    (["{trace}", "-o", "{trace}"], "exists and is not a directory"),
])
def test_cli_plot_errors(tmp_path, args, message):
    trace = make_trace(tmp_path / "run.h5")
    res = _cli("plot", *(a.format(trace=trace) for a in args))
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and message in res.stderr and res.stderr.count("\n") == 1


def test_cli_plot_help_has_an_example():
    res = _cli("plot", "--help")
    assert res.exit_code == 0 and "marginscope plot run-dpo.h5" in res.stdout


def test_figures_doc_has_a_section_per_figure():
    text = (Path(__file__).resolve().parents[1] / "docs" / "figures.md").read_text()
    for name in dict.fromkeys([*ms.plots.FIGURES, *ms.plots.COMPARISONS]):
        section = text.split(f"## `{name}`\n", 1)[1].split("\n## ", 1)[0]
        assert f"ms.plots.{name}(" in section and "marginscope plot" in section, name


def test_displacers_at_a_recorded_step_without_attribution(tmp_path):
    """`marginscope plot/report --step S` passes S to every figure: at a recorded step without attribution
    (step 0; a trace without any) the displacers figure is a note, not an error that stops every figure;
    a step that is not recorded is still a one-line error."""
    path = make_trace(tmp_path / "run.h5")
    bare = make_trace(tmp_path / "bare.h5", update=False)
    for trace, step in ((path, 0), (bare, 2)):
        with strict():
            text = " ".join(all_text(ms.plots.displacers(trace, step=step)).split())
        assert f"no per-pair attribution at step {step}" in text
    assert "pulled chosen down" in " ".join(all_text(ms.plots.displacers(path, step=2)).split())
    with pytest.raises(ms.MarginscopeError, match="step 3 is not recorded"):
        ms.plots.displacers(path, step=3)
    result = runner.invoke(app, ["plot", str(path), "-o", str(tmp_path / "figs"), "--step", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(bare), "-o", str(tmp_path / "r.html"), "--step", "2"])
    assert result.exit_code == 0, result.output
