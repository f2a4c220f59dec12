"""`marginscope inspect`: a trace summarized in tables or JSON; bad files are one-line errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import torch
from typer.testing import CliRunner

import marginscope as ms
from marginscope.cli import app
import trace_factory
from trace_factory import make_trace

runner = CliRunner()


def _trace(make_model, tokenizer, probes, path):
    """A trace of a model shrinking its weights by 2% per step (no optimizer needed)."""
    model = make_model("gpt2")
    with ms.Tracker(model, tokenizer, probes, path, loss="dpo", every=1) as tracker:
        for step in (1, 2, 3):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.98)
            tracker.step(step)
    return path


def test_inspect_prints_the_run_and_its_records(make_model, tokenizer, probes, tmp_path):
    path = _trace(make_model, tokenizer, probes, tmp_path / "run.h5")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "tracker" in result.output and "dpo beta=0.1" in result.output
    assert "3 × 3 (chosen, rejected, top)" in result.output
    for step in ("0", "1", "2", "3"):
        assert f"│    {step} │" in result.output
    assert "first → last mean Δlog π" in result.output

    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    with ms.trace.open(path) as tr:
        assert [r["step"] for r in data["records"]] == tr.steps.tolist()
        w = tr.names.index("chosen")
        np.testing.assert_allclose(data["records"][-1]["logp_chosen_mean"], tr.logp[-1, :, w].mean())
        np.testing.assert_allclose(data["trend"]["rejected"], (tr.logp[-1, :, 1] - tr.logp[0, :, 1]).mean())
        assert abs(sum(data["records"][0][f"case{c}_frac"] for c in (1, 2, 3, 4)) - 1) < 1e-12


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def test_inspect_prints_the_agreement_of_the_views(make_model, tokenizer, probes, tmp_path):
    """Over the run: r, slope and sign of the self view (at each interval's start) and of the actual
    update against the observed change, recomputed by hand; Case shares of the three views and
    their agreement."""
    path = _trace(make_model, tokenizer, probes, tmp_path / "run.h5")
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    agreement = json.loads(result.output)["agreement"]
    with ms.trace.open(path) as tr:
        pred, obs, actual = tr.predicted_delta[:-1], tr.observed_delta[1:], tr.actual_delta[1:]
        case, case_obs, case_act = tr.case[:-1], tr.case_observed[1:], tr.case_actual[1:]
        names = tr.names
    assert agreement["intervals"] == 3 and agreement["actual_recorded"] is True
    for j, name in enumerate(names):
        fits = agreement["fits"][name]
        np.testing.assert_allclose(fits["actual"]["r"], _pearson(actual[..., j], obs[..., j]))
        np.testing.assert_allclose(fits["self"]["r"], _pearson(pred[..., j], obs[..., j]))
        a, o = actual[..., j].ravel(), obs[..., j].ravel()
        np.testing.assert_allclose(fits["actual"]["slope"], a @ o / (a @ a))
        assert fits["actual"]["sign_agreement"] == np.mean(np.sign(a) == np.sign(o)) and fits["actual"]["n"] == 9
        assert fits["actual"]["r"] > 0.9  # the weights shrink smoothly: the first order holds
    for view, c in (("self", case), ("observed", case_obs), ("actual", case_act)):
        shares = agreement["cases"][view]
        assert [shares[f"case{k}_frac"] for k in (1, 2, 3, 4)] == [np.mean(c == k) for k in (1, 2, 3, 4)]
        assert shares["undetermined_frac"] == np.mean(c == 0)
    both = (case_act != 0) & (case_obs != 0)
    assert agreement["case_agreement"]["actual_observed"] == np.mean(case_act[both] == case_obs[both])
    both = (case != 0) & (case_obs != 0)
    assert agreement["case_agreement"]["self_observed"] == np.mean(case[both] == case_obs[both])

    table = runner.invoke(app, ["inspect", str(path)], terminal_width=200).output
    chosen = agreement["fits"]["chosen"]
    assert "first order against the observed change" in table and "Cases of the three views" in table
    assert f"│ chosen   │ actual update (first order)            │ {chosen['actual']['r']:+.2f} │" in table
    assert f"{chosen['self']['slope']:.3g}" in table
    row = next(line for line in table.splitlines() if "actual update & observed" in line)
    assert row.split("│")[2].strip() == f"{agreement['case_agreement']['actual_observed']:.0%}"


def test_inspect_without_the_actual_update_views(tmp_path):
    """A trace without the actual-update views (as a version-2 trace reads): the self view's numbers,
    the others undefined and said so; one record: no agreement table."""
    path = make_trace(tmp_path / "old.h5", update=False)
    result = runner.invoke(app, ["inspect", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "the actual-update view is not recorded in this trace" in text
    data = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).output)["agreement"]
    assert data["actual_recorded"] is False and data["fits"]["chosen"]["actual"]["n"] == 0
    assert data["fits"]["chosen"]["self"]["n"] == 12 and data["cases"]["actual"]["undetermined_frac"] == 1.0
    one = make_trace(tmp_path / "one.h5", steps=(0,))
    result = runner.invoke(app, ["inspect", str(one)])
    assert result.exit_code == 0 and "Cases agree" not in result.output
    assert json.loads(runner.invoke(app, ["inspect", str(one), "--json"]).output)["agreement"] == {}


def test_inspect_rejects_what_is_not_a_trace(tmp_path):
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nope.h5")])
    assert missing.exit_code == 2 and missing.output.strip().count("\n") == 0
    assert "no such trace file" in missing.output
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    other = runner.invoke(app, ["inspect", str(tmp_path / "other.h5")])
    assert other.exit_code == 2 and "not a marginscope trace" in other.output
    (tmp_path / "text.h5").write_text("hello")
    text = runner.invoke(app, ["inspect", str(tmp_path / "text.h5")])
    assert text.exit_code == 2 and "text.h5" in text.output


def test_displacers_table_and_its_mistakes(tmp_path):
    """`inspect --displacers`: the training pairs most negative on chosen, summed per pair over the attributed
    steps, equal to the trace's own probe_effect; one-line errors for an unknown step, probe or response,
    and for a trace without attribution."""
    path = make_trace(tmp_path / "run.h5")
    with ms.trace.open(path) as tr:
        rows = tr.inrun()
        table = ms.trace.summary.displacers(tr, n=100)
        one = ms.trace.summary.displacers(tr, probe="q1", response="rejected", step=4, n=2)
    attributed = np.isfinite(rows["probe_effect"][:, 0, 0])
    for d in table:
        mine = attributed & (rows["pair_id"] == d.pair_id)
        np.testing.assert_allclose(d.effect, rows["probe_effect"][mine][:, :, 0].sum(), rtol=1e-12)
        np.testing.assert_allclose(d.effect_other, rows["probe_effect"][mine][:, :, 1].sum(), rtol=1e-12)
        assert d.steps == tuple(sorted(rows["step"][mine]))
    assert [d.effect for d in table] == sorted(d.effect for d in table) and len(table) == 5
    np.testing.assert_allclose(sum(abs(d.share) for d in table), 1.0)
    at4 = (rows["step"] == 4) & attributed
    assert [d.effect for d in one] == sorted(rows["probe_effect"][at4][:, 1, 1])[:2]
    result = runner.invoke(app, ["inspect", str(path), "--displacers", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "pushed chosen down the most" in result.output and table[0].pair_id in result.output
    as_json = runner.invoke(app, ["inspect", str(path), "--displacers", "--json", "--top", "2"])
    assert [d["pair_id"] for d in json.loads(as_json.output)] == [d.pair_id for d in table[:2]]
    for args, needle in ((["--step", "3"], "no attributed training step 3 (attributed steps: 2, 4, 6)"),
                         (["--probe", "nope"], "no probe 'nope'"), (["--response", "top"], "is not chosen or rejected")):
        result = runner.invoke(app, ["inspect", str(path), "--displacers", *args])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output
    bare = make_trace(tmp_path / "bare.h5", update=False)
    result = runner.invoke(app, ["inspect", str(bare), "--displacers"])
    assert result.exit_code == 2 and "holds no per-pair attribution" in result.output


def test_displacers_keep_pairs_without_id_or_texts_apart(tmp_path):
    """Rows recorded without `examples` (no id, no texts) are each a pair of their own — not all summed into
    one anonymous "pair" — and are named by their step and index."""
    path = make_trace(tmp_path / "run.h5", inrun=False)
    rng = np.random.default_rng(1)
    probes = trace_factory._probe_set(4, ("chosen", "rejected", "top"))  # make_trace's defaults
    with ms.trace.open(path) as tr:
        names, steps, top_k = tr.names, tr.steps, tr.top_k
    effects = {}
    with ms.trace.TraceWriter.resume(path, probes=probes, names=names, step=int(steps[-1]), top_k=top_k) as w:
        for step in (2, 4):
            effects[step] = rng.normal(size=(3, len(probes), len(names)))
            w.append_inrun(step, inner=np.ones(3), sq_w=np.full(3, 2.0), sq_l=np.full(3, 2.0), scale_w=-np.ones(3),
                           scale_l=np.ones(3), case=np.ones(3, dtype=np.int8), probe_effect=effects[step],
                           effect_scale=np.ones(3))
    with ms.trace.open(path) as tr:
        table = ms.trace.summary.displacers(tr, n=100)
    assert len(table) == 6 and all(d.anonymous and len(d.steps) == 1 for d in table)
    want = sorted(float(effects[s][j, :, 0].sum()) for s in (2, 4) for j in range(3))
    np.testing.assert_allclose([d.effect for d in table], want, rtol=1e-12)
    assert {d.label for d in table} == {f"step {s} pair {j}" for s in (2, 4) for j in range(3)}
    result = runner.invoke(app, ["inspect", str(path), "--displacers", "--top", "6"])
    assert result.exit_code == 0 and "step 2 pair 0" in result.output and "step 4 pair 2" in result.output
