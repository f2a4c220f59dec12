"""The math: pure functions over tensors and arrays; nothing here knows files or TRL."""

from .coefficients import (
    CASE_NAMES,
    case_thresholds,
    classify,
    classify_delta,
    coefficients,
    gram_cosine,
    log_prob_ntk,
    predict_delta,
    probability_dynamics,
)
from .exact import ParameterScope, select_parameters
from .inrun import InRunGeometry, InRunPairs, score_pairs, trl_pairs
from .measure import Geometry, PairDynamics, measure, pair_dynamics
from .optimizers import STEP_PARTS, StepSplit, adam_step_split, sgd_step_split
from .scoring import EncodedProbe, encode, score_rows, top_tokens
from .update import directional_logp, trapezoid

__all__ = [
    "CASE_NAMES", "STEP_PARTS", "EncodedProbe", "StepSplit", "adam_step_split", "directional_logp",
    "sgd_step_split", "trapezoid", "Geometry", "InRunGeometry", "InRunPairs", "PairDynamics",
    "ParameterScope", "case_thresholds", "classify", "classify_delta", "coefficients", "encode", "gram_cosine",
    "log_prob_ntk", "measure", "pair_dynamics", "predict_delta", "probability_dynamics", "score_pairs",
    "score_rows", "select_parameters", "top_tokens", "trl_pairs",
]
