"""First order: one plain SGD step of small η on one pair moves every response of the set by
Δlog π_i ≈ η(d_w K[i,w] − d_l K[i,l]) — for every loss of the zoo (float64 model)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.dynamics.scoring import score_rows, sequence_logp

RECORDS = [{"id": "pair", "prompt": "The service was terrible. The sentiment is", "chosen": " negative.",
            "rejected": " positive, very much so.", "extra": {"top": " bad"}}]


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def setting(request):
    """A float64 model end to end (Llama/Qwen2 RMSNorm computes in float32 even for float64
    weights, a ~1e-9 noise floor that would swamp the tiny changes measured here)."""
    from marginscope.demo.tiny import build_model, build_tokenizer
    tok = build_tokenizer()
    probes = ms.probes.ProbeSet.from_records(RECORDS)
    model = build_model(request.param, tok, dtype=torch.float64, seed=0)
    reference = build_model(request.param, tok, dtype=torch.float64, seed=1)
    geo = ms.dynamics.measure(model, tok, probes, params="all")
    ref_logp = sequence_logp(reference, geo.encoded).numpy()
    return model, geo, ref_logp


def _sgd_step(model, geo, loss, ref_logp, eta):
    """A copy of `model` after θ ← θ − η∇ℓ on the pair (chosen, rejected)."""
    stepped = copy.deepcopy(model)
    enc = geo.encoded[0]
    logp = score_rows(stepped, [(enc.prompt_ids, enc.response_ids[0]), (enc.prompt_ids, enc.response_ids[1])]).logp
    as_t = lambda x: torch.tensor([float(x)], dtype=torch.float64)  # noqa: E731
    value = loss(logp[:1], logp[1:], as_t(ref_logp[0, 0]), as_t(ref_logp[0, 1]),
                 as_t(geo.lengths[0, 0]), as_t(geo.lengths[0, 1])).sum()
    params = [p for p in stepped.parameters()]
    grads = torch.autograd.grad(value, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= eta * g
    return stepped


@pytest.mark.parametrize("name", ms.losses.names())
def test_observed_change_matches_first_order_prediction(setting, name):
    model, geo, ref_logp = setting
    loss = ms.losses.get(name)
    d_w, d_l = ms.dynamics.coefficients(loss, geo.logp[:, 0], geo.logp[:, 1], ref_logp[:, 0], ref_logp[:, 1],
                                        geo.lengths[:, 0], geo.lengths[:, 1])
    unit = ms.dynamics.predict_delta(geo.gram, d_w, d_l, eta=1.0)[0]
    eta = 1e-4 / np.abs(unit).max()  # the largest predicted change is 1e-4 nats
    stepped = _sgd_step(model, geo, loss, ref_logp, eta)
    observed = (sequence_logp(stepped, geo.encoded) - sequence_logp(model, geo.encoded)).numpy()[0]
    predicted = eta * unit
    assert geo.names == ["chosen", "rejected", "top"]
    np.testing.assert_allclose(observed, predicted, rtol=0.02, err_msg=f"{name}: d_w={d_w}, d_l={d_l}")
    # the Case agrees with the observed signs of the chosen and rejected changes
    case = ms.dynamics.classify(geo.gram, d_w, d_l)[0]
    up_w, down_l = observed[0] >= 0, observed[1] <= 0
    expected_case = {(True, True): 1, (False, True): 2, (True, False): 3, (False, False): 4}[(up_w, down_l)]
    assert case == expected_case
