"""Scalar summaries of one record or of a set of in-run pairs (for trainer logs and `inspect`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .coefficients import gram_cosine


def finite_mean(values: np.ndarray) -> float:
    """Mean of the finite entries (NaN when there is none)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else float("nan")


def case_fractions(case: np.ndarray) -> dict[int, float]:
    """Fraction of pairs in Case 1..4 (undetermined pairs, 0, count in the denominator)."""
    case = np.asarray(case)
    return {c: float(np.mean(case == c)) if case.size else float("nan") for c in (1, 2, 3, 4)}


def record_summary(names: list[str], logp: np.ndarray, gram: np.ndarray, case: np.ndarray) -> dict[str, float]:
    """cosine_mean (mean over pairs of cos(a_w, a_l)), case{1..4}_frac, logp_<response>_mean."""
    w, l = names.index("chosen"), names.index("rejected")
    out = {"cosine_mean": finite_mean(gram_cosine(gram)[:, w, l])}
    out.update({f"case{c}_frac": f for c, f in case_fractions(case).items()})
    out.update({f"logp_{name}_mean": finite_mean(logp[:, j]) for j, name in enumerate(names)})
    return out


def inrun_summary(cosine: np.ndarray, case: np.ndarray) -> dict[str, float]:
    """inrun_cosine_mean and inrun_case{1..4}_frac over in-run pairs."""
    out = {"inrun_cosine_mean": finite_mean(cosine)}
    out.update({f"inrun_case{c}_frac": f for c, f in case_fractions(case).items()})
    return out


@dataclass(frozen=True)
class FirstOrderFit:
    """Observed ≈ slope · predicted over n finite points, with Pearson r and the sign agreement."""

    slope: float  # least squares through the origin: Σ p·o / Σ p²
    r: float
    sign_agreement: float
    n: int


def first_order_fit(predicted: np.ndarray, observed: np.ndarray) -> FirstOrderFit:
    """Fit observed = slope · predicted (least squares through 0) over the points where both are
    finite (any shapes that broadcast); NaN statistics where undefined (no points, zero variance)."""
    p, o = np.broadcast_arrays(np.asarray(predicted, dtype=np.float64), np.asarray(observed, dtype=np.float64))
    ok = np.isfinite(p) & np.isfinite(o)
    p, o = p[ok], o[ok]
    if not p.size:
        return FirstOrderFit(float("nan"), float("nan"), float("nan"), 0)
    pp, pc, oc = np.dot(p, p), p - p.mean(), o - o.mean()
    var = np.dot(pc, pc) * np.dot(oc, oc)
    slope = float(np.dot(p, o) / pp) if pp > 0 else float("nan")
    r = float(np.dot(pc, oc) / np.sqrt(var)) if var > 0 else float("nan")
    return FirstOrderFit(slope, r, float(np.mean(np.sign(p) == np.sign(o))), int(p.size))


def case_agreement(case_a: np.ndarray, case_b: np.ndarray) -> float:
    """Fraction of pairs whose Cases agree, over the pairs determined (≠ 0) in both; NaN if none."""
    a, b = np.asarray(case_a), np.asarray(case_b)
    both = (a != 0) & (b != 0)
    return float(np.mean(a[both] == b[both])) if both.any() else float("nan")


def update_summary(names: list[str], observed: np.ndarray, actual: np.ndarray, case_self: np.ndarray | None,
                   case_observed: np.ndarray, case_actual: np.ndarray) -> dict[str, float]:
    """What happened over one interval between records (DESIGN.md §2b), for trainer logs and `inspect`:
    actual_r_<response> and actual_sign_<response> (Pearson r and sign agreement of the actual-update
    first order [N, R] against the observed change [N, R] over probes), case_observed{1..4}_frac,
    case_actual{1..4}_frac, and the agreement of the three Case views (case_self: the self-view Case
    at the interval's start, None when unknown)."""
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        fit = first_order_fit(actual[:, j], observed[:, j])
        out[f"actual_r_{name}"], out[f"actual_sign_{name}"] = fit.r, fit.sign_agreement
    for label, case in (("observed", case_observed), ("actual", case_actual)):
        out.update({f"case_{label}{c}_frac": f for c, f in case_fractions(case).items()})
    none = np.zeros_like(case_observed)
    self_view = none if case_self is None else case_self
    out["case_agree_self_observed"] = case_agreement(self_view, case_observed)
    out["case_agree_actual_observed"] = case_agreement(case_actual, case_observed)
    out["case_agree_self_actual"] = case_agreement(self_view, case_actual)
    return out
