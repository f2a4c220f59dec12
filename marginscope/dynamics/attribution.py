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


def _grouped(t: Tensor, rows: Tensor, batch: int) -> Tensor:
    """t's rows for every group, [G, R, ...]; a side of one row shared by the whole batch is expanded."""
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    return t[rows]


def group_gradients(u: Factor, rows: Tensor, shape: torch.Size) -> Tensor:
    """Σ_{r ∈ rows[g]} of a factor's per-row gradients for every group g, materialized: [G, *shape].

    u: an `Outer` (dense l: Σ_t l_t ⊗ m_t, one batched matrix product over the groups, restricted to
    `u.columns` when set; ids: the rows of m added at their ids), a `Dense` [B, numel] or a `SoftmaxHead`
    (its [T, V] cotangent rebuilt in vocabulary chunks, group by group). rows: int64 [G, R] row indices
    (groups of equal size). Returns float32 at least (float64 for float64 factors), on the factor's
    device."""
    g = rows.shape[0]
    if isinstance(u, Dense):
        return u.g[rows].sum(1).view(g, *shape)
    if isinstance(u, SoftmaxHead):
        out = torch.zeros((g, *shape), dtype=u.h.dtype, device=u.h.device)
        for k, group in enumerate(rows):
            _, h, y, gt, lz = u.tokens(group)
            for lo, hi in _vocab_chunks(len(h), u.weight.shape[0]):
                out[k, lo:hi] = u.block(h, y, gt, lz, lo, hi).T @ h
        return out
    batch = max(u.l.shape[0], u.m.shape[0])
    m = _wide(_grouped(u.m, rows, batch)).flatten(1, 2)  # [G, R·T, dim_m]
    if u.ids:
        vocab = shape[0]
        ids = _grouped(u.l, rows, batch).flatten(1, 2) + vocab * torch.arange(g, device=m.device)[:, None]
        out = torch.zeros((g * vocab, m.shape[-1]), dtype=m.dtype, device=m.device)
        return out.index_add_(0, ids.reshape(-1), m.reshape(-1, m.shape[-1])).view(g, *shape)
    grads = _wide(_grouped(u.l, rows, batch)).flatten(1, 2).mT @ m  # [G, dim_l, dim_m]
    if u.columns is None:
        return grads.view(g, *shape)
    out = torch.zeros((g, *shape), dtype=grads.dtype, device=grads.device)
    out[:, u.columns] = grads
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
        if len({len(g) for g in self.groups}) > 1:
            raise MarginscopeError("PairGradientCollector: every group needs the same number of rows")
        self._rows = torch.as_tensor(self.groups, dtype=torch.long)
        self.gradients: dict[str, Tensor] = {
            n: torch.zeros((len(self.groups), *p.shape), device=store or p.device,
                           dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            for n, p in zip(scope.names, scope.params)}

    def _add(self, p: nn.Parameter, u: Factor, call: Call) -> None:
        super()._add(p, u, call)
        buffer = self.gradients[self._names[id(p)]]
        buffer += group_gradients(u, self._rows.to(_device(u)), p.shape).to(device=buffer.device, dtype=buffer.dtype)


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
