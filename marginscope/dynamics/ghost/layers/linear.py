"""nn.Linear (weight [d_out, d_in]: l = D, m = X) and GPT-2's Conv1D (weight [d_in, d_out]: l = X,
m = D); biases ∇b_r = Σ_t D_r,t, materialized."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..factors import Dense, Factor, Outer
from ..kinds import Call, Kind, _first_input, _forward_is, _nonzero_positions, _per_row


def _affine_factors(call: Call, grad: Tensor, weight: Callable[[Tensor, Tensor], Outer]
                    ) -> dict[str, Factor]:
    """Linear / Conv1D: the weight's outer factor from (X, D) in its layout; ∇b_r = Σ_t D_r,t."""
    b = grad.shape[0]
    x, d = _nonzero_positions(_per_row(_first_input(call), b), _per_row(grad, b))
    factors = {"weight": lambda: weight(x, d), "bias": lambda: Dense(d.sum(1, dtype=torch.float64))}
    return {a: factors[a]() for a, _ in call.params}


LINEAR = Kind("linear", _forward_is(nn.Linear), lambda m: ("weight", "bias"),
              partial(_affine_factors, weight=lambda x, d: Outer(d, x)))
CONV1D = Kind("conv1d", _forward_is(Conv1D), lambda m: ("weight", "bias"),
              partial(_affine_factors, weight=lambda x, d: Outer(x, d)))
