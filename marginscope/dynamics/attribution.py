"""Who pushed it: each training pair's share of an optimizer step's effect on the probes (DESIGN.md §2b).

The gradient a trainer accumulates over a step is a sum over its pairs' rows, g_t = Σ_j g_j with
g_j = Σ_{r ∈ pair j} D_rᵀX_r as the backward saw them (the loss's ∂ℓ/∂log π, the trainer's
normalization, dropout and gradient accumulation included). The optimizer's "gradient" part is
c_t ⊙ g_t (`optimizers.StepSplit.coefficient`: for Adam/AdamW −lr_t(1−β₁)/((1−β₁ᵗ)(√v̂_t + ε)), for
SGD −lr·(1−τ) or its Nesterov form), so its first-order effect on probe response i splits exactly:

    probe_effect[j, i] = κ·⟨a_i(θ_t), c_t ⊙ g_j⟩,     Σ_j probe_effect[j, i] = ⟨a_i(θ_t), c_t ⊙ g_t⟩

with a_i = ∇θ log π(y_i | x_i) and κ the scalar between what the hooks saw and the `.grad` the
optimizer stepped with (1 in one process; 1/W for DDP's average over W processes; gradient
clipping's factor), fitted as κ = ‖c⊙g_t‖² / Σ_j ⟨c⊙g_t, c⊙g_j⟩ and recorded.

The preconditioner is elementwise, so the ghost factorization does not carry over: every pair's
gradient is materialized (`PairGradientCollector`, one parameter-sized buffer per pair — small for
LoRA scopes, P × the scope for full fine-tuning), and ⟨a_i, u_j⟩ for u_j = c_t ⊙ g_j is one
forward-mode directional derivative per pair (`update.directional_logp`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import MarginscopeError
from .exact import ParameterScope
from .ghost import GhostCollector
from .ghost.factors import Dense, Factor, Outer, SoftmaxHead, _vocab_chunks, _wide
from .ghost.kinds import Call


def _rows_of(t: Tensor, rows: Tensor) -> Tensor:
    """t's rows `rows`; a factor side of one row shared by every row of the batch stays that row."""
    return t if t.shape[0] == 1 else t[rows]


def group_gradient(u: Factor, rows: Tensor, shape: torch.Size) -> Tensor:
    """Σ_{r ∈ rows} of a factor's per-row gradients, materialized in the parameter's `shape`.

    u: an `Outer` (dense l: Σ_t l_t ⊗ m_t, restricted to `u.columns` when set; ids: the rows of m added
    at their ids), a `Dense` [B, numel] or a `SoftmaxHead` (its [T, V] cotangent rebuilt in vocabulary
    chunks). rows: int64 [R] row indices. Returns float32 at least (float64 for float64 factors), on
    the factor's device."""
    if isinstance(u, Dense):
        return u.g[rows].sum(0).view(shape)
    if isinstance(u, SoftmaxHead):
        _, h, y, g, lz = u.tokens(rows)
        out = torch.zeros(shape, dtype=h.dtype, device=h.device)
        for lo, hi in _vocab_chunks(len(h), u.weight.shape[0]):
            out[lo:hi] = u.block(h, y, g, lz, lo, hi).T @ h
        return out
    m = _wide(_rows_of(u.m, rows))
    if u.ids:
        ids = _rows_of(u.l, rows).expand(m.shape[0], -1).reshape(-1)
        out = torch.zeros(shape, dtype=m.dtype, device=m.device)
        return out.index_add_(0, ids, m.reshape(-1, m.shape[-1]))
    l = _wide(_rows_of(u.l, rows)).expand(m.shape[0], -1, -1)
    g = l.flatten(0, 1).T @ m.expand(l.shape[0], -1, -1).flatten(0, 1)
    if u.columns is None:
        return g.view(shape)
    out = torch.zeros(shape, dtype=g.dtype, device=g.device)
    out[u.columns] = g
    return out


class PairGradientCollector(GhostCollector):
    """A `GhostCollector` that also materializes each group's gradient as the backward delivers it:
    `gradients[name]` is [G, *param.shape], group g's share Σ_{r ∈ groups[g]} D_rᵀX_r of what the
    backward accumulates into that parameter's `.grad` (row scales *not* divided out; tied uses
    summed). store: the buffers' device (None: beside each parameter; "cpu" offloads them); dtype:
    float64 for float64 parameters, else float32. Parameters that receive no gradient stay zero."""

    def __init__(self, model: nn.Module, scope: ParameterScope, groups: Sequence[Sequence[int]], *,
                 store: str | torch.device | None = None, materialize: bool | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        super().__init__(model, scope, groups, materialize=materialize, on_error=on_error)
        self._names = {id(p): n for n, p in zip(scope.names, scope.params)}
        self._store = store
        self._rows = [torch.as_tensor(g, dtype=torch.long) for g in self.groups]
        self.gradients: dict[str, Tensor] = {
            n: torch.zeros((len(self.groups), *p.shape), device=store or p.device,
                           dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            for n, p in zip(scope.names, scope.params)}

    def _add(self, p: nn.Parameter, u: Factor, call: Call) -> None:
        super()._add(p, u, call)
        buffer = self.gradients[self._names[id(p)]]
        for g, rows in enumerate(self._rows):
            part = group_gradient(u, rows.to(_device(u)), p.shape)
            buffer[g] += part.to(device=buffer.device, dtype=buffer.dtype)


def _device(u: Factor) -> torch.device:
    return u.g.device if isinstance(u, Dense) else u.h.device if isinstance(u, SoftmaxHead) else u.m.device


def pair_tangents(gradients: Mapping[str, Tensor], coefficient: Mapping[str, Tensor], pairs: Sequence[int], *,
                  like: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """u_j = c ⊙ g_j for the pairs `pairs` (indices into gradients' leading axis), each a {name: tensor}
    in the dtype and on the device of `like` (the parameters); a parameter without a coefficient (the
    optimizer did not step it) gets u_j = 0. Raises MarginscopeError when `pairs` is empty."""
    out = []
    for j in pairs:
        u = {}
        for n, ref in like.items():
            c = coefficient.get(n)
            g = gradients[n][j].to(device=ref.device, dtype=torch.float64)
            u[n] = torch.zeros_like(ref) if c is None else (c.to(device=ref.device, dtype=torch.float64) * g).to(ref.dtype)
        out.append(u)
    if not out:
        raise MarginscopeError("pair_tangents: no pairs given")
    return out


def scale_terms(gradient_part: Mapping[str, Tensor], gradients: Mapping[str, Tensor],
                coefficient: Mapping[str, Tensor]) -> tuple[float, float, float]:
    """(‖c⊙g_t‖², ⟨c⊙g_t, Σ_j c⊙g_j⟩, ‖Σ_j c⊙g_j‖²) in float64 over the scope: κ is the first over the
    second summed over processes (see the module doc); with one process, the residual of the
    decomposition is ‖c⊙g_t − κ Σ_j c⊙g_j‖² = first − 2κ·second + κ²·third."""
    gp2 = dot = u2 = 0.0
    for n, gp in gradient_part.items():
        gp = gp.to(torch.float64)
        c = coefficient.get(n)
        u = (torch.zeros_like(gp) if c is None
             else c.to(device=gp.device, dtype=torch.float64) * gradients[n].to(device=gp.device, dtype=torch.float64).sum(0))
        gp2 += float((gp * gp).sum())
        dot += float((gp * u).sum())
        u2 += float((u * u).sum())
    return gp2, dot, u2
