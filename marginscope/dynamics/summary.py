"""Scalar summaries of one record or of a set of in-run pairs (for trainer logs and `inspect`)."""

from __future__ import annotations

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
