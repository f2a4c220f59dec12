"""Contractions: [G, R, R] float64 Grams between two factors over the rows of G groups.

`rows` is [G, R]: G groups of R rows each, contracted at once (batched matrix products). For two
outer factors ⟨G_a, G'_b⟩ = Σ_{t,s} (l_a,t · l'_b,s)(m_a,t · m'_b,s), one [G, T, S] block per row pair
(a, b) of the groups — only a ≤ b for a factor with itself, whose Gram is symmetric — on views of the
factors' rows where the groups' a-th rows are evenly spaced (a chunk's probes, TRL's pairs); a layer
materializes D_rᵀX_r instead when that takes fewer multiply-adds, R·T·S·(dim_l + dim_m) >
(T + S)·dim_l·dim_m for R rows per group (`_materializes`; benchmarks/bench_materialize_switch.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import MarginscopeError
from .factors import Dense, Factor, Outer, SoftmaxHead, _f64, _vocab_chunks, _wide


def _row_blocks(t: Tensor, rows: Tensor) -> Tensor:
    """t[rows] ([G, R, ...]): a view, no copy, when the groups are consecutive rows (a chunk's probes)."""
    first, n = int(rows[0, 0]), rows.numel()
    if torch.equal(rows.flatten(), torch.arange(first, first + n, device=rows.device)):
        return t[first:first + n].unflatten(0, tuple(rows.shape))
    return t[rows]


def _row_column(t: Tensor, rows: Tensor) -> Tensor:
    """t[rows] ([G, ...]) for one row of each group (rows [G]): a view, no copy, when the rows are evenly
    spaced (every R-th row of a chunk's probes; TRL's chosen or rejected half)."""
    first, n = int(rows[0]), rows.numel()
    step = int(rows[1]) - first if n > 1 else 1
    if step > 0 and torch.equal(rows, torch.arange(first, first + step * n, step, device=rows.device)):
        return t[first:first + step * (n - 1) + 1:step]
    return t[rows]


def _flat_m(o: Outer, rows: Tensor) -> Tensor:
    """m of each group's rows over (row, token): [G, R·T, dim_m]."""
    return _wide(_row_blocks(o.m, rows).flatten(1, 2))


def _column_index(o: Outer, ids: Tensor) -> Tensor:
    """Where token ids fall among the columns of a dense l (all of them, or `o.columns`)."""
    return ids if o.columns is None else torch.searchsorted(o.columns, ids.contiguous())


def _pick_columns(l: Tensor, idx: Tensor) -> Tensor:
    """l [G, N, dim_l] at columns idx [G, M]: [G, N, M]."""
    return torch.gather(l, 2, idx[:, None, :].expand(-1, l.shape[1], -1))


def _l_block(u: Outer, v: Outer, lu: Tensor, lv: Tensor) -> Tensor:
    """[G, T, S] float64 l_u,t · l_v,s of one row of each group (lu [G, T, dim_l] or ids [G, T], lv
    likewise); a one-hot side picks columns of the other: l[:, id]."""
    if u.ids and v.ids:
        return _f64(lu[:, :, None] == lv[:, None, :])
    if v.ids:
        return _f64(_pick_columns(lu, _column_index(u, lv)))
    if u.ids:
        return _f64(_pick_columns(lv, _column_index(v, lu)).mT)
    return _f64(lu @ lv.mT)


def _materialized(o: Outer, rows: Tensor) -> Tensor:
    """[G, R, dim_l·dim_m] per-row gradients Σ_t l_t ⊗ m_t of a dense-l factor."""
    return torch.einsum("grtl,grtm->grlm", _f64(_row_blocks(o.l, rows)), _f64(_row_blocks(o.m, rows))).flatten(2)


def _materializes(u: Outer, v: Outer, forced: bool | None, rows_per_group: int) -> bool:
    """Materialize two dense-l factors (or as forced; never one-hot ones) when the ghost Grams take more
    multiply-adds, (R·T)(R·S)·(dim_l + dim_m), than materializing, R·(T + S)·dim_l·dim_m: for R rows
    per group of T and S tokens, R·T·S·(dim_l + dim_m) > (T + S)·dim_l·dim_m. Measured at 512–2,048
    tokens (benchmarks/bench_materialize_switch.py), this picks the faster form on every layer shape
    tried; the earlier 2·T·S > dim_l·dim_m was ~2× too late (1.4–1.7× slower at T = 512–1,024)."""
    if u.ids or v.ids:
        return False
    if forced is not None:
        return forced
    t, s, dim_l, dim_m = u.m.shape[1], v.m.shape[1], u.l.shape[-1], u.m.shape[-1]
    return rows_per_group * t * s * (dim_l + dim_m) > (t + s) * dim_l * dim_m


def _outer_gram(u: Outer, v: Outer, rows: Tensor, materialize: bool | None) -> Tensor:
    """Σ_{t,s} (l_a,t·l_b,s)(m_a,t·m_b,s) per row pair, or ⟨G_a, G_b⟩ of materialized gradients."""
    if _materializes(u, v, materialize, rows.shape[1]):
        a = _materialized(u, rows)
        return a @ (a if v is u else _materialized(v, rows)).mT
    g, r = rows.shape
    columns = [rows[:, a] for a in range(r)]

    def sides(o: Outer) -> list[tuple[Tensor, Tensor]]:
        return [(_row_column(o.l, c) if o.ids else _wide(_row_column(o.l, c)), _wide(_row_column(o.m, c)))
                for c in columns]

    su = sides(u)
    sv = su if v is u else sides(v)
    out = torch.empty(g, r, r, dtype=torch.float64, device=u.m.device)
    for a in range(r):
        for b in range(a if v is u else 0, r):
            (lu, mu), (lv, mv) = su[a], sv[b]
            out[:, a, b] = (_l_block(u, v, lu, lv) * _f64(mu @ mv.mT)).sum((1, 2))
            if v is u:
                out[:, b, a] = out[:, a, b]
    return out


def _dense_outer_gram(d: Dense, o: Outer, rows: Tensor) -> Tensor:
    """⟨G_a, Σ_s l_b,s ⊗ m_b,s⟩; for ids Σ_s G_a[id_b,s] · m_b,s, else against materialized G_b."""
    gd = _f64(_row_blocks(d.g, rows))
    if not o.ids:
        return gd @ _materialized(o, rows).mT
    (g, r), s = rows.shape, o.m.shape[1]
    table = gd.view(g, r, -1, o.m.shape[-1])  # [G, R, dim_l, dim_m]
    ids = _row_blocks(o.l, rows).flatten(1, 2)  # [G, R·S]
    picked = table[torch.arange(g, device=ids.device)[:, None, None],
                   torch.arange(r, device=ids.device)[None, :, None], ids[:, None, :]]  # [G, R, R·S, dim_m]
    return (picked * _flat_m(o, rows)[:, None]).sum(-1).view(g, r, r, s).sum(-1)


def _head_gram(u: SoftmaxHead, rows: Tensor, materialize: bool | None) -> Tensor:
    """⟨G_a, G_b⟩ of a softmax head over each group's scored tokens, the logits recomputed per vocabulary
    chunk: Σ_c (D_c D_cᵀ) ⊙ (H Hᵀ) summed per row pair, or per-row D_cᵀH materialized per chunk when
    2·T² > V·d (T the most tokens a row scores). One group at a time."""
    return torch.stack([_head_group_gram(u, group, materialize) for group in rows])


def _head_group_gram(u: SoftmaxHead, rows: Tensor, materialize: bool | None) -> Tensor:
    r_count = len(rows)
    r, h, y, g, lz = u.tokens(rows)
    out = torch.zeros(r_count, r_count, dtype=torch.float64, device=h.device)
    if len(r) == 0:
        return out
    vocab, width = u.weight.shape
    most = int(torch.bincount(r, minlength=r_count).max())
    chunks = _vocab_chunks(len(r), vocab)
    if materialize if materialize is not None else 2 * most * most > vocab * width:
        own = [(r == i).nonzero(as_tuple=True)[0] for i in range(r_count)]
        for lo, hi in chunks:
            d = u.block(h, y, g, lz, lo, hi)
            a = torch.stack([_f64(d[i].T @ h[i]).flatten() for i in own])
            out += a @ a.T
        return out
    k = torch.zeros(len(r), len(r), dtype=torch.float64, device=h.device)
    for lo, hi in chunks:
        d = u.block(h, y, g, lz, lo, hi)
        k += _f64(d @ d.T)
    k *= _f64(h @ h.T)
    sel = torch.nn.functional.one_hot(r, r_count).to(torch.float64)
    return sel.T @ k @ sel


def _head_pair_gram(u: Factor, v: Factor, rows: Tensor, materialize: bool | None) -> Tensor:
    """Terms involving a softmax head: its own Gram, or the cross terms with an embedding use of a tied
    weight (the head restricted to the columns the embedding's ids hit)."""
    if u is v:
        return _head_gram(u, rows, materialize)
    if not isinstance(u, SoftmaxHead):
        return _head_pair_gram(v, u, rows, materialize).mT
    if isinstance(v, Outer) and v.ids:
        return _outer_gram(u.columns(v.l[rows].unique()), v, rows, False)
    raise MarginscopeError("a functional softmax head's weight is used by another call that is not a token "
                           "embedding; the ghost engine cannot add the cross terms; use engine='exact'")


def pair_gram(u: Factor, v: Factor, rows: Tensor, materialize: bool | None = None) -> Tensor:
    """[G, R, R] float64 ⟨G^u_a, G^v_b⟩ for a, b in each group of `rows` [G, R] (two uses of one
    parameter, or u is v)."""
    if isinstance(u, SoftmaxHead) or isinstance(v, SoftmaxHead):
        return _head_pair_gram(u, v, rows, materialize)
    if isinstance(u, Dense) and isinstance(v, Dense):
        return _f64(_row_blocks(u.g, rows)) @ _f64(_row_blocks(v.g, rows)).mT
    if isinstance(u, Dense):
        return _dense_outer_gram(u, v, rows)
    if isinstance(v, Dense):
        return _dense_outer_gram(v, u, rows).mT
    return _outer_gram(u, v, rows, materialize)
