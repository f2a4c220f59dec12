"""The embedded demo end to end on a reduced recipe: SFT (cached), tracked DPO per style, figures, report,
and `marginscope inspect` on its traces."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

import marginscope as ms
from marginscope.cli import app
from marginscope.demo.recipe import STYLES, DemoConfig, run_demo, sft_model

SMALL = replace(DemoConfig(), sft_statements=24, sft_max_steps=20, sft_check_every=10, probes=4, token_probes=2, train_pairs=8,
                dpo_steps=4, dpo_batch=4, every=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    return out, run_demo(out, SMALL, say=lines.append), lines


def test_demo_writes_traces_figures_and_report(demo):
    out, summaries, lines = demo
    assert [s.style for s in summaries] == list(STYLES)
    for s in summaries:
        with ms.trace.open(s.trace) as tr:
            np.testing.assert_array_equal(tr.steps, [0, 2, 4])
            assert tr.names == ["chosen", "rejected", "top"]
            assert tr.token_gram(0) is not None and tr.token_gram(2) is None
            assert len(tr.inrun()["step"]) == 4 * SMALL.dpo_batch
            np.testing.assert_allclose(s.chosen_trend, (tr.logp[-1, :, 0] - tr.logp[0, :, 0]).mean())
            # what actually happened: the trainer's AdamW step split, the views measured at every record
            assert tr.metadata["step_split"] == "torch.optim.adamw.AdamW"
            assert np.isfinite(tr.actual_delta[1:]).all() and np.isfinite(tr.step_delta[1:]).all()
            happened = ms.dynamics.classify_delta(tr.logp[-1] - tr.logp[0])
            assert s.happened_fractions == {c: float(np.mean(happened == c)) for c in (1, 2, 3, 4)}
            fit = ms.dynamics.summary.first_order_fit(tr.actual_delta[:, :, 0], tr.observed_delta[:, :, 0])
            np.testing.assert_allclose(s.actual_r["chosen"], fit.r)
        assert abs(sum(s.case_fractions.values()) - 1) < 1e-9 or 0 in s.case_fractions
    assert (out / "report.html").stat().st_size > 10_000
    assert len(list((out / "figures").glob("*.png"))) > 10
    assert any("report:" in line for line in lines)


def test_sft_model_is_cached_by_recipe(demo, monkeypatch):
    out, _, _ = demo
    monkeypatch.setattr("marginscope.demo.recipe.sft_until_ranked", lambda *a, **k: pytest.fail("retrained"))
    model, tokenizer, report = sft_model(SMALL, out / "sft-model")
    assert model.config.n_embd == SMALL.width and len(tokenizer) <= SMALL.vocab_size
    assert report.steps <= SMALL.sft_max_steps and report.history[0][0] == 0 and 0 <= report.accuracy <= 1
    assert SMALL.sft_key() != replace(SMALL, sft_max_steps=21).sft_key()
    assert SMALL.sft_key() != replace(SMALL, sft_target=0.5).sft_key()
    assert SMALL.sft_key() == replace(SMALL, dpo_steps=99).sft_key()


def test_inspect_summarizes_a_demo_trace(demo):
    out, summaries, _ = demo
    result = CliRunner().invoke(app, ["inspect", str(summaries[-1].trace)])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "dpo beta=0.1" in result.output and "in-run" in result.output


def test_demo_command_reports_a_bad_output_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "file")])
    assert result.exit_code == 2 and result.output.startswith("error:")
