"""The math: pure functions over tensors and arrays; nothing here knows files or TRL."""

from .coefficients import (
    CASE_NAMES,
    case_thresholds,
    classify,
    coefficients,
    gram_cosine,
    log_prob_ntk,
    predict_delta,
    probability_dynamics,
)
from .exact import ParameterScope, select_parameters
from .inrun import InRunGeometry, InRunPairs, score_pairs, trl_pairs
from .measure import Geometry, PairDynamics, measure, pair_dynamics
from .scoring import EncodedProbe, encode, score_rows, top_tokens

__all__ = [
    "CASE_NAMES", "EncodedProbe", "Geometry", "InRunGeometry", "InRunPairs", "PairDynamics",
    "ParameterScope", "case_thresholds", "classify", "coefficients", "encode", "gram_cosine",
    "log_prob_ntk", "measure", "pair_dynamics", "predict_delta", "probability_dynamics", "score_pairs",
    "score_rows", "select_parameters", "top_tokens", "trl_pairs",
]
