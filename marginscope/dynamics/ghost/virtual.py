"""Virtual rows that share one row's inputs: the contractions of the exact per-token tier.

In the tier, K tokens of one response are K virtual rows of that response's one-row graph: each has
its own output cotangents D_k (token k's one-hot cotangent backpropagated) and the row's inputs X,
ids or norm inputs, shared. The handlers then return outer factors with a per-row side [K, T, d]
and a shared side [1, T, d] (ids [1, T]) (`layers/`), or materialized `Dense` [K, numel].

Only two things are needed of each pair of responses w, l: the [K_w, K_l] block ⟨G_a, G_b⟩ between
the chosen and the rejected virtual rows, and the squared norms ‖G_a‖² (`BlockSums`). With the shared
sides' token Gram C = s_w s_lᵀ [T, S] computed once, a block is

    ⟨G_a, G_b⟩ = Σ_{t,s} C[t,s] (p_a,t · p_b,s) = Σ_t p_a,t · (C p_b)_t,

K_l·T·S·d + K_w·K_l·T·d multiply-adds instead of the K_w·K_l·T·S·d of the pairwise token Grams; or,
when cheaper in multiply-adds (short widths, long rows), the materialized per-row gradients Σ_t p_t ⊗ s_t
are dotted. Factors without such a shared side (a tied weight's head use against its embedding use)
are contracted pairwise over their token Grams. Everything is summed in float64.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from ...errors import MarginscopeError
from .factors import Dense, Factor, Outer, _f64, _wide
from .kinds import Call

FEATURE_CHUNK_ELEMENTS = 1 << 22  # float64 temporaries of a block are built over feature slices this size


def _side_gram(x: Tensor, y: Tensor, paired: bool) -> Tensor:
    """Float64 token Gram of two factor sides, each dense [B, T, d] or ids [1, T] (one-hot rows, shared),
    B ∈ {1, K}: paired (the same virtual rows) [B, T, S] x_a,t · y_a,s, else [B_x, T, B_y, S] x_a,t · y_b,s.
    A one-hot side picks columns of the other: x_t · y_s = y_s[id_t]; two ids sides: [id_t = id_s]."""
    x_ids, y_ids = not x.is_floating_point(), not y.is_floating_point()
    if (x_ids and x.shape[0] != 1) or (y_ids and y.shape[0] != 1):
        raise MarginscopeError("token ids of a virtual-row factor must be one row's, shared")
    if x_ids and y_ids:
        g = _f64(x[0][:, None] == y[0][None, :])
        return g[None] if paired else g[None, :, None, :]
    if y_ids:
        return _side_gram(y, x, paired).transpose(1, 2) if paired else _side_gram(y, x, paired).permute(2, 3, 0, 1)
    if x_ids:
        picked = _f64(y[..., x[0]])  # [B_y, S, T]
        return picked.transpose(1, 2) if paired else picked.permute(2, 0, 1)[None]
    x, y = _wide(x), _wide(y)
    if paired:
        return _f64(x @ y.mT)
    return _f64(x.flatten(0, 1) @ y.flatten(0, 1).T).view(x.shape[0], x.shape[1], y.shape[0], y.shape[1])


def _per_row_materialized(per_row: Tensor, shared: Tensor) -> Tensor:
    """[K, d_p·d_s] float64 Σ_t p_k,t ⊗ s_t (the layout is a consistent permutation of the parameter's)."""
    return torch.einsum("ktp,ts->kps", _f64(per_row), _f64(_wide(shared)[0])).flatten(1)


def _feature_slices(k: int, t: int, d: int) -> list[slice]:
    step = max(1, min(d, FEATURE_CHUNK_ELEMENTS // max(1, k * t)))
    return [slice(lo, min(lo + step, d)) for lo in range(0, d, step)]


def _shared_contraction(su: Tensor, pu: Tensor, sv: Tensor, pv: Tensor, paired: bool,
                        materialize: bool | None) -> Tensor:
    """Block [K_u, K_v] (or paired diagonal [K]) of Σ_{t,s} (s_u,t · s_v,s)(p_a,t · p_b,s) for shared sides
    s [1, T, …] and per-row sides p [K, T, d_p] (module doc), ghost or materialized."""
    (ku, t, dp), (kv, s) = pu.shape, pv.shape[:2]
    ids = not su.is_floating_point() or not sv.is_floating_point()
    ds = su.shape[-1] if su.is_floating_point() else 0
    if materialize is None:
        ghost = kv * t * s * dp + (0 if paired else ku * kv * t * dp)
        dense = (ku * t + kv * s) * dp * ds + (ku if paired else ku * kv) * dp * ds
        materialize = not ids and dense < ghost
    if materialize and not ids:
        a, b = _per_row_materialized(pu, su), _per_row_materialized(pv, sv)
        return (a * b).sum(-1) if paired else a @ b.T
    c = _side_gram(su, sv, paired=False)[0, :, 0, :]  # [T, S]
    out = torch.zeros(ku if paired else (ku, kv), dtype=torch.float64, device=pu.device)
    for f in _feature_slices(max(ku, kv), max(t, s), dp):
        e = torch.einsum("ts,bsd->btd", c, _f64(pv[..., f]))  # [K_v, T, d_f]
        a = _f64(pu[..., f])
        out += (a * e).sum((1, 2)) if paired else a.flatten(1) @ e.flatten(1).T
    return out


def _outer_pair(u: Outer, v: Outer, paired: bool, materialize: bool | None) -> Tensor:
    """Two outer factors: through the shared sides' token Gram when both share the same side (an
    input: X, or ids), else pairwise over both sides' token Grams."""
    if u.columns is not None or v.columns is not None:
        raise MarginscopeError("column-compacted factors are not virtual-row factors")
    for shared, per_row in (("m", "l"), ("l", "m")):
        su, sv, pu, pv = getattr(u, shared), getattr(v, shared), getattr(u, per_row), getattr(v, per_row)
        if su.shape[0] == 1 and sv.shape[0] == 1 and pu.is_floating_point() and pv.is_floating_point():
            return _shared_contraction(su, pu, sv, pv, paired, materialize)
    l, m = _side_gram(u.l, v.l, paired), _side_gram(u.m, v.m, paired)
    if paired:
        return (l * m).sum((1, 2))
    rows = max(l.shape[0], m.shape[0])  # [K_u, T, K_v, S] built one row of u at a time
    return torch.stack([(l[min(a, l.shape[0] - 1)] * m[min(a, m.shape[0] - 1)]).sum((0, 2)) for a in range(rows)])


def _dense_outer_pair(d: Dense, o: Outer, paired: bool) -> Tensor:
    """⟨G_a, Σ_s l_b,s ⊗ m_b,s⟩ of a materialized factor against an outer one: a one-hot l picks rows of
    G_a's [dim_l, dim_m] table, a dense one is materialized."""
    g, m = _f64(d.g), _f64(o.m)
    if o.ids:
        if o.l.shape[0] != 1:
            raise MarginscopeError("token ids of a virtual-row factor must be one row's, shared")
        picked = g.view(g.shape[0], -1, m.shape[-1])[:, o.l[0]]  # [K_d, S, dim_m]
        return (picked * m).sum((1, 2)) if paired else torch.einsum("asd,bsd->ab", picked, m)
    l = _f64(o.l)
    k = max(l.shape[0], m.shape[0])
    full = torch.einsum("ktl,ktm->klm", l.expand(k, -1, -1), m.expand(k, -1, -1)).flatten(1)
    return (g * full).sum(-1) if paired else g @ full.T


def virtual_pair(u: Factor, v: Factor, *, paired: bool, materialize: bool | None = None) -> Tensor:
    """Float64 ⟨G^u_a, G^v_b⟩ of two virtual-row factors (module doc): the block [K_u, K_v], or, paired
    (u and v over the same K virtual rows), its diagonal [K]. materialize: None (whichever takes fewer
    multiply-adds), True or False forces it for factors with a shared side."""
    if isinstance(u, Dense) and isinstance(v, Dense):
        return (_f64(u.g) * _f64(v.g)).sum(-1) if paired else _f64(u.g) @ _f64(v.g).T
    if isinstance(u, Dense) and isinstance(v, Outer):
        return _dense_outer_pair(u, v, paired)
    if isinstance(v, Dense) and isinstance(u, Outer):
        out = _dense_outer_pair(v, u, paired)
        return out if paired else out.T
    if isinstance(u, Outer) and isinstance(v, Outer):
        return _outer_pair(u, v, paired, materialize)
    raise MarginscopeError(f"virtual rows: no contraction of {type(u).__name__} with {type(v).__name__}")


class BlockSums:
    """Float64 sums over two sets of virtual rows, w (K_w rows) and l (K_l rows), each set sharing one
    row's inputs, fed one factor per parameter use and side:

        block [K_w, K_l] += Σ ⟨G^u_a, G^v_b⟩   over the uses u (side w) and v (side l) of each parameter,
        norms_w [K_w]    += ‖Σ_u G^u_a‖²        (and norms_l), when `norms` asks for them,

    so a parameter used by several calls (tied weights, ∇θ = Σ_u ∇θ^u) gets every cross term. Each use is
    announced by `expect(side, call)` before the first factor of its parameter is added; a factor is kept
    only while uses of its parameter are pending."""

    def __init__(self, k_w: int, k_l: int, device: torch.device, *, norms: tuple[bool, bool] = (True, True),
                 materialize: bool | None = None) -> None:
        self.block = torch.zeros(k_w, k_l, dtype=torch.float64, device=device)
        self.norms = (torch.zeros(k_w, dtype=torch.float64, device=device) if norms[0] else None,
                      torch.zeros(k_l, dtype=torch.float64, device=device) if norms[1] else None)
        self.materialize = materialize
        self._pending: dict[int, list[tuple[int, Call]]] = defaultdict(list)
        self._stored: dict[int, tuple[list[Factor], list[Factor]]] = defaultdict(lambda: ([], []))

    def expect(self, side: int, call: Call) -> None:
        for _, p in call.params:
            self._pending[id(p)].append((side, call))

    def add(self, side: int, p: nn.Parameter, u: Factor, call: Call) -> None:
        """Add the terms of use `call` on `side` (0: w, 1: l) of parameter p, whose factor is u."""
        pending, stored = self._pending[id(p)], self._stored[id(p)]
        pending.remove((side, call))
        norms = self.norms[side]
        if norms is not None:
            norms += virtual_pair(u, u, paired=True, materialize=self.materialize)
            for v in stored[side]:
                norms += 2 * virtual_pair(u, v, paired=True, materialize=self.materialize)
        for v in stored[1 - side]:
            k = virtual_pair(u, v, paired=False, materialize=self.materialize)
            self.block += k if side == 0 else k.T
        if pending:
            stored[side].append(u)
        else:
            del self._stored[id(p)]
