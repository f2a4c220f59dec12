"""Coefficients by autograd against closed forms and finite differences; Cases and predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marginscope import losses
from marginscope.dynamics.coefficients import (
    CASE_NAMES,
    case_thresholds,
    classify,
    coefficients,
    gram_cosine,
    log_prob_ntk,
    predict_delta,
    probability_dynamics,
)
from marginscope.errors import MarginscopeError


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def batch(seed: int, n: int = 6):
    """A random batch of pairs: log-probs, reference log-probs and lengths (float64 numpy)."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(-30, -1, n), rng.uniform(-30, -1, n), rng.uniform(-30, -1, n),
            rng.uniform(-30, -1, n), rng.integers(1, 20, n).astype(float), rng.integers(1, 20, n).astype(float))


# --- closed forms ------------------------------------------------------------------------------


def test_dpo_closed_form():
    lw, ll, rw, rl, nw, nl = batch(0)
    d_w, d_l = coefficients(losses.get("dpo", beta=0.2), lw, ll, rw, rl, nw, nl)
    expected = 0.2 * sig(-0.2 * ((lw - rw) - (ll - rl)))
    assert d_w.dtype == np.float64 and d_w.shape == (6,)
    np.testing.assert_allclose(d_w, expected, rtol=1e-12)
    np.testing.assert_allclose(d_l, expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["dpo", "r-dpo", "ipo", "sigmoid", "bilevel-spo"])
def test_pure_margin_losses_have_equal_coefficients(name):
    lw, ll, rw, rl, nw, nl = batch(1)
    d_w, d_l = coefficients(losses.get(name, **({"lam": 0.0} if name == "bilevel-spo" else {})),
                            lw, ll, rw, rl, nw, nl)
    np.testing.assert_allclose(d_w / d_l, 1.0, rtol=1e-12)


def test_dpop_ratio_is_one_above_reference_and_one_plus_lambda_below():
    lw, ll, rw, rl, nw, nl = batch(2)
    above = coefficients(losses.get("dpop"), np.maximum(lw, rw) + 0.5, ll, rw, rl, nw, nl)
    np.testing.assert_allclose(above[0] / above[1], 1.0, rtol=1e-12)
    below = coefficients(losses.get("dpop", lam=5.0), np.minimum(lw, rw) - 0.5, ll, rw, rl, nw, nl)
    np.testing.assert_allclose(below[0] / below[1], 6.0, rtol=1e-12)


@pytest.mark.parametrize("name", ["simpo", "alpha-dpo"])
def test_length_normalized_ratio(name):
    lw, ll, rw, rl, nw, nl = batch(3, n=7)
    assert len(set(nw / nl)) > 3
    d_w, d_l = coefficients(losses.get(name), lw, ll, rw, rl, nw, nl)
    np.testing.assert_allclose(d_w / d_l, nl / nw, rtol=1e-12)
    assert np.all(d_w > 0)


def test_sppo_ratio_with_zero_reference():
    beta = 0.1
    lw, ll, _, _, nw, nl = batch(4)
    zero = np.zeros_like(lw)
    d_w, d_l = coefficients(losses.get("sppo", beta=beta), lw, ll, zero, zero, nw, nl)
    np.testing.assert_allclose(d_w / d_l, (1 / beta - lw) / (1 / beta + ll), rtol=1e-12)
    np.testing.assert_allclose(d_w, 2 * (1 / beta - lw), rtol=1e-12)


def test_kto_ratio():
    beta, lam_w, lam_l, z = 0.3, 1.5, 0.7, 0.2
    lw, ll, rw, rl, nw, nl = batch(5)
    d_w, d_l = coefficients(losses.get("kto", beta=beta, lam_w=lam_w, lam_l=lam_l, z_ref=z), lw, ll, rw, rl, nw, nl)

    def dsig(x):
        return sig(x) * (1 - sig(x))

    expected = lam_w * dsig(beta * (lw - rw) - z) / (lam_l * dsig(z - beta * (ll - rl)))
    np.testing.assert_allclose(d_w / d_l, expected, rtol=1e-10)


def test_spo_coefficient_changes_sign_at_target():
    beta = 0.1
    x = np.array([-2.0, 0.3, 1.0, 1.7, 5.0])
    lw, ll = x / beta - 5.0, np.full(5, -5.0)  # r_w - r_l = x/beta with zero references
    zero, one = np.zeros(5), np.ones(5)
    d_w, d_l = coefficients(losses.get("spo", beta=beta), lw, ll, zero, zero, one, one)
    np.testing.assert_allclose(d_w, beta * (1 - x) * np.exp(-x), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d_l, d_w, rtol=1e-12, atol=1e-15)
    assert np.all(d_w[:2] > 0) and abs(d_w[2]) < 1e-12 and np.all(d_w[3:] < 0)


# --- autograd against central finite differences, every registered loss --------------------------


def _fd(loss, args, i, h=1e-5):
    def f(v):
        a = [torch.tensor(x, dtype=torch.float64) for x in args]
        a[i] = torch.tensor(v, dtype=torch.float64)
        return loss(*a).sum().item()
    x = np.asarray(args[i], dtype=np.float64)
    return np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(len(x))])


@pytest.mark.parametrize("name", losses.names())
def test_coefficients_match_finite_differences(name):
    loss = losses.get(name)
    for seed in range(4):
        args = [a[:1] for a in batch(100 + seed)]  # one pair: α-DPO's batch z-score is then constant
        d_w, d_l = coefficients(loss, *args)
        np.testing.assert_allclose(d_w, -_fd(loss, args, 0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(d_l, _fd(loss, args, 1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in losses.names() if n != "alpha-dpo"])
def test_batch_coefficients_are_per_pair(name):
    loss, args = losses.get(name), batch(7, n=4)
    d_w, d_l = coefficients(loss, *args)
    single = [coefficients(loss, *[a[i:i + 1] for a in args]) for i in range(4)]
    np.testing.assert_allclose(d_w, [s[0][0] for s in single], rtol=1e-12)
    np.testing.assert_allclose(d_l, [s[1][0] for s in single], rtol=1e-12)


def test_coefficients_accept_tensors_and_leave_caller_state_alone():
    args = batch(8)
    torch_rng, np_rng = torch.get_rng_state(), np.random.get_state()
    with torch.no_grad():
        d_w, d_l = coefficients(losses.get("dpo"), *[torch.tensor(a, dtype=torch.float32) for a in args])
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), torch_rng) and np.random.get_state()[1].tolist() == np_rng[1].tolist()
    ref = coefficients(losses.get("dpo"), *[np.float32(a) for a in args])
    assert d_w.dtype == np.float64
    np.testing.assert_allclose(d_w, ref[0], rtol=1e-12)
    np.testing.assert_allclose(d_l, ref[1], rtol=1e-12)


def test_coefficients_reject_a_mean_loss_and_handle_unused_inputs():
    args = batch(9)
    with pytest.raises(MarginscopeError, match="per-pair"):
        coefficients(lambda *a: losses.get("dpo")(*a).mean(), *args)
    d_w, d_l = coefficients(losses.trl_loss("sft"), *args)
    np.testing.assert_allclose(d_w, 1 / args[4], rtol=1e-12)
    np.testing.assert_array_equal(d_l, 0.0)


# --- predictions and Cases -----------------------------------------------------------------------


def test_predict_delta_by_hand():
    k = np.array([[[4.0, 1.0, 2.0], [1.0, 3.0, 0.0], [2.0, 0.0, 5.0]]])
    delta = predict_delta(k, np.array([2.0]), np.array([0.5]), eta=0.1)
    # 0.1 (2 K[i,0] - 0.5 K[i,1])
    np.testing.assert_allclose(delta, [[0.75, 0.05, 0.4]], rtol=1e-12)
    delta = predict_delta(k, [2.0], [0.5], eta=1.0, w=2, l=0)  # 2 K[i,2] - 0.5 K[i,0]
    np.testing.assert_allclose(delta, [[2.0, -0.5, 9.0]], rtol=1e-12)


CASE1 = [[2.0, 1.0], [1.0, 2.0]]  # d_w = d_l = 1: Δw = 1, Δl = -1
CASE2 = [[1.0, 2.0], [2.0, 5.0]]  # Δw = -1, Δl = -3
CASE3 = [[5.0, 2.0], [2.0, 1.0]]  # Δw = 3, Δl = 1


def test_classify_all_cases_and_undetermined():
    gram = np.array([CASE1, CASE2, CASE3, CASE1, CASE2, CASE1, CASE1, [[1.0, 1.0], [1.0, 1.0]]])
    d_w = np.array([1.0, 1.0, 1.0, -1.0, -1.0, np.nan, 1.0, 1.0])
    d_l = np.array([1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    gram[6, 0, 1] = gram[6, 1, 0] = np.nan
    case = classify(gram, d_w, d_l)
    # negative coefficients flip the signs: Case 1 -> Case 4 (margin shrinks), Case 2 -> Case 3;
    # the identical-gradient pair predicts Δw = Δl = 0, which counts as Case 1
    assert case.dtype == np.int8
    assert case.tolist() == [1, 2, 3, 4, 3, 0, 0, 1]
    assert [CASE_NAMES[c] for c in case[[0, 1, 2, 3, 5]]] == [
        "chosen↑ rejected↓", "both↓", "both↑", "margin↓", "undetermined"]


def test_classify_with_response_indices_on_3x3():
    a = np.array([[3.0, 0.0], [1.0, 0.0], [2.0, 1.0]])  # rows: y*, y_w, y_l
    gram = (a @ a.T)[None]
    # Δw = K_ww - K_wl = 1 - 2 < 0, Δl = K_lw - K_ll = 2 - 5 < 0: both fall (Case 2)
    assert classify(gram, [1.0], [1.0], w=1, l=2).tolist() == [2]
    # with the roles of y* and y_w swapped: Δw = 9 - 6 > 0, Δl = 6 - 5 > 0: Case 3
    assert classify(gram, [1.0], [1.0], w=0, l=2).tolist() == [3]
    # KTO-like unequal coefficients: d_w = 3, d_l = 1 -> Δw = 3 - 2 > 0, Δl = 6 - 5 > 0 (Case 3)
    assert classify(gram, [3.0], [1.0], w=1, l=2).tolist() == [3]


def test_classify_rejects_a_bad_gram_shape():
    with pytest.raises(MarginscopeError, match=r"\[N, R, R\]"):
        classify(np.eye(2), [1.0], [1.0])


def test_case_thresholds():
    gram = np.array([CASE2, [[0.0, 0.0], [0.0, 4.0]]])
    t = case_thresholds(gram, np.array([2.0, 1.0]), np.array([1.0, 0.0]))
    np.testing.assert_allclose(t.ratio_w, [2.0, np.nan])
    np.testing.assert_allclose(t.ratio_l, [0.4, 0.0])
    np.testing.assert_allclose(t.threshold_w, [2.0, np.nan])
    np.testing.assert_allclose(t.threshold_l, [0.5, 0.0])
    # the thresholds agree with classify for positive coefficients: chosen rises iff ratio_w <= d_w/d_l
    assert (t.ratio_w[0] <= t.threshold_w[0]) and classify(gram[:1], [2.0], [1.0]).tolist() == [1]


def test_gram_cosine():
    gram = np.array([[[4.0, -2.0, 0.0], [-2.0, 9.0, 0.0], [0.0, 0.0, 0.0]]])
    cos = gram_cosine(gram)
    np.testing.assert_allclose(cos[0, :2, :2], [[1.0, -2.0 / 6.0], [-2.0 / 6.0, 1.0]], rtol=1e-12)
    assert np.isnan(cos[0, 2]).all() and np.isnan(cos[0, :, 2]).all()


def test_log_prob_ntk_against_direct_computation():
    rng = np.random.default_rng(11)
    a = rng.normal(size=(2, 3, 5))
    gram = a @ a.transpose(0, 2, 1)
    gram[0, 0, 2] = gram[0, 2, 0] = 0.0
    logp = rng.uniform(-8, -1, size=(2, 3))
    log_abs, sign = log_prob_ntk(gram, logp)
    p = np.exp(logp)
    direct = p[:, :, None] * p[:, None, :] * gram
    np.testing.assert_allclose(sign * np.exp(log_abs), direct, rtol=1e-12, atol=0)
    assert sign[0, 0, 2] == 0 and log_abs[0, 0, 2] == -np.inf
    assert (sign[gram < 0] == -1).all()
    # and it stays finite where π_i π_j underflows
    log_abs, _ = log_prob_ntk(gram, logp - 400.0)
    assert np.isfinite(log_abs[1]).all()


# --- bilevel paper: Theorem 1/2, Corollary 1/2 ----------------------------------------------------


def _dpo_pairs(n, seed):
    """N random pairs with explicit gradients a_w, a_l, a_* and DPO coefficients at random log-probs."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 3, 8))  # rows: y_w, y_l, y*
    gram = a @ a.transpose(0, 2, 1)
    logp = rng.uniform(-20, -1, size=(n, 3))
    ref = logp + rng.normal(size=(n, 3))
    ones = np.ones(n)
    beta = 0.1
    d_w, d_l = coefficients(losses.get("dpo", beta=beta), logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], ones, ones)
    c = sig(-beta * ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])))
    return a, gram, logp, d_w, d_l, beta, c


def dot(x, y):
    return np.einsum("nd,nd->n", x, y)


def test_probability_dynamics_dpo_theorem1_and_corollary2():
    eta = 0.01
    a, gram, logp, d_w, d_l, beta, c = _dpo_pairs(16, 12)
    pd = probability_dynamics(gram, logp, d_w, d_l, eta=eta, top=2)
    aw, al, at = a[:, 0], a[:, 1], a[:, 2]
    pi = np.exp(logp)
    np.testing.assert_allclose(pd.corollary2, eta * beta * c * dot(aw - al, aw - al), rtol=1e-10)
    assert np.all(pd.corollary2 >= 0)
    # Theorem 1
    np.testing.assert_allclose(pd.delta_p[:, 0], eta * beta * c * pi[:, 0] * (dot(aw, aw) - dot(aw, al)), rtol=1e-10)
    np.testing.assert_allclose(pd.delta_p[:, 1], eta * beta * c * pi[:, 1] * (dot(aw, al) - dot(al, al)), rtol=1e-10)
    # Theorem 2: Δπ* ≈ ηβc π* (⟨a*,a_w⟩ − ⟨a*,a_l⟩)
    np.testing.assert_allclose(pd.delta_top, eta * beta * c * pi[:, 2] * (dot(at, aw) - dot(at, al)), rtol=1e-10)
    np.testing.assert_allclose(pd.delta_logp, predict_delta(gram, d_w, d_l, eta=eta), rtol=1e-12)
    # Corollary 1: ‖a_w‖ ≥ ‖a_l‖ guarantees Δπ_w ≥ 0 under DPO
    np.testing.assert_array_equal(pd.corollary1, dot(aw, aw) >= dot(al, al))
    assert pd.corollary1.any() and (~pd.corollary1).any()
    assert np.all(pd.delta_p[pd.corollary1, 0] >= 0)


def test_probability_dynamics_mass_to_top():
    # pair 0: K_ww < K_wl < K_ll, so both fall; y* = (0, -1) gains. Pair 1: Case 1, nothing flows.
    a = np.array([[[1.0, 0.0], [2.0, 1.0], [0.0, -1.0]],
                  [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    gram = a @ a.transpose(0, 2, 1)
    logp = np.log(np.array([[0.1, 0.05, 0.5], [0.1, 0.05, 0.5]]))
    pd = probability_dynamics(gram, logp, [1.0, 1.0], [1.0, 1.0], top=2)
    assert pd.mass_to_top.tolist() == [True, False]
    np.testing.assert_allclose(pd.delta_p[0], [0.1 * (1 - 2), 0.05 * (2 - 5), 0.5 * (0 - -1)], rtol=1e-12)
    assert pd.corollary1.tolist() == [False, True]
    assert probability_dynamics(gram, logp, [1.0, 1.0], [1.0, 1.0]).mass_to_top is None


def test_probability_dynamics_tiny_probabilities_do_not_underflow():
    gram = np.array([[[1e20, 0.0], [0.0, 1.0]]])
    pd = probability_dynamics(gram, np.array([[-750.0, -1.0]]), [1.0], [1.0])
    expected = math.exp(-750.0 + math.log(1e20))  # a normal float64, but exp(-750) alone is 0
    assert math.exp(-750.0) == 0.0 and expected > np.finfo(np.float64).tiny
    assert pd.delta_p[0, 0] == pytest.approx(expected, rel=1e-12, abs=0.0)
