"""`StepCapture`: what splitting one optimizer step needs, taken with the optimizer's step pre-hook.

The tracker arms the capture for the optimizer steps that precede a record only. On such a step the
pre-hook (`Optimizer.register_step_pre_hook`, run inside `optimizer.step()` before any parameter
changes) copies θ_{t−1} of the parameters in scope and, for torch `Adam`, `AdamW` and `SGD`, splits
the coming update by the optimizer's own formula (`ms.dynamics.optimizers`) from the gradients, the
state and the param group's hyper-parameters as they are at that moment (learning-rate schedules
included). Other optimizers get θ_{t−1} only: `step_delta` is still exact, the split is reported
unavailable, never guessed. The hook never raises into training: a failure is handed to `on_error`
and the capture switches itself off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .dynamics.exact import ParameterScope
from .dynamics.optimizers import SPLITTERS, STEP_PARTS


@dataclass
class CapturedStep:
    """One captured optimizer step: the step number it produces, θ_{t−1} of the scope by name (None
    when not copied: the caller holds it), its parts {part: {name: tensor}} in the parameters'
    dtype (None where the split is unavailable) and, when asked for, the gradient part's coefficient
    c_t {name: tensor, float32 (float64 for float64 parameters)} (parts["gradient"] = c_t ⊙ g_t;
    parameters the optimizer skipped have none)."""

    step: int
    before: dict[str, Tensor] | None
    parts: dict[str, dict[str, Tensor]] | None
    coefficient: dict[str, Tensor] | None = None


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's `AcceleratedOptimizer` (itself an `Optimizer` subclass
    that only delegates) or any other `.optimizer` wrapper."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def split_support(optimizer: torch.optim.Optimizer) -> str | None:
    """None when the step can be split exactly, else the reason it cannot (recorded in the trace)."""
    name = type(optimizer).__name__
    if type(optimizer).__module__.startswith("torch.optim") and name in SPLITTERS:
        return None
    return (f"{type(optimizer).__module__}.{name}: no exact split of its update is implemented "
            "(torch Adam, AdamW and SGD are); step_delta is recorded, step_parts are NaN")


class StepCapture:
    """Copies what the step split needs on the optimizer steps `arm(step)` asks for.

    scope: the parameters the tracker measures; device: where copies are kept (None: beside each
    parameter; "cpu" offloads them). Memory while armed: θ_{t−1}, three parts and, for the attribution,
    the coefficient c_t, each one copy of the scope, from the pre-hook until `take`.
    """

    def __init__(self, optimizer, scope: ParameterScope, *, device: str | torch.device | None = None,
                 on_error: Callable[[BaseException], None]) -> None:
        self.optimizer = inner_optimizer(optimizer)
        self.unavailable = split_support(self.optimizer)
        self._split = SPLITTERS.get(type(self.optimizer).__name__) if self.unavailable is None else None
        self._names = {id(p): n for n, p in zip(scope.names, scope.params)}
        self._scope = scope
        self._device = device
        self._on_error = on_error
        self._armed: tuple[int, bool, bool] | None = None
        self._captured: CapturedStep | None = None
        self._handle = self.optimizer.register_step_pre_hook(self._pre_hook)

    def arm(self, step: int, *, copy_before: bool = True, coefficient: bool = False) -> None:
        """Capture the next optimizer step, the one that produces training step `step`; copy θ_{t−1}
        unless the caller already holds it (`copy_before=False`); keep c_t too with `coefficient`
        (one more float64 copy of the scope, for the per-pair attribution)."""
        self._armed = (step, copy_before, coefficient)

    @property
    def armed(self) -> int | None:
        """The step the next optimizer step is captured for, None when not armed."""
        return None if self._armed is None else self._armed[0]

    def take(self, step: int) -> CapturedStep | None:
        """The capture of the step that produced `step` (None if that step was not captured)."""
        captured, self._captured = self._captured, None
        return captured if captured is not None and captured.step == step else None

    def close(self) -> None:
        self._handle.remove()
        self._armed = self._captured = None

    def _copy(self, x: Tensor, like: Tensor) -> Tensor:
        return x.detach().to(dtype=like.dtype, device=self._device or like.device, copy=True)

    def _pre_hook(self, optimizer, args, kwargs) -> None:
        armed, self._armed = self._armed, None
        if armed is None:
            return
        try:
            self._captured = self._capture(*armed)
        except Exception as err:  # noqa: BLE001 — never raise into the training step
            self.close()
            self._on_error(err)

    def _capture(self, step: int, copy_before: bool, keep_coefficient: bool) -> CapturedStep:
        pairs = list(zip(self._scope.names, self._scope.params))
        before = {n: self._copy(p, p) for n, p in pairs} if copy_before else None
        if self._split is None:
            return CapturedStep(step, before, None)
        parts = {part: {n: torch.zeros_like(p, device=self._device or p.device) for n, p in pairs}
                 for part in STEP_PARTS}
        coefficient: dict[str, Tensor] | None = {} if keep_coefficient else None
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = self._names.get(id(p))
                if name is None or p.grad is None:  # outside the scope, or skipped by the optimizer
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{name}: sparse gradients have no exact step split here")
                split = self._split(p, p.grad, self.optimizer.state.get(p, {}), group)
                for part, value in split.parts.items():
                    parts[part][name] = self._copy(value, p)
                if coefficient is not None:
                    coefficient[name] = split.coefficient.to(
                        device=self._device or p.device, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
        return CapturedStep(step, before, parts, coefficient)
