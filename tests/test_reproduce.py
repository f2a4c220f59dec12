"""`marginscope reproduce`: the decision rules on synthetic numbers (both ways), every study end to end
on its reduced setting (1 seed, a few steps), figure failures reported not raised, and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import marginscope as ms
from marginscope import reproduce
from marginscope.cli import app
from marginscope.errors import MarginscopeError
from marginscope.reproduce import Finding, StudyResult, load_result
from marginscope.reproduce import losses as losses_study
from marginscope.reproduce import mass_shift, sentiment, spo_stability
from marginscope.reproduce.findings import majority, robust
from marginscope.trace.summary import agreement, intervals


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One SFT-model cache for every study of this module (the reduced sentiment model is shared)."""
    return tmp_path_factory.mktemp("sft-cache")


# --- Finding / StudyResult -------------------------------------------------------------------------------


def test_finding_requires_a_bool_and_numbers():
    with pytest.raises(TypeError):
        Finding("c", "e", "o", np.bool_(True), {"x": 1.0})
    with pytest.raises(TypeError):
        Finding("c", "e", "o", 1, {"x": 1.0})
    with pytest.raises(ValueError):
        Finding("c", "e", "o", True, {})


def test_study_result_json_round_trip(tmp_path):
    f = Finding("claim", "expected", "observed", False, {"a": [1.0, math.nan], "b": np.float64(2.0)})
    result = StudyResult("n", "t", "s", {"k": 1}, [0, 1], [f], [{"row": np.float32(0.5)}], out=str(tmp_path))
    path = result.save(tmp_path)
    data = json.loads(path.read_text())
    assert data["findings"][0]["numbers"] == {"a": [1.0, None], "b": 2.0}
    back = load_result(tmp_path)
    assert back.findings[0].holds is False and back.holding == 0 and back.seeds == [0, 1]
    with pytest.raises(MarginscopeError):
        load_result(tmp_path / "missing.json")


def test_robust_needs_the_seed_mean_and_a_majority():
    cond = lambda v: v["x"] > 0  # noqa: E731
    assert robust({"x": [1.0, 2.0, -0.5]}, ["x"], cond)
    assert not robust({"x": [5.0, -0.1, -0.1]}, ["x"], cond)  # mean > 0, but 1/3 seeds
    assert not robust({"x": [0.1, 0.1, -5.0]}, ["x"], cond)  # 2/3 seeds, but mean < 0
    assert not robust({"x": [math.nan]}, ["x"], cond)
    assert robust({"x": 3.0}, ["x"], cond)  # a scalar is one seed
    assert majority([True, False, True]) and not majority([True, False]) and not majority([])


# --- decisions on synthetic numbers, both ways ----------------------------------------------------------


def test_sentiment_decisions():
    good = {"chosen_single": [0.3, 0.1, -0.1], "chosen_short": [-3.0, -1.0, -2.0], "chosen_long": [-9.0, -4.0, -3.0],
            "cosine_single": [0.3, 0.4, 0.3], "cosine_short": [0.6, 0.5, 0.5], "cosine_long": [0.7, 0.6, 0.4],
            "token_cos_diff": [-0.2, -0.1, 0.1], "token_cos_suffix": [0.9, 0.8, 0.9]}
    assert sentiment.decide_rise_only_single(good)
    assert sentiment.decide_long_below_short(good)
    assert sentiment.decide_cosine_grows(good)
    assert sentiment.decide_diff_negative(good)
    assert sentiment.decide_suffix_positive(good)
    bad = {"chosen_single": [-0.3, -0.1, 0.1], "chosen_short": [-3.0, -5.0, -4.0], "chosen_long": [-1.0, -4.0, -3.0],
           "cosine_single": [0.3, 0.6, 0.6], "cosine_short": [0.6, 0.5, 0.5], "cosine_long": [0.5, 0.6, 0.4],
           "token_cos_diff": [0.2, -0.1, 0.1], "token_cos_suffix": [-0.9, 0.8, -0.9]}
    assert not sentiment.decide_rise_only_single(bad)
    assert not sentiment.decide_long_below_short(bad)
    assert not sentiment.decide_cosine_grows(bad)
    assert not sentiment.decide_diff_negative(bad)
    assert not sentiment.decide_suffix_positive(bad)


def test_sentiment_token_heatmap_helpers():
    ids_w, ids_l = np.array([5, 6, 7, 8, 9]), np.array([5, 6, 1, 8, 9])
    assert sentiment.differing_span(ids_w, ids_l) == (2, 3, 3)
    assert sentiment.differing_span([5, 7, 7, 9], [5, 1, 9]) == (1, 3, 2)  # two tokens vs one
    gram = np.full((5, 5), 0.5)
    gram[2, 2] = -1.0
    gram[np.diag_indices(5)] = np.array([4.0, 4.0, -1.0, 2.0, 3.0])
    cos = sentiment.token_cosines(gram, np.full(5, 4.0), np.full(5, 4.0), ids_w, ids_l)
    assert cos["diff"] == pytest.approx(-0.25)
    assert cos["suffix"] == pytest.approx((0.5 + 0.75) / 2)
    assert cos["prefix"] == pytest.approx(1.0)


def test_losses_decisions():
    n = {"cpo:chosen": [1.0, 0.5, -0.1], "dpo:chosen": [-2.0, -1.0, -1.0], "dpo:rejected": [-5.0, -1.0, -3.0],
         "simpo:chosen_norm": [-0.1, -0.2, -0.1], "simpo:rejected_norm": [-0.3, 0.1, -0.2],
         "sppo:chosen": [0.5, 0.1, 0.2], "sppo:rejected": [-1.0, -2.0, 0.5]}
    assert losses_study.decide_chosen_rises(n, "cpo")
    assert losses_study.decide_both_fall(n, "dpo")
    assert losses_study.decide_both_fall(n, "simpo", normalized=True)
    assert losses_study.decide_chosen_up_rejected_down(n, "sppo")
    m = {"cpo:chosen": [-1.0, 0.5, -0.1], "dpo:chosen": [2.0, -1.0, 1.0], "dpo:rejected": [-5.0, -1.0, -3.0],
         "simpo:chosen_norm": [-0.1, 0.2, 0.1], "simpo:rejected_norm": [-0.3, 0.1, -0.2],
         "sppo:chosen": [-0.5, 0.1, -0.2], "sppo:rejected": [-1.0, -2.0, 0.5]}
    assert not losses_study.decide_chosen_rises(m, "cpo")
    assert not losses_study.decide_both_fall(m, "dpo")
    assert not losses_study.decide_both_fall(m, "simpo", normalized=True)
    assert not losses_study.decide_chosen_up_rejected_down(m, "sppo")


def test_mass_shift_decisions():
    n = {"top_up_frac": [0.7, 0.6, 0.4], "pred_agree_frac": [0.8, 0.9, 0.55],
         "dpo_chosen": [-1.0, -2.0, 0.5], "bilevel_chosen": [1.0, 0.5, 0.1]}
    assert mass_shift.decide_top_gains(n)
    assert mass_shift.decide_prediction_agrees(n)
    assert mass_shift.decide_bilevel_keeps_chosen(n)  # the mean and 2/3 seeds
    n["bilevel_chosen"] = [1.0, -3.0, 0.1]
    assert not mass_shift.decide_bilevel_keeps_chosen(n)  # the mean, but 1/3 seeds
    m = {"top_up_frac": [0.2, math.nan, 0.6], "pred_agree_frac": [0.4, 0.5, 0.9]}
    assert not mass_shift.decide_top_gains(m)
    assert not mass_shift.decide_prediction_agrees(m)  # 0.5 is not better than chance


def test_spo_stability_decisions():
    t = [10.0, 10.0, 10.0]
    n = {"target": t, "spo_margin": [9.0, 11.0, 14.0], "spo_drift": [0.2, -0.5, 0.1],
         "dpo_margin": [15.0, 20.0, 9.0], "dpo_drift": [3.0, 2.0, 1.5],
         "dpo_grad_ratio": [1.5, 1.2, 0.9], "spo_grad_ratio": [0.3, 0.5, 1.1],
         "dpo_dldp_100": [40.0], "dpo_dldp_200": [79.0], "spo_dldp_100": [3.0], "spo_dldp_200": [1.0]}
    assert spo_stability.decide_spo_settles(n)
    assert spo_stability.decide_dpo_grows(n)
    assert spo_stability.decide_grad_contrast(n)
    assert spo_stability.decide_sweep_contrast(n)
    m = {"target": t, "spo_margin": [7.0, 8.0, 16.0], "spo_drift": [2.0, 0.5, 0.1],
         "dpo_margin": [15.0, 20.0, 9.0], "dpo_drift": [0.5, 2.0, 0.0],
         "dpo_grad_ratio": [0.5, 1.2, 0.9], "spo_grad_ratio": [0.3, 0.5, 1.1],
         "dpo_dldp_100": [40.0], "dpo_dldp_200": [79.0], "spo_dldp_100": [41.0], "spo_dldp_200": [80.0]}
    assert not spo_stability.decide_spo_settles(m)
    assert not spo_stability.decide_dpo_grows(m)
    assert not spo_stability.decide_grad_contrast(m)
    assert not spo_stability.decide_sweep_contrast(m)


def test_probability_gradient_sweep_follows_eqs_7_and_8():
    """|∂ℓ/∂π_l| = d_l/π_l ∝ π_l^(β−1): for β < 1 it grows as π_l → 0 for DPO and SPO alike."""
    dpo = spo_stability.prob_gradient_sweep("dpo", 0.1, -2.0, -3.0)
    spo = spo_stability.prob_gradient_sweep("spo", 0.1, -2.0, -3.0)
    assert np.all(np.diff(dpo) > 0) and np.all(np.diff(spo[1:]) > 0)
    # the slope is (1 − β)/ln 10 per nat for DPO once σ(−βm) ≈ e^{−βm}
    assert (dpo[-1] - dpo[-2]) / 100 == pytest.approx(0.9 / math.log(10), rel=1e-3)


# --- every study end to end on its reduced setting ------------------------------------------------------


def _well_formed(result: StudyResult, name: str, out) -> None:
    assert result.name == name and result.seeds == [0] and result.findings
    for f in result.findings:
        assert isinstance(f.holds, bool) and f.numbers and f.claim and f.expected and f.observed
        for value in f.numbers.values():
            assert len(np.atleast_1d(np.asarray(value, dtype=np.float64))) >= 1
    saved = json.loads((out / "results.json").read_text())
    assert [f["holds"] for f in saved["findings"]] == [f.holds for f in result.findings]
    assert result.traces
    for path in result.traces:
        with ms.trace.open(path) as tr:
            assert tr.steps.size >= 2
    assert math.isfinite(result.seconds)


@pytest.mark.parametrize("name", reproduce.names())
def test_every_study_runs_on_its_reduced_setting(name, tmp_path, cache):
    study = reproduce.get(name)
    lines: list[str] = []
    result = study.run(tmp_path / name, reduced=True, cache=cache, say=lines.append)
    _well_formed(result, name, tmp_path / name)
    assert lines and all(line.startswith(f"[{name}]") for line in lines)
    expected = {"sentiment": 5, "losses": 9, "mass-shift": 3, "spo-stability": 4}[name]
    assert len(result.findings) == expected
    # the actual-update views are recorded and explain the observed changes; results.json carries them
    assert result.explanation["traces"] == len(result.traces) > 0
    fits = []
    for path in result.traces:
        with ms.trace.open(path) as tr:
            fits.append(agreement(intervals(tr), tr.names)["fits"]["chosen"]["actual"]["r"])
    assert result.explanation["chosen"]["actual"]["r"] == pytest.approx(np.nanmean(fits))
    assert np.isfinite(result.explanation["chosen"]["actual"]["r"])
    saved = load_result(tmp_path / name).explanation["chosen"]["actual"]["r"]
    assert saved == pytest.approx(result.explanation["chosen"]["actual"]["r"])


def test_a_failing_figure_is_reported_and_the_study_goes_on(tmp_path, cache, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no canvas today")

    monkeypatch.setattr(ms.plots, "save_all", broken)
    lines: list[str] = []
    config = replace(spo_stability.Config.reduced(), figures=True)
    result = spo_stability.run(tmp_path, config=config, cache=cache, say=lines.append)
    assert result.figures == [] and result.figures_error.startswith("RuntimeError: no canvas today")
    assert any("figures FAILED" in line for line in lines)
    assert len(result.findings) == 4 and (tmp_path / "results.json").is_file()


def test_figures_are_written_for_the_first_seed(tmp_path, cache):
    config = replace(mass_shift.Config.reduced(), figures=True)
    result = mass_shift.run(tmp_path, config=config, cache=cache, say=lambda line: None)
    assert result.figures_error is None
    assert any(p.endswith("dpo-logp_trajectories.png") for p in result.figures)
    assert all((tmp_path / "figures").joinpath(p.rsplit("/", 1)[-1]).is_file() for p in result.figures)


def test_arithmetic_answers_are_read_from_every_format():
    for form in ("{answer}", "The answer is {answer}.", "7 * 6 = {answer}.", "It is {answer}.", "{answer}, of course."):
        assert mass_shift._answer(" " + form.format(answer=42)) == "42"
    assert mass_shift._answer(" no idea") is None


def test_seeds_option_is_checked():
    with pytest.raises(MarginscopeError, match="seeds"):
        reproduce.get("sentiment").config(seeds=0)
    assert reproduce.get("losses").config(seeds=2).seeds == 2
    with pytest.raises(MarginscopeError, match="unknown study 'nope'"):
        reproduce.run("nope", "unused")
    with pytest.raises(MarginscopeError, match="threads"):
        reproduce.run("sentiment", "unused", threads=0)


def test_threads_are_set_during_a_study_and_restored(tmp_path, cache, monkeypatch):
    seen = []
    real = spo_stability.run
    monkeypatch.setattr(spo_stability, "run", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reproduce.run("spo-stability", tmp_path, reduced=True, cache=cache, say=lambda line: None)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_lists_the_studies():
    result = CliRunner().invoke(app, ["reproduce", "--list"])
    assert result.exit_code == 0, result.output
    for name in (*reproduce.names(), "all"):
        assert name in result.output


@pytest.mark.parametrize("args", [["reproduce", "nope"], ["reproduce"], ["reproduce", "losses", "--seeds", "0"]])
def test_cli_user_errors_are_one_line(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


def test_cli_runs_a_reduced_study(tmp_path, cache):
    out = tmp_path / "repro"
    result = CliRunner().invoke(app, ["reproduce", "sentiment", "--smoke", "--out", str(out), "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert "claim" in result.output and "holds" in result.output and "claims hold" in result.output
    assert "context (per seed): sft_steps" in result.output and "sft_label_accuracy" in result.output
    assert "first order vs observed" in result.output and "actual update" in result.output
    saved = load_result(out)
    assert saved.name == "sentiment" and len(saved.findings) == 5


def test_cli_runs_the_pretrained_recipe_on_a_model_folder(tmp_path):
    """`--model`: SFT of the given checkpoint until it ranks the labels (each check printed), then the
    study's DPO runs from it; results.json names the model and the SFT outcome per seed."""
    from marginscope.demo.tiny import save_tiny

    model_dir = save_tiny(tmp_path / "my-model", arch="llama")
    out = tmp_path / "repro"
    result = CliRunner().invoke(app, ["reproduce", "sentiment", "--smoke", "--model", str(model_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"SFT of {model_dir}" in result.output and "SFT step 2: held-out label accuracy" in result.output
    saved = load_result(out)
    assert saved.setting["model"] == str(model_dir) and saved.setting["sft"]["train_layers"] == 1
    assert saved.context["sft_steps"][0] in (2, 4) and 0 <= saved.context["sft_label_accuracy"][0] <= 1
    assert len(saved.findings) == 5 and not (out / "sft-models").exists()


def test_train_top_layers_freezes_everything_below(tmp_path):
    from marginscope.demo.tiny import build_model, build_tokenizer
    from marginscope.reproduce.models import train_top_layers

    model = build_model("llama", build_tokenizer(), layers=3)
    n = train_top_layers(model, 1)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.2." in name or name == "model.norm.weight" for name in trainable)
    assert "model.norm.weight" in trainable and n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert train_top_layers(model, None) == sum(p.numel() for p in model.parameters())
    with pytest.raises(MarginscopeError, match="train_layers must be between 1 and the model's 3 blocks"):
        train_top_layers(model, 4)


@pytest.mark.parametrize("args, message", [
    (["reproduce", "losses", "--model", "."], "runs on its own tiny models only; --model works with: sentiment"),
    (["reproduce", "all", "--model", "."], "--model runs one study at a time"),
    (["reproduce", "sentiment", "--model", "no-such-model"], "does not exist"),
])
def test_cli_model_option_errors_are_one_line(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert message in result.output
