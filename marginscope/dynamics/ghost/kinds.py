"""What a handler is: a hooked `Call` and the `Kind` that factors its parameters' per-row gradients.

A kind claims a module (by its `forward` function, never by isinstance alone), names the own
parameters it attributes, and turns (call, output cotangent D) into {attribute: factor}. The kinds
themselves are in `layers/`, one file per layer type; `plan.py` assigns them to a model's modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .factors import Factor


@dataclass(eq=False)
class Call:
    """One hooked forward call: its captured (detached) inputs and the scope parameters it uses."""

    module: nn.Module
    kind: Kind
    params: list[tuple[str, nn.Parameter]]  # (attribute, parameter)
    args: tuple | None
    kwargs: dict | None


@dataclass(frozen=True)
class Kind:
    """How the per-row gradients of one kind of module's own parameters are factored.

    claims: whether the module is of this kind; attributes: the own parameters it attributes;
    factors: (call, output cotangent) → {attribute: factor} for the call's parameters."""

    name: str
    claims: Callable[[nn.Module], bool]
    attributes: Callable[[nn.Module], tuple[str, ...]]
    factors: Callable[[Call, Tensor], dict[str, Factor]]


def _first_input(call: Call) -> Tensor:
    return (*call.args, *call.kwargs.values())[0]


def _per_row(t: Tensor, b: int) -> Tensor:
    """[B, ..., d] → [B, T, d] (T: every position of the row). An input of one row [1, ..., d] against a
    cotangent of b > 1 rows stays one row, shared by them (virtual rows, `virtual.py`)."""
    return t.reshape(1 if t.shape[0] == 1 else b, -1, t.shape[-1])


DROP_FRACTION = 8  # drop zero positions only when at least 1/8 of them are: copying x and d costs more below


def _nonzero_positions(x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the positions where every row's cotangent is zero (they add nothing to any Gram), when they are
    at least 1/`DROP_FRACTION` of the positions: e.g. an LM head applied to every position sees cotangents
    only at the scored response positions, not over the prompt or padding. Candidates (every row's first
    feature zero) are read first, a strided pass over B·T values; only they are checked in full."""
    t = d.shape[1]
    candidates = (d.flatten(2)[..., 0] == 0).all(0)
    if int(candidates.sum()) * DROP_FRACTION < t:
        return x, d
    keep = ~candidates
    keep[candidates] = torch.any(d[:, candidates].flatten(2), dim=-1).any(0)
    return (x, d) if int((~keep).sum()) * DROP_FRACTION < t else (x[:, keep], d[:, keep])


def _forward_is(cls: type) -> Callable[[nn.Module], bool]:
    """Claims the modules whose forward is `cls.forward` (subclasses that keep it included)."""
    return lambda module: type(module).forward is cls.forward
