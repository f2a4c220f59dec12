"""What actually moved a response: first-order changes along given parameter vectors (DESIGN.md §2b).

For a parameter vector v over a scope, ⟨∇_θ log π(y_t | x, y_<t), v⟩ is the directional derivative of
the token's log-prob along v: one forward-mode pass (`torch.func.jvp`) gives it for every scored
token of every row at once, with no parameter-sized tensor per response. Several vectors share the
primal through `torch.func.vmap`. The parameters may be the model's own or any other values of the
scope (e.g. a saved copy θ_p), substituted with `torch.func.functional_call` without touching the
model. Over an interval θ_p → θ_q with Δθ = θ_q − θ_p, the trapezoid rule

    Δlog π_i ≈ ½⟨a_i(θ_p) + a_i(θ_q), Δθ⟩

is second-order accurate; observed − first-order is the curvature share.

Attention runs on the math SDPA kernel inside these passes: the fused CPU/CUDA kernels have no
forward-mode derivative. Numbers are computed in the model's dtype and returned as float64.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .scoring import EncodedProbe, score_rows

ParamDict = Mapping[str, Tensor]


class _Substituted:
    """A model whose scope parameters take the given values (tied uses follow): what `score_rows` calls
    (`wrapped_model` tells it which forward's options, e.g. `logits_to_keep`, the call accepts)."""

    def __init__(self, model: nn.Module, values: ParamDict) -> None:
        self.wrapped_model, self.values = model, values

    def parameters(self):
        return self.wrapped_model.parameters()

    def __call__(self, **kwargs):
        return functional_call(self.wrapped_model, dict(self.values), (), kwargs, tie_weights=True, strict=False)


@contextlib.contextmanager
def _input_require_grads_off(model: nn.Module) -> Iterator[None]:
    """HF's `enable_input_require_grads` forward hook (set with gradient checkpointing and PEFT, at
    times more than once) calls `requires_grad_` inside the forward, which torch.func refuses: every
    such hook is left out for the pass and each module's hooks are put back exactly as they were."""
    saved = []
    for module in model.modules():
        hooks = module._forward_hooks
        if any(getattr(h, "__name__", "") == "make_inputs_require_grads" for h in hooks.values()):
            saved.append((module, hooks))
            module._forward_hooks = type(hooks)(
                (k, h) for k, h in hooks.items() if getattr(h, "__name__", "") != "make_inputs_require_grads")
    try:
        yield
    finally:
        for module, hooks in saved:
            module._forward_hooks = hooks


def _token_tangents(model: nn.Module, rows, at: ParamDict, tangents: Sequence[ParamDict], *,
                    padding_side: str, pad_id: int) -> tuple[Tensor, Tensor]:
    """(token_logp [B, T], tangents [K, B, T]) of one batch of rows at parameters `at`."""
    names = list(at)

    def token_logp(values: ParamDict) -> Tensor:
        return score_rows(_Substituted(model, values), rows, padding_side=padding_side, pad_id=pad_id).token_logp

    def along(tangent: ParamDict) -> tuple[Tensor, Tensor]:
        return jvp(token_logp, (dict(at),), (dict(tangent),))

    if len(tangents) > 1:
        try:
            return vmap(along, out_dims=(None, 0))({n: torch.stack([t[n] for t in tangents]) for n in names})
        except RuntimeError:  # an op without a batching rule: one pass per vector below
            pass
    results = [along(t) for t in tangents]
    return results[0][0], torch.stack([tangent for _, tangent in results])


def directional_logp(model: nn.Module, encoded: Sequence[EncodedProbe], tangents: Sequence[ParamDict], *,
                     at: ParamDict | None = None, batch_size: int = 8, padding_side: str = "right",
                     pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-token log-probs and their directional derivatives along each of K parameter vectors.

    tangents: K dicts {parameter name: tensor shaped like it} over the same names (a parameter scope;
    parameters not named are held fixed); at: the values of those parameters to evaluate at (default:
    the model's own). Returns float64 (token_logp [N, R, T], derivative [K, N, R, T]) in nats per unit
    of v, NaN beyond each response (T = the longest response); the sequence value is the sum over
    positions. Eval mode, no `.grad` written, the model's parameters untouched.
    Raises ValueError when the tangents name different parameters.
    """
    if not tangents:
        raise ValueError("directional_logp needs at least one tangent")
    names = list(tangents[0])
    if any(list(t) != names for t in tangents):
        raise ValueError("every tangent must name the same parameters, in the same order")
    own = dict(model.named_parameters())
    values = {n: (own[n] if at is None else at[n]).detach() for n in names}
    k, n_probes = len(tangents), len(encoded)
    r = len(encoded[0].response_ids) if encoded else 0
    t_max = max((len(ids) for e in encoded for ids in e.response_ids), default=0)
    logp = np.full((n_probes, r, t_max), np.nan)
    deriv = np.full((k, n_probes, r, t_max), np.nan)
    cast = [{n: t[n].detach().to(values[n].dtype) for n in names} for t in tangents]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), _input_require_grads_off(model):
            for start in range(0, n_probes, batch_size):
                chunk = encoded[start:start + batch_size]
                rows = [row for probe in chunk for row in probe.rows()]
                primal, out = _token_tangents(model, rows, values, cast, padding_side=padding_side, pad_id=pad_id)
                primal = primal.to(torch.float64).cpu().numpy()
                out = out.to(torch.float64).cpu().numpy()
                for b, (_, response) in enumerate(rows):
                    i, j, t = start + b // r, b % r, len(response)
                    logp[i, j, :t] = primal[b, :t]
                    deriv[:, i, j, :t] = out[:, b, :t]
    finally:
        model.train(was_training)
    return logp, deriv


def trapezoid(at_start: np.ndarray, at_end: np.ndarray) -> np.ndarray:
    """½(⟨a(θ_p), Δθ⟩ + ⟨a(θ_q), Δθ⟩): the first-order change over an interval (any shape, float64)."""
    return 0.5 * (np.asarray(at_start, dtype=np.float64) + np.asarray(at_end, dtype=np.float64))
