"""`marginscope inspect`: a trace summarized in tables or JSON; bad files are one-line errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import torch
from typer.testing import CliRunner

import marginscope as ms
from marginscope.cli import app

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
