"""`GhostCollector`: the ghost Gram contracted during the backward, by tensor hooks on each hooked
call's output (and on a functional head's token log-probs)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ...errors import MarginscopeError
from ..exact import ParameterScope
from .capture import CallRecorder, _observing, sequence_mark
from .factors import Factor, LogitTransform, _f64, softmax_head_factors
from .kinds import Call, Kind, _first_input
from .layers import EMBEDDING
from .plan import attributable_plan
from .sums import GramSums


SOFTMAX_HEAD = Kind("softmax head", lambda m: False, lambda m: ("weight", "bias"),
                    lambda call, grad: {})  # functional uses only (`watch_head`), never planned


@dataclass(eq=False)
class FunctionalHead:
    """A use of a softmax LM head's weight (and bias) outside its module, e.g. TRL 1.x's fused log-prob
    kernel: token_logps[b, t] = log softmax(transform(W·hidden[b, t] + bias))[targets[b, t]] at the
    scored positions, computed by autograd nodes created from sequence number `start` (`sequence_mark()
    + 1` taken when `hidden` was produced) until `GhostCollector.watch_head` is called.

    module: the head module whose `weight` / `bias` are used; hidden [B, T, d] aligned with the token
    log-probs (position t feeds token t); targets [B, T] token ids (any value where unscored)."""

    module: nn.Module
    hidden: Tensor
    targets: Tensor
    start: int
    transform: LogitTransform = LogitTransform()

class GhostCollector(CallRecorder):
    """Float64 Grams of per-row ∇ log π over a scope, from the forward and backward run inside it.

    groups: the rows (indices into the batch of every hooked forward call) of each group;
    `grams[g]` is the [len(g), len(g)] Gram of the rows of groups[g]. row_scale [B]: when the
    backward gives row i the cotangent s_i·∇ log π_i (a loss's ∂loss/∂log π_i), K_ab is divided by
    s_a·s_b; a row with s_i = 0 carries no information and gets NaN. materialize: None (per layer,
    whichever takes fewer multiply-adds, `contract._materializes`), True or False forces materialized or
    ghost contraction of dense factors.

    One forward/backward pass per collector: forward calls once the backward has started are
    gradient-checkpointing recomputations (or this collector's replays) and are ignored; each call's
    contribution is computed by a tensor hook on that call's own output, which only observes.
    Hooks are removed on exit, also on error.

    An embedding called on one row for the whole batch (GPT-2's position embedding when the caller
    passes no position_ids: ids [1, T], the output broadcast-added to the token embeddings) has no
    per-row cotangent of its own; `check_attribution` finds the addition that consumes it and reads
    each row's cotangent there (a node pre-hook, which only observes), and refuses any other consumer.
    """

    def __init__(self, model: nn.Module, scope: ParameterScope, groups: Sequence[Sequence[int]],
                 row_scale: Tensor | None = None, *, materialize: bool | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        groups = [list(g) for g in groups]
        super().__init__(model, scope, {}, top_row=max((r for g in groups for r in g), default=-1),
                         on_error=on_error)
        self.groups, self.row_scale = groups, row_scale
        self._sums = GramSums(groups, scope.params[0].device, materialize)
        self._active = False
        self._broadcasts: list[tuple[Call, Tensor]] = []

    def __enter__(self) -> GhostCollector:
        self.plan = attributable_plan(self.model, self.scope)
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        self._active = False
        super().__exit__(*exc)
        self._sums.clear()

    @property
    def grams(self) -> list[Tensor]:
        """One [R, R] float64 CPU Gram per group (scale divided out when `row_scale` was given; NaN
        everywhere once the collector has failed)."""
        grams = [acc.cpu() for acc in self._sums.sums]
        if self.failed:
            return [torch.full_like(k, torch.nan) for k in grams]
        if self.row_scale is None:
            return grams
        scale = _f64(self.row_scale.detach()).cpu()
        inv = torch.where(scale == 0, torch.nan, 1 / scale)
        return [k * inv[g][:, None] * inv[g][None, :] for k, g in zip(grams, self.groups)]

    def _record(self, call: Call, out: Tensor, span: tuple[int, int]) -> None:
        self._sums.expect(call)
        self._handles.append(out.register_hook(partial(self._fire, call)))

    def _broadcast(self, out: Tensor, kind: Kind) -> bool:
        return kind is EMBEDDING and out.dim() >= 2 and out.shape[0] == 1 and self._top_row >= 1

    def _record_broadcast(self, call: Call, out: Tensor, span: tuple[int, int]) -> None:
        self._sums.expect(call)
        self._broadcasts.append((call, out))

    def check_attribution(self, root: Tensor) -> list[Tensor]:
        inputs = super().check_attribution(root)
        self._resolve_broadcasts(root)
        return inputs

    def _resolve_broadcasts(self, root: Tensor) -> None:
        """Hook the addition that consumes each one-row embedding output (see the class doc)."""
        if not self._broadcasts:
            return
        wanted = {out.grad_fn: call for call, out in self._broadcasts}
        consumers: dict[object, list] = defaultdict(list)
        stack, seen = [root.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for child, _ in node.next_functions:
                if child in wanted:
                    consumers[child].append(node)
                stack.append(child)
        for fn, call in wanted.items():
            users = consumers.get(fn, [])
            if (len(users) != 1 or type(users[0]).__name__ != "AddBackward0"
                    or getattr(users[0], "_saved_alpha", 1) != 1):
                raise MarginscopeError(
                    f"{type(call.module).__name__} is called on one row for the whole batch and its output is "
                    f"consumed by {[u.name() for u in users]}, not by one addition to a batch-sized tensor; "
                    "its per-row gradient is unknown (pass [B, T] position_ids)")
            self._handles.append(users[0].register_prehook(partial(self._fire_broadcast, call)))
        self._broadcasts.clear()

    @_observing
    def _fire_broadcast(self, call: Call, grad_outputs: tuple) -> None:
        """Node pre-hook on the addition that broadcasts a one-row embedding output: the cotangent of the
        sum is each row's cotangent of the embedding output."""
        if not self._active or grad_outputs[0] is None:
            return
        self._recording = False
        grad = grad_outputs[0]
        ids = _first_input(call)
        self._check_batch(grad.shape[0], call.module)
        if grad.shape[1:-1] != ids.shape[1:]:
            raise MarginscopeError(f"{type(call.module).__name__}: broadcast output of shape {list(grad.shape)} "
                                   f"does not match its ids {list(ids.shape)}")
        call.args, call.kwargs = (ids.expand(grad.shape[0], *ids.shape[1:]),), {}
        factors = call.kind.factors(call, grad)
        call.args = call.kwargs = None
        for attr, p in call.params:
            self._add(p, factors[attr], call)

    @_observing
    def _fire(self, call: Call, grad: Tensor) -> None:
        """Tensor hook on a call's output: the call's factors, then their Gram terms (observes only)."""
        if not self._active:
            return
        self._recording = False
        factors = call.kind.factors(call, grad)
        call.args = call.kwargs = None
        for attr, p in call.params:
            self._add(p, factors[attr], call)

    def watch_head(self, head: FunctionalHead, token_logps: Tensor, mask: Tensor) -> bool:
        """Attribute a functional use of `head.module`'s scope parameters (see `FunctionalHead`): register
        its autograd span [head.start, now) so `check_attribution` accepts it, announce the use (tied
        embeddings get their cross terms) and, when the gradient of token_logps [B, T] arrives, add the
        head's terms from g = that gradient at the scored positions (`mask` [B, T]). Call during the
        forward, after token_logps is computed; returns False when the head holds no scope parameter."""
        names = {id(p) for p in self.scope.params}
        planned = dict(self.plan[head.module][1]) if head.module in self.plan else {}
        params = []
        for a in ("weight", "bias"):
            current = getattr(head.module, a, None)
            if not isinstance(current, nn.Parameter):
                continue
            # the scope's parameter the plan found on the module; under FSDP2 the module holds its
            # unsharded stand-in during the forward, which the graph then uses (see `_post`)
            p = planned.get(a, current)
            if id(p) in names:
                params.append((a, p))
                if current is not p:
                    self._alias[id(current)] = id(p)
        if not params:
            return False
        weight = getattr(head.module, "weight", None)
        b, t = token_logps.shape
        if (not isinstance(weight, Tensor) or weight.dim() != 2 or head.hidden.shape[:2] != (b, t)
                or head.hidden.shape[-1] != weight.shape[1] or head.targets.shape != (b, t) or mask.shape != (b, t)):
            raise MarginscopeError(
                f"functional head: hidden {list(head.hidden.shape)}, targets {list(head.targets.shape)} and mask "
                f"{list(mask.shape)} must match the token log-probs {list(token_logps.shape)} and the weight "
                f"{list(getattr(weight, 'shape', []))}")
        self._check_batch(b, head.module)
        span = (head.start, sequence_mark())
        for _, p in params:
            self._spans[id(p)].append(span)
        call = Call(head.module, SOFTMAX_HEAD, params, None, None)
        self._sums.expect(call)
        fire = partial(self._fire_head, call, head.hidden.detach(), head.targets.detach(), mask.detach(),
                       head.transform)
        self._handles.append(token_logps.register_hook(fire))
        return True

    @_observing
    def _fire_head(self, call: Call, hidden: Tensor, targets: Tensor, mask: Tensor, transform: LogitTransform,
                   grad: Tensor) -> None:
        """Tensor hook on the token log-probs: the head's factors from their gradient, then their terms."""
        if not self._active:
            return
        self._recording = False
        module = call.module
        g = grad.detach().masked_fill(~mask.bool(), 0)
        factors = softmax_head_factors(hidden, targets.clamp(min=0), g, module.weight, getattr(module, "bias", None),
                                       transform, [a for a, _ in call.params])
        for attr, p in call.params:
            self._add(p, factors[attr], call)

    def _add(self, p: nn.Parameter, u: Factor, call: Call) -> None:
        """One use's terms (what a subclass replaces to consume factors otherwise, e.g. sketches)."""
        self._sums.add(p, u, call)
