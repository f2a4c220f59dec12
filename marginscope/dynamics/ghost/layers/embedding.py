"""nn.Embedding (ids i): l = one-hot(i), m = D, so ⟨G_a, G_b⟩ = Σ [i_a,t = i_b,s] D_a,t · D_b,s."""

from __future__ import annotations

from torch import Tensor, nn

from ..factors import Factor, Outer
from ..kinds import Call, Kind, _first_input, _forward_is, _per_row


def _embedding_factors(call: Call, grad: Tensor) -> dict[str, Factor]:
    """l = ids, m = D; positions holding `padding_idx` get no gradient, as in F.embedding."""
    b, module = grad.shape[0], call.module
    ids, d = _first_input(call), _per_row(grad, b)
    ids = ids.reshape(1 if ids.shape[0] == 1 else b, -1)  # one row's ids may be shared (`_per_row`)
    if module.padding_idx is not None:
        d = d.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    return {"weight": Outer(ids, d)}


EMBEDDING = Kind("embedding", _forward_is(nn.Embedding),
                 lambda m: () if m.scale_grad_by_freq else ("weight",), _embedding_factors)
