"""Gram sums over every use of each parameter: the cross terms of tied weights (GPT-2's wte/lm_head)
and of modules called more than once."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor, nn

from .contract import pair_gram
from .factors import Dense, Factor, Outer, SoftmaxHead
from .kinds import Call, _first_input
from .layers import EMBEDDING


class GramSums:
    """Float64 [R, R] Gram sums over groups of rows, fed one factor per parameter use:

        K += ⟨G^u, G^u⟩ + Σ_v (⟨G^u, G^v⟩ + ⟨G^v, G^u⟩)   over the parameter's earlier uses v,

    so a parameter used by several calls (∇θ_r = Σ_u ∇θ_r^u) gets the cross terms of its uses. All of
    a parameter's uses are announced by `expect` before the first of their factors is added; a use's
    factor is kept for the cross terms only while other uses of its parameter are pending (`_compact`).
    Groups of equal size are contracted together (batched), so many at once that their row pairs' token
    Grams ([T, S] each, R² of them per group) hold at most `BATCH_ELEMENTS` entries together."""

    BATCH_ELEMENTS = 1 << 25

    def __init__(self, groups: Sequence[Sequence[int]], device: torch.device,
                 materialize: bool | None = None) -> None:
        self.groups, self.materialize = [list(g) for g in groups], materialize
        by_size: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(self.groups):
            by_size[len(g)].append(i)
        self._batches = list(by_size.values())  # group indices, one list per group size
        self._acc = [torch.zeros(len(idx), len(self.groups[idx[0]]), len(self.groups[idx[0]]),
                                 dtype=torch.float64, device=device) for idx in self._batches]
        self._rows: dict[torch.device, list[Tensor]] = {}
        self._pending: dict[int, list[Call]] = defaultdict(list)
        self._stored: dict[int, list[Factor]] = defaultdict(list)

    @property
    def sums(self) -> list[Tensor]:
        """One [R, R] float64 Gram sum per group, in the order of `groups`."""
        out: list[Tensor | None] = [None] * len(self.groups)
        for idx, acc in zip(self._batches, self._acc):
            for j, i in enumerate(idx):
                out[i] = acc[j]
        return out

    def expect(self, call: Call) -> None:
        """Announce a call whose factors will come (its parameters' uses are pending until then)."""
        for _, p in call.params:
            self._pending[id(p)].append(call)

    def add(self, p: nn.Parameter, u: Factor, call: Call) -> None:
        """Add the terms of use `call` of parameter p, whose factor is u."""
        pending, stored = self._pending[id(p)], self._stored[id(p)]
        pending.remove(call)
        tokens = max([_tokens(u)] + [_tokens(v) for v in stored])
        for acc, rows in zip(self._acc, self._group_rows(u)):
            step = max(1, self.BATCH_ELEMENTS // max(1, (rows.shape[1] * tokens) ** 2))
            for lo in range(0, len(rows), step):
                block = rows[lo:lo + step]
                k = pair_gram(u, u, block, self.materialize)
                for v in stored:
                    c = pair_gram(u, v, block, self.materialize)
                    k = k + c + c.mT
                acc[lo:lo + step] += k.to(acc.device)
        if pending:
            stored.append(_compact(u, pending))
        else:
            stored.clear()

    def clear(self) -> None:
        """Drop pending uses and kept factors (the sums stay)."""
        self._pending.clear()
        self._stored.clear()

    def _group_rows(self, u: Factor) -> list[Tensor]:
        """[G, R] row indices of each batch of equal-size groups, on u's device."""
        device = (u.g if isinstance(u, Dense) else u.h if isinstance(u, SoftmaxHead) else u.m).device
        if device not in self._rows:
            self._rows[device] = [torch.tensor([self.groups[i] for i in idx], dtype=torch.long, device=device)
                                  .view(len(idx), -1) for idx in self._batches]
        return self._rows[device]


def _tokens(u: Factor) -> int:
    """Positions per row of a factor (1 for a materialized one)."""
    return 1 if isinstance(u, Dense) else u.h.shape[1] if isinstance(u, SoftmaxHead) else u.m.shape[1]


def _compact(u: Factor, pending: list[Call]) -> Factor:
    """A dense-l factor that only embedding uses still wait for keeps just the columns their ids hit
    (e.g. a tied lm_head's D: [B, T, vocab] → [B, T, #distinct ids]; a softmax head computes only those)."""
    if isinstance(u, Dense) or (isinstance(u, Outer) and u.ids) or any(c.kind is not EMBEDDING for c in pending):
        return u
    device = u.h.device if isinstance(u, SoftmaxHead) else u.l.device
    ids = torch.cat([_first_input(c).flatten() for c in pending]).unique().to(device)
    return u.columns(ids) if isinstance(u, SoftmaxHead) else Outer(u.l[..., ids], u.m, ids)
