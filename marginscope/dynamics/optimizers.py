"""One optimizer step split into named parts by the optimizer's own update formula (DESIGN.md §2b).

For a parameter θ with gradient g_t at step t, torch's `Adam`/`AdamW` update (torch.optim.adam,
single-tensor and foreach variants alike) is exactly

    m_t = β₁m_{t−1} + (1−β₁)g̃_t,   v_t = β₂v_{t−1} + (1−β₂)g̃_t²,   v̂_t = v_t (or max(v̂_{t−1}, v_t), amsgrad)
    D_t = √v_t / √(1−β₂ᵗ) + ε,     s_t = lr_t / (1−β₁ᵗ)
    Δθ_t = −s_t·m_t / D_t − lr_t·λ·θ_{t−1}          (AdamW: decoupled decay; Adam: λ = 0 here)

with g̃_t = ±g_t (+λθ_{t−1} for Adam's L2 decay), the sign − under `maximize`. Its parts:
"gradient" −s_t(1−β₁)g̃_t/D_t (this batch, through the preconditioner P_t = 1/D_t), "momentum"
−s_t·β₁m_{t−1}/D_t (what earlier batches carry) and "weight_decay" (−lr_t·λ·θ_{t−1} for AdamW,
−s_t(1−β₁)λθ_{t−1}/D_t for Adam's L2 term). torch's `SGD` (torch.optim.sgd):
b_t = μb_{t−1} + (1−τ)g̃_t (b_1 = g̃_1), Δθ_t = −lr·b_t, or −lr(g̃_t + μb_t) with Nesterov.

Every function here is pure: tensors of the state *before* the step in, float64 parts out, which sum
to Δθ_t up to the optimizer's own floating-point rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

STEP_PARTS = ("gradient", "momentum", "weight_decay")


@dataclass
class StepSplit:
    """One parameter's step in parts (float64, shaped like the parameter).

    parts: {"gradient", "momentum", "weight_decay"} summing to Δθ_t; coefficient: c_t with
    parts["gradient"] = c_t ⊙ g_t for the raw gradient g_t (the preconditioner with the step's
    scalars and sign), so each training pair's share of the gradient part is c_t ⊙ g_j when g_j is
    its contribution to g_t (DESIGN.md §2b, "Who pushed it").
    """

    parts: dict[str, Tensor]
    coefficient: Tensor


def _f64(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().to(torch.float64)


def _scalar(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def adam_step_split(param: Tensor, grad: Tensor, state: dict[str, Any], hp: dict[str, Any]) -> StepSplit:
    """One `torch.optim.Adam`/`AdamW` step of one parameter, split.

    param, grad: θ_{t−1} and g_t (before the step); state: the optimizer's state for the parameter
    before the step (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`, `step`; empty before the first step);
    hp: its param group (lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay).
    """
    theta, g = _f64(param), _f64(grad)
    sign = -1.0 if hp.get("maximize", False) else 1.0
    beta1, beta2 = (_scalar(b) for b in hp["betas"])
    lr, eps, wd = _scalar(hp["lr"]), _scalar(hp["eps"]), _scalar(hp["weight_decay"])
    decoupled = bool(hp.get("decoupled_weight_decay", False))
    t = _scalar(state["step"]) + 1 if "step" in state else 1.0
    m_prev, v_prev = _f64(state.get("exp_avg")), _f64(state.get("exp_avg_sq"))
    m_prev = torch.zeros_like(theta) if m_prev is None else m_prev
    v_prev = torch.zeros_like(theta) if v_prev is None else v_prev
    g_moment = sign * g if decoupled or wd == 0 else sign * g + wd * theta  # what enters the moments
    v = beta2 * v_prev + (1 - beta2) * g_moment * g_moment
    v_max = _f64(state.get("max_exp_avg_sq")) if hp.get("amsgrad", False) else None
    if v_max is not None:
        v = torch.maximum(v_max, v)
    denom = v.sqrt() / (1 - beta2 ** t) ** 0.5 + eps
    step_size = lr / (1 - beta1 ** t)
    coefficient = -sign * step_size * (1 - beta1) / denom
    if wd == 0:
        decay = torch.zeros_like(theta)
    elif decoupled:
        decay = -lr * wd * theta
    else:
        decay = -step_size * (1 - beta1) * wd * theta / denom
    return StepSplit({"gradient": coefficient * g, "momentum": -step_size * beta1 * m_prev / denom,
                      "weight_decay": decay}, coefficient)


def sgd_step_split(param: Tensor, grad: Tensor, state: dict[str, Any], hp: dict[str, Any]) -> StepSplit:
    """One `torch.optim.SGD` step of one parameter, split.

    state: before the step (`momentum_buffer`, absent or None before the first step with momentum);
    hp: the param group (lr, momentum, dampening, weight_decay, nesterov, maximize).
    """
    theta, g = _f64(param), _f64(grad)
    sign = -1.0 if hp.get("maximize", False) else 1.0
    lr, mu = _scalar(hp["lr"]), _scalar(hp["momentum"])
    damp, wd = _scalar(hp["dampening"]), _scalar(hp["weight_decay"])
    nesterov = bool(hp.get("nesterov", False))
    buf = _f64(state.get("momentum_buffer"))
    if mu == 0:
        coef, carried = 1.0, torch.zeros_like(theta)
    elif buf is None:  # b_1 = g̃_1: no dampening on the first step
        coef, carried = (1 + mu) if nesterov else 1.0, torch.zeros_like(theta)
    elif nesterov:  # g̃ + μ(μb + (1−τ)g̃)
        coef, carried = 1 + mu * (1 - damp), mu * mu * buf
    else:  # μb + (1−τ)g̃
        coef, carried = 1 - damp, mu * buf
    coefficient = torch.full_like(theta, -lr * coef * sign)
    return StepSplit({"gradient": coefficient * g, "momentum": -lr * carried,
                      "weight_decay": -lr * coef * wd * theta}, coefficient)


SPLITTERS = {"Adam": adam_step_split, "AdamW": adam_step_split, "SGD": sgd_step_split}
