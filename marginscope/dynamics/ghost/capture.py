"""Capture: forward hooks that record each hooked call (`CallRecorder`), the autograd sequence marks
that bound the nodes a call created, and the scan that proves every use of a scope parameter
happened inside a hooked call."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial, wraps
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from ...errors import MarginscopeError
from ..exact import ParameterScope
from .kinds import Call, Kind
from .plan import Plan


def sequence_mark() -> int:
    """Sequence number of a fresh autograd node (grad mode on); later nodes on this thread get larger."""
    return torch.zeros((), requires_grad=True).view(()).grad_fn._sequence_nr()


def in_backward() -> bool:
    """Whether this thread is running an autograd backward (e.g. a checkpointing recomputation)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _observing(hook: Callable) -> Callable:
    """A hook of a recorder that only observes: once the recorder has failed it does nothing; with an
    `on_error` handler, an exception is handed to it (the recorder fails) instead of reaching the
    forward or backward that ran the hook."""

    @wraps(hook)
    def guarded(self: CallRecorder, *args, **kwargs) -> None:
        if self.failed:
            return None
        try:
            hook(self, *args, **kwargs)
        except Exception as err:
            if self.on_error is None:
                raise
            self.fail(err)
        return None

    return guarded


def _detached(tree):
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _scan_graph(root: Tensor, ids: set[int]) -> tuple[list[tuple[object, Tensor]], list[Tensor]]:
    """Root's autograd graph: (consumer node, parameter) for every edge into a parameter in `ids`,
    and every other leaf tensor that requires a gradient."""
    uses, leaves, stack, seen = [], [], [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            raise MarginscopeError(
                "reentrant gradient checkpointing hides parameters from the autograd graph (and rejects "
                "autograd.grad); enable it with gradient_checkpointing_kwargs={'use_reentrant': False}")
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)
            if variable is None:
                stack.append(child)
            elif id(variable) in ids:
                uses.append((node, variable))
            elif child not in seen:
                seen.add(child)
                leaves.append(variable)
    return uses, leaves


@dataclass(eq=False)
class Recorded:
    """One recorded call with its output tensor, the output's version then, and its autograd span
    [start, end): the sequence numbers of the nodes its forward created."""

    call: Call
    output: Tensor
    version: int
    span: tuple[int, int]


class CallRecorder:
    """Forward hooks on the modules of `plan` that record every call made with grad enabled while the
    recorder is open, in forward order (`calls`): capture mode, which touches no tensor, for
    differentiating to the calls' outputs directly with `autograd.grad` (batched or not; tensor hooks
    do not fire under `is_grads_batched`). Every recorded call must see the same batch of rows, holding
    row `top_row`. Calls made while a backward runs (checkpointing recomputation) are not recorded.
    Hooks are removed on exit, also on error; the records stay.

    on_error: None (a hook's exception propagates into the forward or backward that ran it), or a
    handler that receives it instead; the recorder is then `failed` and its hooks do nothing more."""

    def __init__(self, model: nn.Module, scope: ParameterScope, plan: Plan, *, top_row: int = -1,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.model, self.scope, self.plan = model, scope, plan
        self.on_error = on_error
        self.failed = False
        self.calls: list[Recorded] = []
        self._top_row = top_row
        self._names = {id(p): n for n, p in zip(scope.names, scope.params)}
        self._alias: dict[int, int] = {}  # a parameter substituted for a call (FSDP2) → the scope one
        self._sources: list[Tensor] = []  # hooked outputs whose inputs need no gradient
        self._spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self._starts: dict[nn.Module, int] = {}
        self._handles: list = []
        self._batch: int | None = None
        self._recording = False

    def __enter__(self) -> CallRecorder:
        self._recording = True
        try:
            for module, (kind, params) in self.plan.items():
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(module.register_forward_hook(
                    partial(self._post, kind=kind, params=params), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._recording = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fail(self, err: BaseException) -> None:
        """Stop observing and hand `err` to `on_error` (once)."""
        if self.failed:
            return
        self.failed, self._recording = True, False
        if self.on_error is not None:
            self.on_error(err)

    def stop_recording(self) -> None:
        """The backward has started: forward calls from now on are recomputations, not new uses."""
        self._recording = False

    def outputs(self, records: Sequence[Recorded]) -> list[Tensor]:
        """The records' output tensors; raises if one was modified in place after its call (autograd
        would differentiate to the modified value)."""
        for r in records:
            if r.output._version != r.version:
                raise MarginscopeError(
                    f"the output of {type(r.call.module).__name__} (which uses "
                    f"{self._names[id(r.call.params[0][1])]}) is modified in place after the call")
        return [r.output for r in records]

    def check_attribution(self, root: Tensor) -> list[Tensor]:
        """Raise unless every use of a scope parameter in root's graph happened inside a hooked call
        that attributes it; a direct functional use, a bypassed module (`module.forward(x)`) or
        reentrant checkpointing would otherwise be missed silently. Call between forward and backward.

        Returns what to differentiate root by so that every hooked output gets its gradient while no
        parameter gradient is computed: the hooked outputs whose inputs need none and
        every other leaf of the graph that requires one (e.g. HF's `enable_input_require_grads`).
        Each hooked output depends on one of them: its inputs come from earlier hooked outputs (all
        uses of scope parameters are inside hooked calls), from such leaves, or need no gradient."""
        uses, leaves = _scan_graph(root, set(self._names) | set(self._alias))
        for node, param in uses:
            seq, key = node._sequence_nr(), self._alias.get(id(param), id(param))
            if not any(lo <= seq < hi for lo, hi in self._spans[key]):
                raise MarginscopeError(
                    f"{self._names[key]} is used outside the modules the ghost engine hooks (e.g. "
                    f"directly in a functional op, by {node.name()}); use engine='exact'")
        return self._sources + leaves

    def _recordable(self) -> bool:
        return self._recording and torch.is_grad_enabled() and not in_backward()

    @_observing
    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self._recordable():
            self._starts[module] = sequence_mark() + 1

    @_observing
    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out, *, kind: Kind,
              params: list[tuple[str, nn.Parameter]]) -> None:
        if not self._recordable():
            return
        if not isinstance(out, Tensor):
            raise MarginscopeError(
                f"{self._names[id(params[0][1])]}: {type(module).__name__} returns {type(out).__name__}, "
                "not one tensor; the ghost engine cannot attribute its parameters; use engine='exact'")
        if not out.requires_grad:
            return
        broadcast = self._broadcast(out, kind)
        if not broadcast:
            self._check_batch(out.shape[0], module)
        call = Call(module, kind, params, _detached(args), _detached(kwargs))
        span = (self._starts.pop(module), sequence_mark())
        for a, p in params:
            self._spans[id(p)].append(span)
            current = module._parameters.get(a)
            if current is not None and current is not p:  # FSDP2 registers its unsharded parameter
                self._alias[id(current)] = id(p)
        if not any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves((args, kwargs))):
            self._sources.append(out)
        (self._record_broadcast if broadcast else self._record)(call, out, span)

    def _record(self, call: Call, out: Tensor, span: tuple[int, int]) -> None:
        self.calls.append(Recorded(call, out, out._version, span))

    def _broadcast(self, out: Tensor, kind: Kind) -> bool:
        """Whether a call is made on one row for the whole batch (see `GhostCollector`); never here."""
        return False

    def _record_broadcast(self, call: Call, out: Tensor, span: tuple[int, int]) -> None:
        raise NotImplementedError

    def _check_batch(self, batch: int, module: nn.Module) -> None:
        self._batch = batch if self._batch is None else self._batch
        if batch != self._batch or self._top_row >= batch:
            raise MarginscopeError(
                f"{type(module).__name__} saw a batch of {batch} rows; every hooked call must see the "
                f"same batch ({self._batch} rows), holding every group row (up to {self._top_row})")
