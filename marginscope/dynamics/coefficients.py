"""Margin-form coefficients, Case classification and first-order predictions (DESIGN.md §2).

For a per-pair loss ℓ(logp_w, logp_l, ...), d_w = −∂ℓ/∂log π_w and d_l = +∂ℓ/∂log π_l. One gradient
step of size η on one pair moves θ by η(d_w a_w − d_l a_l), a_i = ∇_θ log π_i, so to first order
Δlog π_i ≈ η(d_w K[i,w] − d_l K[i,l]) with K the Gram (empirical NTK) of the a_i.

Inputs may be numpy arrays or torch tensors; every output is a numpy float64 array (int8 or bool
where stated). Grams are [N, R, R] (N pairs, R responses per pair), per-pair scalars are [N].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import MarginscopeError

ArrayLike = np.ndarray | Tensor | float

CASE_NAMES: dict[int, str] = {
    0: "undetermined", 1: "chosen↑ rejected↓", 2: "both↓", 3: "both↑", 4: "margin↓",
}
UNDETERMINED, CHOSEN_UP_REJECTED_DOWN, BOTH_DOWN, BOTH_UP, MARGIN_DOWN = 0, 1, 2, 3, 4


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _gram(gram: ArrayLike) -> np.ndarray:
    k = _np64(gram)
    if k.ndim != 3 or k.shape[1] != k.shape[2]:
        raise MarginscopeError(f"gram must have shape [N, R, R]; got {list(k.shape)}")
    return k


def _t64(x: ArrayLike) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).clone()
    return torch.tensor(np.asarray(x, dtype=np.float64))


def coefficients(loss: Callable[..., Tensor], logp_w: ArrayLike, logp_l: ArrayLike, ref_w: ArrayLike,
                 ref_l: ArrayLike, len_w: ArrayLike, len_l: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """d_w = −∂ℓ/∂logp_w and d_l = +∂ℓ/∂logp_l of any per-pair loss, by float64 autograd.

    The per-pair losses are summed over the batch and differentiated, so a pair's coefficients are
    its own only if pairs do not interact through the gradient: batch-dependent terms must be under
    stop-gradient (as α-DPO's z-scored margin is). Runs under a local `torch.enable_grad()`; the
    caller's grad mode and RNG are untouched. Returns two float64 arrays of shape [B].
    """
    lw, ll = _t64(logp_w).requires_grad_(True), _t64(logp_l).requires_grad_(True)
    consts = [_t64(x) for x in (ref_w, ref_l, len_w, len_l)]
    with torch.enable_grad():
        out = loss(lw, ll, *consts)
        if out.shape != lw.shape:
            raise MarginscopeError(f"loss must return per-pair losses of shape {list(lw.shape)}; "
                                   f"got {list(out.shape)} (return the losses before the mean)")
        gw, gl = torch.autograd.grad(out.sum(), (lw, ll), allow_unused=True)
    d_w = np.zeros(lw.shape) if gw is None else -gw.numpy()
    d_l = np.zeros(ll.shape) if gl is None else gl.numpy()
    return d_w, d_l


def predict_delta(gram: ArrayLike, d_w: ArrayLike, d_l: ArrayLike, eta: float = 1.0,
                  w: int = 0, l: int = 1) -> np.ndarray:
    """First-order Δlog π_i ≈ η(d_w K[i,w] − d_l K[i,l]) for every response i, float64 [N, R]."""
    k = _gram(gram)
    dw, dl = _np64(d_w).reshape(-1, 1), _np64(d_l).reshape(-1, 1)
    return eta * (dw * k[:, :, w] - dl * k[:, :, l])


def classify(gram: ArrayLike, d_w: ArrayLike, d_l: ArrayLike, w: int = 0, l: int = 1) -> np.ndarray:
    """Case of each pair from the signs of the predicted Δw = Δlog π_w and Δl = Δlog π_l, int8 [N].

    1: Δw ≥ 0 ≥ Δl; else 2: both ≤ 0; else 3: both ≥ 0; else 4: Δw ≤ 0 ≤ Δl (margin shrinks);
    0 where any input is NaN. Uses signs, never ratios, so negative coefficients (SPO past its
    target, SPPO, KTO, ...) flip the cases correctly (margin-pitfalls Table 1; CASE_NAMES).
    """
    return classify_delta(predict_delta(gram, d_w, d_l, 1.0, w, l), w, l)


def classify_delta(delta: ArrayLike, w: int = 0, l: int = 1) -> np.ndarray:
    """Case of each pair from the signs of any Δlog π [N, R] (predicted, observed or along the actual
    update; DESIGN.md §2b), by `classify`'s sign rules: int8 [N], 0 where Δw or Δl is NaN."""
    delta = _np64(delta)
    dw, dl = delta[:, w], delta[:, l]
    case = np.select([(dw >= 0) & (dl <= 0), (dw <= 0) & (dl <= 0), (dw >= 0) & (dl >= 0)],
                     [CHOSEN_UP_REJECTED_DOWN, BOTH_DOWN, BOTH_UP], MARGIN_DOWN).astype(np.int8)
    case[np.isnan(dw) | np.isnan(dl)] = UNDETERMINED
    return case


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with NaN (and no warning) where b is 0 or either is NaN."""
    a, b = np.broadcast_arrays(a, b)
    out = np.full(a.shape, np.nan)
    np.divide(a, b, out=out, where=(b != 0) & ~np.isnan(b))
    return out


@dataclass(frozen=True)
class CaseThresholds:
    """The paper's ratios and the thresholds they are compared with, float64 [N] each."""

    ratio_w: np.ndarray  # ⟨a_w,a_l⟩/‖a_w‖²: chosen rises iff ratio_w ≤ threshold_w (d_l > 0)
    ratio_l: np.ndarray  # ⟨a_w,a_l⟩/‖a_l‖²: rejected falls iff ratio_l ≤ threshold_l (d_w > 0)
    threshold_w: np.ndarray  # d_w/d_l
    threshold_l: np.ndarray  # d_l/d_w


def case_thresholds(gram: ArrayLike, d_w: ArrayLike, d_l: ArrayLike, w: int = 0, l: int = 1) -> CaseThresholds:
    """⟨a_w,a_l⟩/‖a_w‖², ⟨a_w,a_l⟩/‖a_l‖² and thresholds d_w/d_l, d_l/d_w (margin-pitfalls §3.2), for plots.

    NaN where a denominator is 0. The inequalities flip when a coefficient is negative, which is
    why `classify` uses the Δ signs instead.
    """
    k = _gram(gram)
    dw, dl = _np64(d_w), _np64(d_l)
    kwl = k[:, w, l]
    return CaseThresholds(_div(kwl, k[:, w, w]), _div(kwl, k[:, l, l]), _div(dw, dl), _div(dl, dw))


def gram_cosine(gram: ArrayLike) -> np.ndarray:
    """Cosine of the gradients, K[i,j]/sqrt(K[i,i]K[j,j]), float64 [N, R, R]; NaN where a norm is 0."""
    k = _gram(gram)
    norms = np.sqrt(np.clip(np.diagonal(k, axis1=1, axis2=2), 0.0, None))
    return _div(k, norms[:, :, None] * norms[:, None, :])


def log_prob_ntk(gram: ArrayLike, logp: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Probability NTK K^π[i,j] = π_i π_j K[i,j] in log space: (log|K^π|, sign), float64 [N, R, R] each.

    log|K^π[i,j]| = logp_i + logp_j + log|K[i,j]| (−inf where K is 0, sign 0 there); logp is [N, R].
    """
    k, lp = _gram(gram), _np64(logp)
    with np.errstate(divide="ignore"):
        log_abs = lp[:, :, None] + lp[:, None, :] + np.log(np.abs(k))
    return log_abs, np.sign(k)


@dataclass(frozen=True)
class ProbabilityDynamics:
    """First-order probability changes of one gradient step per pair (bilevel SPO paper, Thm 1/2)."""

    delta_logp: np.ndarray  # [N, R] Δlog π_i ≈ η(d_w K[i,w] − d_l K[i,l])
    delta_p: np.ndarray  # [N, R] Δπ_i ≈ π_i·Δlog π_i (Theorem 1)
    corollary1: np.ndarray  # bool [N]: ‖a_w‖ ≥ ‖a_l‖, which guarantees Δπ_w ≥ 0 for DPO (Corollary 1)
    corollary2: np.ndarray  # [N] Δπ_w/π_w − Δπ_l/π_l (Corollary 2)
    delta_top: np.ndarray | None = None  # [N] Δπ* of the top response (Theorem 2)
    mass_to_top: np.ndarray | None = None  # bool [N]: π_w and π_l fall while π* rises (Theorem 2, case 1)


def probability_dynamics(gram: ArrayLike, logp: ArrayLike, d_w: ArrayLike, d_l: ArrayLike, eta: float = 1.0,
                         w: int = 0, l: int = 1, top: int | None = None) -> ProbabilityDynamics:
    """The bilevel SPO paper's probability view (DESIGN.md §2, "Bilevel paper, restated").

    Theorem 1: Δπ_i ≈ π_i·η(d_w K[i,w] − d_l K[i,l]); for DPO (d_w = d_l = βc, c = σ(−u)) this is
    Δπ_w ≈ ηβc·π_w(‖a_w‖² − ⟨a_w,a_l⟩) and Δπ_l ≈ ηβc·π_l(⟨a_w,a_l⟩ − ‖a_l‖²); computed as
    sign·exp(logp + log|Δlog π|) in float64 so tiny π do not underflow before the product.
    Corollary 1: ‖a_w‖ ≥ ‖a_l‖ (K_ww ≥ K_ll) guarantees Δπ_w ≥ 0 for DPO.
    Corollary 2: Δπ_w/π_w − Δπ_l/π_l = η(d_w K_ww − d_l K_wl) − η(d_w K_lw − d_l K_ll), which for
    d_w = d_l = d is η·d·‖a_w − a_l‖² = η·d·(K_ww − 2K_wl + K_ll) ≥ 0.
    Theorem 2 (with `top`, the index of y* in the response set): Δπ* ≈ π*·η(d_w K[*,w] − d_l K[*,l]),
    and `mass_to_top` marks pairs where π_w and π_l are both predicted to fall and π* to rise.
    """
    k, lp = _gram(gram), _np64(logp)
    delta = predict_delta(k, d_w, d_l, eta, w, l)
    with np.errstate(divide="ignore"):
        delta_p = np.sign(delta) * np.exp(lp + np.log(np.abs(delta)))
    corollary1 = k[:, w, w] >= k[:, l, l]
    corollary2 = delta[:, w] - delta[:, l]
    if top is None:
        return ProbabilityDynamics(delta, delta_p, corollary1, corollary2)
    delta_top = delta_p[:, top]
    mass_to_top = (delta_p[:, w] < 0) & (delta_p[:, l] < 0) & (delta_top > 0)
    return ProbabilityDynamics(delta, delta_p, corollary1, corollary2, delta_top, mass_to_top)
