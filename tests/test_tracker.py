"""The tracker in a plain PyTorch loop: records equal `measure` at those steps, training is untouched,
failures disable a measurement and never training, traces resume."""

from __future__ import annotations

import contextlib
import copy
import logging

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.dynamics.inrun import score_pairs
from marginscope.dynamics.scoring import top_tokens


def _train(model, tokenizer, probes, steps: int, tracker: ms.Tracker | None = None, in_run: bool = True,
           lr: float = 1e-2):
    """A plain DPO loop over the probe pairs (reference = initial policy); state dicts per step."""
    torch.manual_seed(1234)
    encoded = ms.dynamics.encode(tokenizer, probes)
    n = len(encoded)
    loss = ms.losses.get("dpo", beta=0.5)
    with torch.no_grad():
        ref, _ = score_pairs(model.eval(), encoded)
    lengths = torch.tensor([[len(e.response_ids[0]), len(e.response_ids[1])] for e in encoded], dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    states = {0: copy.deepcopy(model.state_dict())}
    for step in range(1, steps + 1):
        ctx = tracker.in_run(n_pairs=n) if tracker is not None and in_run else contextlib.nullcontext()
        with ctx as geo:
            logps, _ = score_pairs(model, encoded)
            if geo is not None:
                geo.watch(logps)
            loss(logps[:n], logps[n:], ref[:n], ref[n:], lengths[:, 0], lengths[:, 1]).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.step(step)
        states[step] = copy.deepcopy(model.state_dict())
    return states


def _fresh(make_model, state, **kwargs):
    model = make_model("gpt2", dropout=0.1, **kwargs)
    model.load_state_dict(state)
    return model


def test_records_equal_measure_at_those_steps(make_model, tokenizer, probes, tmp_path):
    model = make_model("gpt2", dropout=0.1)
    loss = ms.losses.get("dpo", beta=0.5)
    path = tmp_path / "run.h5"
    with ms.Tracker(model, tokenizer, probes, path, loss=loss, every=2, per_token="head",
                    per_token_probes=["p1"], top_k=3) as tracker:
        states = _train(model, tokenizer, probes, 5, tracker)
    tr = ms.trace.open(path)
    np.testing.assert_array_equal(tr.steps, [0, 2, 4])
    assert tr.names == ["chosen", "rejected", "top"]
    ref = None
    for s, step in enumerate(tr.steps):
        m = _fresh(make_model, states[int(step)])
        geo = ms.dynamics.measure(m, tokenizer, probes)
        ref = geo.logp if ref is None else ref
        dyn = ms.dynamics.pair_dynamics(geo, loss, ref)
        np.testing.assert_allclose(tr.logp[s], geo.logp, rtol=1e-12)
        np.testing.assert_allclose(tr.token_logp[s], geo.token_logp, rtol=1e-12)
        np.testing.assert_allclose(tr.gram[s], geo.gram, rtol=1e-10)
        np.testing.assert_allclose(tr.d_w[s], dyn.d_w, rtol=1e-10)
        np.testing.assert_allclose(tr.d_l[s], dyn.d_l, rtol=1e-10)
        np.testing.assert_array_equal(tr.case[s], dyn.case)
        np.testing.assert_allclose(tr.predicted_delta[s], dyn.predicted_delta, rtol=1e-10)
        ids, prob = top_tokens(m, geo.encoded, 3)
        np.testing.assert_array_equal(tr.topk_ids[s], ids)
        np.testing.assert_allclose(tr.topk_prob[s], prob, rtol=1e-6)
        assert not tr.nonfinite[s].any()
        tok = ms.dynamics.measure(m, tokenizer, probes[1:2], per_token="head")
        np.testing.assert_allclose(tr.token_gram(1)["gram"][s], tok.token_gram["p1"], rtol=1e-10)
        if s:
            np.testing.assert_allclose(tr.observed_delta[s], tr.logp[s] - tr.logp[s - 1], rtol=1e-12)
    assert np.isnan(tr.observed_delta[0]).all()
    np.testing.assert_allclose(tr.ref_logp, tr.logp[0])
    assert tr.token_gram(0) is None
    inrun = tr.inrun()
    assert sorted(set(inrun["step"].tolist())) == [1, 2, 3, 4, 5]
    assert len(inrun["step"]) == 5 * len(probes)
    meta = tr.metadata
    assert meta["loss"] == "dpo" and meta["loss_hparams"] == {"beta": 0.5} and meta["every"] == 2
    assert meta["model_config_hash"] and meta["versions"]["torch"] == torch.__version__
    summary = tracker.summary
    assert set(summary) >= {"marginscope/cosine_mean", "marginscope/case1_frac", "marginscope/logp_top_mean",
                            "marginscope/inrun_cosine_mean"}
    tr.close()


def test_inrun_rows_equal_exact_pair_geometry(make_model, tokenizer, probes, tmp_path):
    model = make_model("gpt2")
    path = tmp_path / "run.h5"
    with ms.Tracker(model, tokenizer, probes, path, loss="dpo", every=1) as tracker:
        states = _train(model, tokenizer, probes, 2, tracker, lr=1e-3)
    with ms.trace.open(path) as tr:
        inrun = tr.inrun()
        for step in (1, 2):  # the loop trains on ms.dynamics.encode's ids: the "separate" convention
            geo = ms.dynamics.measure(_fresh(make_model, states[step - 1]), tokenizer, probes, engine="exact",
                                      convention="separate")
            rows = inrun["step"] == step
            np.testing.assert_array_equal(inrun["pair"][rows], np.arange(len(probes)))
            np.testing.assert_allclose(inrun["inner"][rows], geo.gram[:, 0, 1], rtol=1e-8)
            np.testing.assert_allclose(inrun["sq_w"][rows], geo.gram[:, 0, 0], rtol=1e-8)
            np.testing.assert_allclose(inrun["logp_w"][rows], geo.logp[:, 0], rtol=1e-10)


def test_parameters_bit_identical_with_and_without_tracker(make_model, tokenizer, probes, tmp_path):
    plain = make_model("gpt2", dropout=0.1)
    tracked = make_model("gpt2", dropout=0.1)
    rng = torch.random.get_rng_state()
    expected = _train(plain, tokenizer, probes, 4)[4]
    torch.random.set_rng_state(rng)
    with ms.Tracker(tracked, tokenizer, probes, tmp_path / "run.h5", loss="dpo", every=1,
                    per_token="exact", per_token_probes=["p0"]) as tracker:
        got = _train(tracked, tokenizer, probes, 4, tracker)[4]
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
    assert all(p.grad is None for p in tracked.parameters())
    assert tracked.training


def test_failing_measurement_is_logged_once_and_disabled(make_model, tokenizer, probes, tmp_path, monkeypatch,
                                                         caplog):
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("engine exploded")

    monkeypatch.setattr("marginscope.tracker.measure", broken)
    model = make_model("gpt2", dropout=0.1)
    path = tmp_path / "run.h5"
    with caplog.at_level(logging.ERROR, logger="marginscope"):
        with ms.Tracker(model, tokenizer, probes, path, loss="dpo", every=1) as tracker:
            _train(model, tokenizer, probes, 3, tracker)
    assert calls["n"] == 1
    assert sum("geometry measurement failed" in r.getMessage() for r in caplog.records) == 1
    with ms.trace.open(path) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 1, 2, 3])
        assert np.isnan(tr.gram).all() and tr.nonfinite.all()
        assert np.isfinite(tr.logp).all()  # log-probs still come from a no-gradient pass
        assert (tr.topk_ids[..., 0] >= 0).any()


def test_failing_inrun_geometry_leaves_training_alone(make_model, tokenizer, probes, tmp_path, monkeypatch):
    expected = _train(make_model("gpt2", dropout=0.1), tokenizer, probes, 2)[2]

    def broken(self, logps):
        raise RuntimeError("watch exploded")

    monkeypatch.setattr("marginscope.dynamics.inrun.InRunGeometry.watch", broken)
    model = make_model("gpt2", dropout=0.1)
    with ms.Tracker(model, tokenizer, probes, tmp_path / "run.h5", loss="dpo", every=1) as tracker:
        got = _train(model, tokenizer, probes, 2, tracker)[2]
        assert "in_run" in tracker.guard.disabled
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


def test_inrun_hook_failing_inside_the_backward_is_contained(make_model, tokenizer, probes, tmp_path, monkeypatch,
                                                              caplog):
    expected = _train(make_model("gpt2", dropout=0.1), tokenizer, probes, 2)[2]

    def broken(self, *args, **kwargs):
        raise RuntimeError("contraction exploded")

    monkeypatch.setattr("marginscope.dynamics.ghost.GramSums.add", broken)
    model = make_model("gpt2", dropout=0.1)
    with caplog.at_level(logging.ERROR, logger="marginscope"):
        with ms.Tracker(model, tokenizer, probes, tmp_path / "run.h5", loss="dpo", every=1) as tracker:
            got = _train(model, tokenizer, probes, 2, tracker)[2]
    assert "contraction exploded" in tracker.guard.disabled["in_run"]
    assert sum("in_run measurement failed" in r.getMessage() for r in caplog.records) == 1
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
    with ms.trace.open(tmp_path / "run.h5") as tr:
        assert len(tr.inrun()["step"]) == 0


def test_training_errors_inside_in_run_propagate(make_model, tokenizer, probes, tmp_path):
    model = make_model("gpt2")
    with ms.Tracker(model, tokenizer, probes, tmp_path / "run.h5", loss="dpo") as tracker:
        with pytest.raises(ValueError, match="user bug"):
            with tracker.in_run(n_pairs=3):
                raise ValueError("user bug")


def test_resume_drops_records_past_the_checkpoint(make_model, tokenizer, probes, tmp_path):
    model = make_model("gpt2")
    path = tmp_path / "run.h5"
    with ms.Tracker(model, tokenizer, probes, path, loss="dpo", every=2) as tracker:
        states = _train(model, tokenizer, probes, 6, tracker)
    with ms.trace.open(path) as tr:
        before = tr.logp
        np.testing.assert_array_equal(tr.steps, [0, 2, 4, 6])
    resumed = _fresh(make_model, states[2])
    with ms.Tracker(resumed, tokenizer, probes, path, loss="dpo", every=2, start_step=2) as tracker:
        for step in (3, 4, 5):
            tracker.step(step)
    with ms.trace.open(path) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 2, 4])
        np.testing.assert_allclose(tr.logp[:2], before[:2])
        np.testing.assert_allclose(tr.logp[2], before[1])  # the model was not trained after resuming
        np.testing.assert_allclose(tr.observed_delta[2], 0.0, atol=1e-12)
        assert (tr.inrun()["step"] <= 2).all()


def test_user_errors_raise_before_training(make_model, tokenizer, probes, tmp_path):
    model = make_model("gpt2")
    path = tmp_path / "run.h5"
    ms.Tracker(model, tokenizer, probes, path, loss="dpo").close()
    with pytest.raises(ms.MarginscopeError, match="exists"):
        ms.Tracker(model, tokenizer, probes, path, loss="dpo")
    ms.Tracker(model, tokenizer, probes, path, loss="dpo", overwrite=True).close()
    with pytest.raises(ms.MarginscopeError, match="does not exist"):
        ms.Tracker(model, tokenizer, probes, tmp_path / "nope" / "run.h5", loss="dpo")
    with pytest.raises(ms.MarginscopeError, match="every"):
        ms.Tracker(model, tokenizer, probes, tmp_path / "b.h5", loss="dpo", every=0)
    with pytest.raises(ms.MarginscopeError, match="no probe with id"):
        ms.Tracker(model, tokenizer, probes, tmp_path / "b.h5", loss="dpo", per_token="head",
                   per_token_probes=["zz"])
    other = probes.with_extra("more", {p.id: " other" for p in probes})
    with pytest.raises(ms.MarginscopeError, match="probe"):
        ms.Tracker(model, tokenizer, other, path, loss="dpo", start_step=4)


def test_top_tokens_match_a_full_softmax(make_model, tokenizer, probes):
    model = make_model("llama")
    encoded = ms.dynamics.encode(tokenizer, probes)
    ids, prob = top_tokens(model, encoded, 4, batch_size=2, padding_side="left")
    for n, probe in enumerate(encoded):
        for r, (prompt, response) in enumerate(probe.rows()):
            full = torch.tensor([list(prompt) + list(response)])
            with torch.no_grad():
                p = model(full).logits[0].softmax(-1)[len(prompt) - 1:len(prompt) - 1 + len(response)]
            top = p.topk(4, dim=-1)
            np.testing.assert_array_equal(ids[n, r, :len(response)], top.indices.numpy())
            np.testing.assert_allclose(prob[n, r, :len(response)], top.values.numpy(), rtol=1e-5)
            assert (ids[n, r, len(response):] == -1).all() and np.isnan(prob[n, r, len(response):]).all()


def test_plain_pytorch_recipe_in_the_docs_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "tracking.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet, scope)
    tr = scope["tr"]
    np.testing.assert_array_equal(tr.steps, [0, 2, 4, 6])
    assert tr.logp.shape == (4, 3, 2) and len(tr.inrun()["step"]) == 18
    assert scope["ds"].logp.sel(response="chosen").shape == (4, 3)
    tr.close()
