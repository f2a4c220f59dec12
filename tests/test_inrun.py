"""In-run pair geometry equals the exact per-pair values of the same step, and never changes training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.dynamics.inrun import InRunGeometry, score_pairs
from marginscope.dynamics.scoring import sequence_logp


def _step_inputs(geo, ref):
    w, l = geo.index("chosen"), geo.index("rejected")
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return t(ref[:, w]), t(ref[:, l]), t(geo.lengths[:, w]), t(geo.lengths[:, l])


@pytest.mark.parametrize("loss_name", ["dpo", "simpo", "ipo", "cpo", "kto"])
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_inrun_equals_exact_pair_geometry(make_model, tokenizer, probes, loss_name, arch):
    model = make_model(arch)
    reference = make_model(arch, seed=1)
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact")
    ref = sequence_logp(reference, geo.encoded).numpy()
    loss = ms.losses.get(loss_name)
    n = len(probes)
    with InRunGeometry(model, n_pairs=n, params="all") as rec:
        logps, _ = score_pairs(model, geo.encoded)
        rec.watch(logps)
        loss(logps[:n], logps[n:], *_step_inputs(geo, ref)).mean().backward()
    got = rec.result()
    np.testing.assert_allclose(got.inner, geo.gram[:, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(got.sq_w, geo.gram[:, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(got.sq_l, geo.gram[:, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(got.cosine, geo.cosine[:, 0, 1], rtol=1e-6)
    d_w, d_l = ms.dynamics.coefficients(loss, geo.logp[:, 0], geo.logp[:, 1], ref[:, 0], ref[:, 1],
                                        geo.lengths[:, 0], geo.lengths[:, 1])
    np.testing.assert_allclose(-got.scale_w * n, d_w, rtol=1e-9)
    np.testing.assert_allclose(got.scale_l * n, d_l, rtol=1e-9)
    np.testing.assert_array_equal(got.case, ms.dynamics.classify(geo.gram, d_w, d_l))
    model.zero_grad(set_to_none=True)


def _train(model, batches, ref, with_geometry: bool, steps: int = 3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = ms.losses.get("dpo")
    model.train()
    seen = []
    for step in range(steps):
        enc = batches
        n = len(enc)
        opt.zero_grad(set_to_none=True)
        ctx = InRunGeometry(model, n_pairs=n, params="all") if with_geometry else None
        if ctx:
            ctx.__enter__()
        logps, _ = score_pairs(model, enc)
        if ctx:
            ctx.watch(logps)
        lengths = torch.tensor([[len(e.response_ids[0]), len(e.response_ids[1])] for e in enc], dtype=logps.dtype)
        loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], lengths[:, 0], lengths[:, 1]).mean().backward()
        if ctx:
            ctx.__exit__(None, None, None)
            seen.append(ctx.result())
        opt.step()
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_is_bit_identical_with_and_without_inrun_hooks(make_model, tokenizer, probes, dtype):
    encoded = ms.dynamics.encode(tokenizer, probes)
    ref = torch.tensor(sequence_logp(make_model("llama", seed=1, dtype=dtype), encoded).numpy(), dtype=dtype)
    plain, hooked = make_model("llama", dtype=dtype), make_model("llama", dtype=dtype)
    torch.manual_seed(0)
    _train(plain, encoded, ref, with_geometry=False)
    torch.manual_seed(0)
    seen = _train(hooked, encoded, ref, with_geometry=True)
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        assert torch.equal(a, b), name
    assert len(seen) == 3 and all(np.isfinite(r.cosine).all() for r in seen)
    for module in hooked.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_zero_scale_pair_is_nan_not_a_crash(make_model, tokenizer, probes):
    model = make_model("gpt2")
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all")
    n = len(probes)
    weights = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # pair 1 contributes nothing
    with InRunGeometry(model, n_pairs=n, params="all") as rec:
        logps, _ = score_pairs(model, geo.encoded)
        rec.watch(logps)
        (weights * -torch.nn.functional.logsigmoid(0.1 * (logps[:n] - logps[n:]))).sum().backward()
    got = rec.result()
    assert np.isnan(got.inner[1]) and np.isnan(got.cosine[1]) and got.case[1] == 0
    np.testing.assert_allclose(got.inner[[0, 2]], geo.gram[[0, 2], 0, 1], rtol=1e-6)
    model.zero_grad(set_to_none=True)


def test_inrun_under_non_reentrant_gradient_checkpointing(make_model, tokenizer, probes):
    model = make_model("llama")
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # HF only checkpoints in train mode; the tiny configs have no dropout
    n = len(probes)
    with InRunGeometry(model, n_pairs=n, params="all") as rec:
        logps, _ = score_pairs(model, geo.encoded)
        rec.watch(logps)
        (-torch.nn.functional.logsigmoid(0.1 * (logps[:n] - logps[n:]))).mean().backward()
    got = rec.result()
    np.testing.assert_allclose(got.inner, geo.gram[:, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(got.sq_w, geo.gram[:, 0, 0], rtol=1e-6)


def test_no_backward_gives_nan_result(make_model, tokenizer, probes):
    model = make_model("gpt2")
    enc = ms.dynamics.encode(tokenizer, probes)
    with InRunGeometry(model, n_pairs=len(enc), params="all") as rec:
        with torch.no_grad():
            score_pairs(model, enc)
    assert np.isnan(rec.result().inner).all()
