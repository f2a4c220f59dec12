"""Sharded models for the tracker: FSDP2 (`torch.distributed.fsdp.fully_shard`) and what is refused.

Under FSDP2 a module's parameters are DTensor shards between forwards; each FSDP module all-gathers
its own (a collective) in its pre-forward and pre-backward hooks and frees them after. Two things
follow for measurements: code that reads parameters sees shards, and ranks that run different numbers
of forwards issue mismatched collectives (one rank aborts, the other hangs). The tracker therefore
measures inside `gathered(model)`: every rank all-gathers every FSDP module's parameters once, in the
same order, with FSDP's reshard-after-forward and -backward switched off, so the measurement's own
forwards and backwards run no collective at all: each rank scores its own probes (any number of
them), the model exposes ordinary tensors of full shape, and a measurement failing on one rank cannot
hang another. Cost: while a record runs every rank holds the unsharded model (in the mixed-precision
policy's `param_dtype`); the training steps themselves stay sharded.

Vectors of the "what actually happened" views are differences of the sharded (master) parameters:
parameter snapshots and step parts are kept as DTensor shards (one shard per rank, elementwise
arithmetic stays local) and reassembled with `full()` (an all-gather) by every rank at a record.

Checkpoints (`full_checkpoint`, `load_full_optimizer_state`) go through torch's
`torch.distributed.checkpoint.state_dict`: the whole (unsharded) model and optimizer state gathered to
rank 0 on the CPU, the optimizer's in the one-process format of `optimizer.state_dict()`, and loaded
back as each rank's shards.

Refused with one line (`check_supported`): FSDP1 (`FullyShardedDataParallel` wrappers) and DeepSpeed
ZeRO-3 (partitioned parameters): use FSDP2 instead (`fully_shard`, or accelerate's `fsdp_version: 2`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..dynamics.exact import ParameterScope
from ..errors import MarginscopeError

ALTERNATIVE = "use FSDP2 instead (torch.distributed.fsdp.fully_shard, or accelerate's fsdp_version: 2)"


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules of `model` (itself included), in `model.modules()` order."""
    cls = _fsdp_module_class()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds FSDP2-sharded parameters."""
    return bool(fsdp_modules(model))


def check_supported(model: nn.Module) -> None:
    """Raise MarginscopeError (one line) for parameter sharding the tracker cannot measure."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise MarginscopeError(f"FSDP1 (FullyShardedDataParallel) is not supported; {ALTERNATIVE}")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise MarginscopeError(f"DeepSpeed ZeRO-3 partitioned parameters are not supported; {ALTERNATIVE}")


def _groups(module: nn.Module) -> list:
    return list(module._get_fsdp_state()._fsdp_param_groups)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 module of `model` unsharded for the duration (see the module doc); nothing happens
    for a model without any. Collective: every rank enters and leaves together. On exit the
    parameters are resharded and FSDP's reshard settings restored; the sharded parameters, their
    `.grad` and the optimizer are never touched."""
    modules = fsdp_modules(model)
    if not modules:
        yield
        return
    roots = [m for m in modules if not any(o is not m and any(s is m for s in o.modules()) for o in modules)]
    for root in roots:
        root._get_fsdp_state()._lazy_init()  # what its first forward does (a no-op after it)
    groups = [g for m in modules for g in _groups(m)]
    saved = [(g.post_forward_mesh_info, g.reshard_after_backward) for g in groups]
    try:
        for g in groups:
            g.post_forward_mesh_info, g.reshard_after_backward = None, False
        for m in modules:
            m.unshard()
        yield
    finally:
        for m in modules:
            m.reshard()
        for g, (mesh, after_backward) in zip(groups, saved):
            g.post_forward_mesh_info, g.reshard_after_backward = mesh, after_backward


def sharded_scope(model: nn.Module, scope: ParameterScope) -> ParameterScope:
    """`scope` with each FSDP2-managed parameter replaced by its DTensor shard, the object the
    optimizer steps: between forwards a module may hold either (FSDP2 leaves the root's parameters
    unsharded after a forward without backward), so a scope resolved from the module is mapped back."""
    shard: dict[int, nn.Parameter] = {}
    for module in fsdp_modules(model):
        for group in _groups(module):
            for fsdp_param in group.fsdp_params:
                shard[id(fsdp_param.sharded_param)] = fsdp_param.sharded_param
                if hasattr(fsdp_param, "_unsharded_param"):
                    shard[id(fsdp_param._unsharded_param)] = fsdp_param.sharded_param
    if not shard:
        return scope
    return ParameterScope(scope.names, tuple(shard.get(id(p), p) for p in scope.params), scope.spec)


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (an all-gather: every rank calls it), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_values(values: Mapping[str, Tensor] | None, like: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """{name: full(values[name])} in the dtype and device of `like[name]` (the parameters the model
    computes with); None stays None. Collective when any value is a DTensor."""
    if values is None:
        return None
    return {n: full(v).to(dtype=like[n].dtype, device=like[n].device) for n, v in values.items()}


def unsharded(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """{name: the parameter as the model computes with it now} (inside `gathered`, the unsharded one)."""
    own = dict(model.named_parameters())
    return {n: own[n].detach() for n in names}


def shard_model(model: nn.Module, **policy) -> nn.Module:
    """Shard `model` with FSDP2 the usual way: `fully_shard` on every decoder block (the classes a
    transformers model lists in `_no_split_modules`), then on the root; `policy` goes to each call
    (`mp_policy`, `offload_policy`, `reshard_after_forward`, ...). Needs an initialized process group.
    Returns the model, sharded in place. Raises MarginscopeError when no block class is found."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise MarginscopeError(f"{type(model).__name__}: no decoder block class (_no_split_modules) to shard")
    for block in blocks:
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Gradient accumulation without FSDP2's reduce-scatter (DDP's `no_sync`) for the duration."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_checkpoint(model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The whole state of FSDP2-sharded `model` and its `optimizer`, for a checkpoint: every DTensor
    all-gathered to rank 0 on the CPU (`get_model_state_dict` / `get_optimizer_state_dict` with
    `StateDictOptions(full_state_dict=True, cpu_offload=True)`). Collective: every rank calls it.
    Rank 0 gets (the model's state_dict: {name: full tensor of the parameter's shape}, tied parameters
    sharing one tensor as in an unsharded state_dict; the optimizer's state_dict in
    `optimizer.state_dict()`'s own format: state keyed by parameter index in param_groups order, full
    tensors, so an unsharded optimizer over the same parameters loads it); the other ranks get None."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if torch.distributed.get_rank() != 0:
        return None
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        # tied parameters (one DTensor under several names) are gathered once per name; share one tensor
        # again, as in the unsharded state_dict, so save_pretrained drops the tied copies as it does there
        if name in model_state:
            model_state[name] = model_state[first.setdefault(id(param), name)]
    # torch names the parameters in the optimizer's order: a parameter's index is its position there
    index = {name: i for i, name in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
    return model_state, {"state": {index[n]: s for n, s in by_name["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                          for g in by_name["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load `state` (an `optimizer.state_dict()` of full tensors in the one-process format, as
    `full_checkpoint` returns it; the same on every rank) into the `optimizer` of FSDP2-sharded
    `model`: each rank keeps its shard of every tensor (`set_optimizer_state_dict` with
    `full_state_dict=True`; no broadcast from rank 0, every rank has the whole state). Collective:
    every rank calls it, before the first backward. Raises MarginscopeError when the state's parameter
    indices are not the optimizer's, or a tensor of it is not its parameter's (full) shape."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    # torch's names of the optimizer's parameters in its order (this rank's view, no collective)
    names = [n for g in get_optimizer_state_dict(model, optimizer)["param_groups"] for n in g["params"]]
    indices = sorted(i for g in state["param_groups"] for i in g["params"])
    if indices != list(range(len(names))):
        raise MarginscopeError(f"the optimizer state is for {len(indices)} parameters; this optimizer has {len(names)}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(params[i].shape):
                raise MarginscopeError(f"the optimizer state's {key} of {names[i]} has shape {list(value.shape)}; "
                                       f"the parameter has {list(params[i].shape)}")
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        # the hyper-parameters as saved: torch's flattening of the state dict turns tuples (betas) into lists
        group.update({k: v for k, v in saved.items() if k != "params"})
