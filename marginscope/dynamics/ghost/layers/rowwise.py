"""Any other small leaf module (norms): ∇θ_r materialized by a vmap over rows of a vjp."""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..factors import Dense, Factor
from ..kinds import Call, Kind

ROWWISE_MAX_NUMEL = 1 << 16  # largest own-parameter count of a generic module materialized per row


def _rowwise_factors(call: Call, grad: Tensor) -> dict[str, Factor]:
    """∇θ_r = vjp of θ ↦ module(θ; inputs_r) at D_r, vmapped over rows (tensors with a leading
    batch dimension are split by row, anything else is shared). θ is read from the module when the
    cotangent arrives: under FSDP2 the unsharded parameters it registers then, not the scope's shards."""
    module, b = call.module, grad.shape[0]
    params = {a: getattr(module, a).detach() for a, _ in call.params}  # as the module holds them now
    flat, spec = tree_flatten((call.args, call.kwargs))
    dims = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else None for t in flat]

    def row(flat_row: list, d: Tensor) -> dict[str, Tensor]:
        unsplit = [t.unsqueeze(0) if dim == 0 else t for t, dim in zip(flat_row, dims)]
        args, kwargs = tree_unflatten(unsplit, spec)
        _, pull = vjp(lambda p: functional_call(module, p, args, kwargs), params)
        return pull(d.unsqueeze(0))[0]

    return {a: Dense(g.flatten(1)) for a, g in vmap(row, in_dims=(dims, 0))(flat, grad).items()}


def _is_leaf(module: nn.Module) -> bool:
    """No descendant holds parameters: the module's own forward is all that uses them."""
    return sum(1 for _ in module.parameters()) == sum(1 for _ in module.parameters(recurse=False))


def _is_small_leaf(module: nn.Module) -> bool:
    return _is_leaf(module) and sum(p.numel() for p in module.parameters(recurse=False)) <= ROWWISE_MAX_NUMEL


ROWWISE = Kind("rowwise", _is_small_leaf, lambda m: tuple(a for a, _ in m.named_parameters(recurse=False)),
               _rowwise_factors)
