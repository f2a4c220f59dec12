"""Who pushed it (DESIGN.md §2b): each training pair's share of the optimizer step's gradient part on the
probes, against an independent oracle — per-pair gradients from torch.func (∂ℓ_j/∂log π by autograd on
the loss, flattened ∇log π of each unpadded response), the optimizer's preconditioner recomputed by
hand from its post-step state, dotted with flattened probe gradients at θ_t."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.dynamics.attribution import PairGradientCollector
from marginscope.dynamics.exact import select_parameters
from marginscope.probes import ProbeSet
from oracles import flat_grad
from test_update import TRAIN, _model, float64_rms_norm  # noqa: F401 — the fixture is autouse there

BETA = 0.5


def _dpo(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-pair DPO losses of [2P] log-probs (TRL layout) against the reference [2P]."""
    n = len(logps) // 2
    margin = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
    return -torch.nn.functional.logsigmoid(BETA * margin)


def _pair_oracle(model, names, batch, ref, normalization: float) -> np.ndarray:
    """[P, D] flattened gradient of ℓ_j / normalization for every pair j, from per-response torch.func
    gradients and ∂ℓ_j/∂log π computed by autograd on the loss alone."""
    model.eval()
    rows = []
    for j, e in enumerate(batch):
        a = [flat_grad(model, names, e.prompt_ids, r) for r in e.response_ids[:2]]
        lp = torch.tensor([float(ms.dynamics.score_rows(model, [(e.prompt_ids, r)]).logp[0].detach()) for r in e.response_ids[:2]],
                          dtype=torch.float64, requires_grad=True)
        loss = _dpo(lp, torch.stack([ref[j], ref[len(batch) + j]]))[0] / normalization
        s = torch.autograd.grad(loss, lp)[0]
        rows.append((s[0] * a[0] + s[1] * a[1]).numpy())
    return np.stack(rows)


def _preconditioner(optimizer, model, names) -> np.ndarray:
    """c_t flattened, from the optimizer's state after its step (AdamW) or its hyper-parameters (SGD)."""
    group = optimizer.param_groups[0]
    params = dict(model.named_parameters())
    out = []
    for n in names:
        p = params[n]
        if isinstance(optimizer, torch.optim.AdamW):
            beta1, beta2 = group["betas"]
            st = optimizer.state[p]
            t = float(st["step"])
            denom = st["exp_avg_sq"].double().sqrt() / (1 - beta2 ** t) ** 0.5 + group["eps"]
            c = -group["lr"] / (1 - beta1 ** t) * (1 - beta1) / denom
        else:  # SGD, no dampening: b_t = μ b_{t−1} + g_t, the gradient part is −lr·g_t
            c = torch.full_like(p, -group["lr"], dtype=torch.float64)
        out.append(c.reshape(-1))
    return torch.cat(out).numpy()


def _probe_grads(model, names, encoded) -> np.ndarray:
    model.eval()
    return np.stack([np.stack([flat_grad(model, names, e.prompt_ids, r).numpy() for r in e.response_ids])
                     for e in encoded])


OPTIMIZERS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1),
              "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)}


@pytest.mark.parametrize("arch,opt_name,micro", [
    ("gpt2", "adamw", 1), ("llama", "adamw", 2), ("lora", "adamw", 1), ("gpt2", "sgd", 2), ("lora", "sgd", 1),
])
def test_probe_effect_equals_the_oracle(make_model, tokenizer, probes, tmp_path, arch, opt_name, micro):
    """Plain loop, records every 2 steps, `micro` micro-batches per step (gradient accumulation)."""
    model = _model(make_model, arch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[opt_name]([p for p in model.parameters() if p.requires_grad])
    train = ms.dynamics.encode(tokenizer, ProbeSet.from_records(TRAIN))
    with torch.no_grad():
        ref = ms.dynamics.score_pairs(model, train)[0].detach()
    tracker = ms.Tracker(model, tokenizer, probes, tmp_path / "t.h5", loss="dpo", every=2, optimizer=optimizer)
    chunks = np.array_split(np.arange(len(train)), micro)
    expected = {}
    for step in (1, 2, 3, 4):
        model.train()
        oracle_pairs = []
        for idx in chunks:
            batch = [train[i] for i in idx]
            batch_ref = torch.cat([ref[:len(train)][idx], ref[len(train):][idx]])
            with tracker.in_run(n_pairs=len(batch), examples=batch) as geo:
                logps, _ = ms.dynamics.score_pairs(model, batch)
                geo.watch(logps)
                (_dpo(logps, batch_ref).sum() / len(train)).backward()
            if step % 2 == 0:
                oracle_pairs.append(_pair_oracle(model, names, batch, batch_ref, len(train)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 2 == 0:
            c = _preconditioner(optimizer, model, names)
            a = _probe_grads(model, names, tracker.encoded)  # at θ_t
            expected[step] = np.einsum("nrd,jd->jnr", a, c * np.concatenate(oracle_pairs))
        tracker.step(step)
    tracker.close()
    with ms.trace.open(tmp_path / "t.h5") as tr:
        rows, parts = tr.inrun(), tr.step_parts
        steps = list(tr.steps)
    for step, want in expected.items():
        sel = rows["step"] == step
        got = rows["probe_effect"][sel]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12 * np.abs(want).max())
        np.testing.assert_allclose(rows["effect_scale"][sel], 1.0, rtol=1e-9)
        # the pairs' shares add up to the gradient part of step_parts
        np.testing.assert_allclose(got.sum(0), parts["gradient"][steps.index(step)], rtol=1e-9,
                                   atol=1e-12 * np.abs(want).max())
        assert list(rows["pair_id"][sel]) == [e["id"] for e in TRAIN]
        assert rows["chosen"][sel][0] == tokenizer.decode(list(train[0].response_ids[0]))
    odd = np.isin(rows["step"], [1, 3])
    assert np.isnan(rows["probe_effect"][odd]).all() and (rows["prompt"][odd] == "").all()


def test_pair_gradients_sum_to_the_accumulated_grad(make_model, tokenizer):
    """The collector's per-pair gradients add up to what the backward put into `.grad`, for a tied model
    whose head and embedding share a weight, with right padding and unequal lengths."""
    model = make_model("gpt2")
    train = ms.dynamics.encode(tokenizer, ProbeSet.from_records(TRAIN))
    scope = select_parameters(model, "trainable")
    model.train()
    with PairGradientCollector(model, scope, [[j, 3 + j] for j in range(3)]) as collector:
        logps, _ = ms.dynamics.score_pairs(model, train)
        collector.check_attribution(logps)
        (logps * torch.linspace(-1, 2, 6, dtype=logps.dtype)).sum().backward()
    for n, p in zip(scope.names, scope.params):
        torch.testing.assert_close(collector.gradients[n].sum(0), p.grad, rtol=1e-10, atol=1e-12)


def test_attribution_off_and_auto(make_model, tokenizer, probes, tmp_path, monkeypatch, caplog):
    """attribution=False records none; None skips (one warning) when the pair gradients exceed the budget;
    without an optimizer nothing is materialized."""
    import marginscope.tracker as tracker_module

    train = ms.dynamics.encode(tokenizer, ProbeSet.from_records(TRAIN))
    for attribution, budget, measured in ((False, 1 << 40, False), (None, 1, False), (None, 1 << 40, True)):
        monkeypatch.setattr(tracker_module, "ATTRIBUTION_AUTO_BYTES", budget)
        model = make_model("gpt2")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        path = tmp_path / f"{attribution}-{budget}.h5"
        tracker = ms.Tracker(model, tokenizer, probes, path, loss="dpo", every=1, optimizer=opt,
                             attribution=attribution)
        assert tracker.wants_pair_gradients(3) is measured
        with tracker.in_run(n_pairs=3, examples=train) as geo:
            logps, _ = ms.dynamics.score_pairs(model, train)
            geo.watch(logps)
            logps.sum().backward()
        opt.step()
        tracker.step(1)
        tracker.close()
        with ms.trace.open(path) as tr:
            effect = tr.inrun()["probe_effect"]
            assert effect.shape == (3, len(probes), 3)
            assert bool(np.isfinite(effect).all()) is measured and bool(np.isnan(effect).all()) is not measured
    assert "per-pair attribution skipped" in caplog.text


def test_training_is_bit_identical_with_the_attribution(make_model, tokenizer, probes, tmp_path):
    """Dropout 0.1, AdamW, a record (and so an attributed step) every step: the same parameters, bit for bit,
    with the tracker attributing as without any tracker."""
    train = ms.dynamics.encode(tokenizer, ProbeSet.from_records(TRAIN))

    def run(tracked: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = make_model("gpt2", dtype=torch.float32, dropout=0.1).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = (ms.Tracker(model, tokenizer, probes, tmp_path / "t.h5", loss="dpo", every=1, optimizer=opt,
                              attribution=True, overwrite=True) if tracked else None)
        for step in (1, 2, 3):
            ctx = tracker.in_run(n_pairs=3, examples=train) if tracked else None
            if ctx is not None:
                ctx.__enter__()
            logps, _ = ms.dynamics.score_pairs(model, train)
            if ctx is not None:
                ctx.watch(logps)
            (logps[3:] - logps[:3]).sum().backward()
            if ctx is not None:
                ctx.__exit__(None, None, None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if tracked:
                tracker.step(step)
        if tracked:
            tracker.close()
            with ms.trace.open(tmp_path / "t.h5") as tr:
                assert np.isfinite(tr.inrun()["probe_effect"]).all()  # every step was attributed
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    plain, tracked = run(False), run(True)
    assert all(torch.equal(plain[n], tracked[n]) for n in plain)


def test_a_step_with_pairs_missing_their_gradient_is_not_attributed(make_model, tokenizer, probes, tmp_path,
                                                                   monkeypatch, caplog):
    """Gradient accumulation under attribution=None's budget: the first micro-batches fit, the last does not.
    Attributing the pairs that have a gradient would fit κ to part of the step (κ ≠ 1, their shares inflated by
    the missing pair's): the step gets no attribution at all, with a warning."""
    import marginscope.tracker as tracker_module

    model = make_model("gpt2")
    size = sum(p.numel() * 8 for p in model.parameters())
    monkeypatch.setattr(tracker_module, "ATTRIBUTION_AUTO_BYTES", 2 * size)  # two pairs' gradients fit, not three
    train = ms.dynamics.encode(tokenizer, ProbeSet.from_records(TRAIN))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = ms.Tracker(model, tokenizer, probes, tmp_path / "t.h5", loss="dpo", every=1, optimizer=opt)
    model.train()
    for j in range(3):  # one pair per micro-batch
        with tracker.in_run(n_pairs=1, examples=[train[j]]) as geo:
            logps, _ = ms.dynamics.score_pairs(model, [train[j]])
            geo.watch(logps)
            (logps[0] - logps[1]).backward()
    opt.step()
    tracker.step(1)
    tracker.close()
    with ms.trace.open(tmp_path / "t.h5") as tr:
        rows = tr.inrun()
    assert len(rows["step"]) == 3 and np.isnan(rows["probe_effect"]).all() and np.isnan(rows["effect_scale"]).all()
    assert "no per-pair attribution is recorded for this step" in caplog.text


def test_a_loss_term_outside_the_pairs_gets_no_attribution(make_model, tokenizer, probes, tmp_path, caplog):
    """An L2 penalty on the parameters is part of the gradient the optimizer steps with but of no pair's: κ
    cannot make the pairs add up to it, so the step is not attributed (a warning names the residual)."""
    model = make_model("gpt2")
    train = ms.dynamics.encode(tokenizer, ProbeSet.from_records(TRAIN))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = ms.Tracker(model, tokenizer, probes, tmp_path / "t.h5", loss="dpo", every=1, optimizer=opt)
    model.train()
    with tracker.in_run(n_pairs=3, examples=train) as geo:
        logps, _ = ms.dynamics.score_pairs(model, train)
        geo.watch(logps)
        penalty = sum((p * p).sum() for p in model.parameters())
        ((logps[3:] - logps[:3]).sum() + 0.1 * penalty).backward()
    opt.step()
    tracker.step(1)
    tracker.close()
    with ms.trace.open(tmp_path / "t.h5") as tr:
        rows = tr.inrun()
        assert np.isfinite(tr.step_parts["gradient"][1]).all()  # the step itself is still split
    assert np.isnan(rows["probe_effect"]).all() and np.isnan(rows["effect_scale"]).all()
    assert "explain the step's gradient only up to a relative residual" in caplog.text
