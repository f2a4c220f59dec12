"""Which modules to hook: each scope parameter's owning module and the kind that attributes it."""

from __future__ import annotations

from torch import nn

from ...errors import MarginscopeError
from ..exact import ParameterScope
from .kinds import Kind
from .layers import KINDS, ROWWISE_MAX_NUMEL
from .layers.rowwise import _is_leaf


def _why(module: nn.Module, kind: Kind | None) -> str:
    if kind is not None:
        return f"the {kind.name} handler attributes only {kind.attributes(module)} of this module"
    if not _is_leaf(module):
        return ("it is used in the forward of a module with parameterized submodules, not by a Linear, "
                "Conv1D, Embedding or small leaf module")
    return f"a leaf module of unknown kind with more than {ROWWISE_MAX_NUMEL} parameters"


Plan = dict[nn.Module, tuple[Kind, list[tuple[str, nn.Parameter]]]]


def plan_modules(model: nn.Module, scope: ParameterScope) -> tuple[Plan, dict[str, str]]:
    """The modules to hook with their kind and scope parameters, and {name: reason} for every scope
    parameter some owning module cannot attribute."""
    names = {id(p): n for n, p in zip(scope.names, scope.params)}
    plan, problems = {}, {}
    for qual, module in model.named_modules():
        own = [(a, p) for a, p in module.named_parameters(recurse=False) if id(p) in names]
        if not own:
            continue
        kind = next((k for k in KINDS if k.claims(module)), None)
        handled = kind.attributes(module) if kind else ()
        for a, p in own:
            if a not in handled:
                where = f"{type(module).__name__} '{qual}'.{a}"
                problems.setdefault(names[id(p)], f"{where}: {_why(module, kind)}")
        if kind and any(a in handled for a, _ in own):
            plan[module] = (kind, [(a, p) for a, p in own if a in handled])
    return plan, problems


def ghost_supports(model: nn.Module, scope: ParameterScope) -> bool:
    """Whether every scope parameter is owned only by modules the ghost engine attributes."""
    return not plan_modules(model, scope)[1]


def attributable_plan(model: nn.Module, scope: ParameterScope) -> Plan:
    """`plan_modules`'s plan; raises MarginscopeError naming every scope parameter it cannot attribute."""
    plan, problems = plan_modules(model, scope)
    if problems:
        listed = "; ".join(f"{n} ({why})" for n, why in problems.items())
        raise MarginscopeError(f"the ghost engine cannot attribute {listed}; use engine='exact'")
    return plan
