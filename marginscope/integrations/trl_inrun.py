"""Exact in-run pair geometry inside TRL 1.x's `DPOTrainer`, delivered to callbacks every micro-batch.

    from marginscope.integrations.trl_inrun import InRunDPOTrainer, InRunRecorder

    recorder = InRunRecorder()                      # or any callback with `on_inrun_pairs`
    trainer = InRunDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds,
                              processing_class=tokenizer, callbacks=[recorder])
    trainer.train()
    recorder.records[0].pairs.cosine                # ⟨a_w,a_l⟩/(‖a_w‖‖a_l‖) of every pair of step 1

For each training micro-batch, the trainer's own forward and backward run inside an `InRunGeometry`
over the trainable parameters; after the backward (`training_step`), every callback in
`self.callback_handler.callbacks` that has `on_inrun_pairs(step, pairs, logp_w, logp_l)` receives
the optimizer step the micro-batch belongs to (`state.global_step + 1`; micro-batches of one
accumulated step share it), the `InRunPairs` of its P pairs (chosen row p, rejected row P + p) and the
policy's sequence log-probs [P] (float64) of the chosen and rejected responses. Without such a callback
nothing is hooked. A callback that also has `wants_pair_gradients(n_pairs) -> bool` (the tracker's
`TRLCallback`: on the step before a record) gets, when it says so, each pair's materialized gradient
in `InRunPairs.gradients` (kept on its `pair_gradient_store` device) and `examples=` the pairs' token
ids (`training_pairs`), for the per-pair attribution.

TRL 1.x scores the policy with a fused LM head (`add_fused_lm_head`): the head module is never called,
its weight is used inside a chunked log-prob kernel on the backbone's last hidden states. Two forward
hooks observe that call without changing it: one on the backbone (the hidden states, and where the
head's autograd span starts), one on the model TRL patched (its `labels` and the returned per-token
`log_probs` / `label_mask`). When the head's parameters are trainable (full fine-tuning; not LoRA on
the blocks), the head is attributed as a `FunctionalHead` with TRL's own logit scale, softcapping and
temperature, read from the patched forward.

The run is never changed: the hooks only observe (no `.grad`, RNG, mode or dtype change) and are
removed after each step. An error inside the geometry is logged once on the "marginscope" logger and
turns the in-run geometry off for the rest of the run; training goes on. Errors raised by a callback's
`on_inrun_pairs` are the callback's and propagate, as with any Trainer callback.

Under accelerate's FSDP2 plugin (`fsdp_version: 2`) each rank hooks its own micro-batch as above: its
rows are whole on that rank and the hooks read the full-shape parameters FSDP2 registers during the
step, so the hooks run no collective (each rank's scale is its own loss's, a mean over its own rows).
A failure turns the geometry off on its rank and is passed to the callbacks that have
`on_inrun_failed(err)`; the tracker's then switches its in-run measurement off on every rank at its
next step, and callbacks whose `inrun_active` is False are no longer delivered to.

Not supported (the geometry turns itself off with a logged reason): MoE auxiliary loss
(`router_aux_loss_coef`), pre-shifted labels (context/sequence parallelism), prompt-learning PEFT,
FSDP1 and DeepSpeed ZeRO-3 (flat or partitioned parameters; use FSDP2), reentrant gradient
checkpointing, a forward that does not go through TRL's fused head. With `ld_alpha`, a row whose tokens get different gradients (the
longer response of a pair) is NaN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..dynamics.exact import ParamSpec
from ..dynamics.ghost import FunctionalHead, LogitTransform, in_backward
from ..dynamics.inrun import InRunGeometry, InRunPairs
from ..dynamics.scoring import EncodedProbe
from ..errors import MarginscopeError
from .fsdp import ALTERNATIVE as FSDP_ALTERNATIVE

logger = logging.getLogger("marginscope")

__all__ = ["InRunDPOTrainer", "InRunMixin", "InRunRecord", "InRunRecorder", "fused_head_settings"]


def fused_head_settings(model: nn.Module) -> dict[str, Any]:
    """The settings TRL's `add_fused_lm_head` closed over on `model` (the one it patched): temperature,
    logit_scale, final_logit_softcapping, backbone_attr, ... Raises MarginscopeError when the model's
    forward is not TRL's fused head."""
    fn = getattr(model.forward, "__func__", model.forward)
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        code = getattr(fn, "__code__", None)
        if code is not None and {"temperature", "logit_scale", "backbone_attr"} <= set(code.co_freevars):
            return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)
                    if name not in ("original_forward", "text_config")}
        fn = getattr(fn, "__wrapped__", None)
    raise MarginscopeError(f"{type(model).__name__}.forward is not TRL's fused LM head (add_fused_lm_head); "
                           "the in-run geometry supports TRL 1.x's DPOTrainer only")


class _Step:
    """The hooks of one training micro-batch: an InRunGeometry over the trainable parameters plus the
    forward hooks that watch TRL's fused-head call."""

    def __init__(self, trainer: InRunMixin, model: nn.Module, inputs: dict, on_error, listeners: list) -> None:
        unwrapped = trainer.accelerator.unwrap_model(model)
        get_base = getattr(unwrapped, "get_base_model", None)
        inner = get_base() if callable(get_base) and getattr(unwrapped, "peft_config", None) else unwrapped
        if getattr(getattr(unwrapped, "active_peft_config", None), "is_prompt_learning", False):
            raise MarginscopeError("prompt-learning PEFT prepends virtual tokens to the rows; not supported")
        settings = fused_head_settings(inner)
        rows = int(inputs["input_ids"].shape[0])
        if rows % 2:
            raise MarginscopeError(f"a batch of {rows} rows is not [chosen; rejected] pairs")
        self.n_pairs = rows // 2
        self.transform = LogitTransform(float(settings.get("logit_scale", 1.0)),
                                        settings.get("final_logit_softcapping"),
                                        float(settings.get("temperature", 1.0)))
        self.head = inner.get_output_embeddings()
        wanting = [cb for cb in listeners if callable(getattr(cb, "wants_pair_gradients", None))
                   and cb.wants_pair_gradients(self.n_pairs)]
        self.pair_gradients = bool(wanting)
        self.examples = training_pairs(inputs) if self.pair_gradients else None
        self.geo = InRunGeometry(unwrapped, n_pairs=self.n_pairs, params=trainer.inrun_params, on_error=on_error,
                                 pair_gradients=self.pair_gradients,
                                 store=getattr(wanting[0], "pair_gradient_store", None) if wanting else None)
        scope = {id(p) for p in self.geo.scope.params}
        self.head_in_scope = any(isinstance(p, nn.Parameter) and id(p) in scope
                                 for p in (getattr(self.head, "weight", None), getattr(self.head, "bias", None)))
        self.hidden: Tensor | None = None
        self.start: int | None = None
        self.watched = False
        self.handles = []
        try:
            self.geo.__enter__()
            if self.head_in_scope:
                backbone = getattr(inner, settings.get("backbone_attr", "base_model"))
                self.handles.append(backbone.register_forward_hook(self._backbone_done))
            self.handles.append(inner.register_forward_hook(self._model_done, with_kwargs=True))
        except BaseException:
            self.close()
            raise

    @property
    def failed(self) -> bool:
        return self.geo.failed

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.geo.__exit__(None, None, None)
        self.hidden = None

    def _guard(self, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as err:
            self.geo.fail(err)

    def _backbone_done(self, module: nn.Module, args: tuple, out) -> None:
        self._guard(self._on_backbone, out)

    def _model_done(self, module: nn.Module, args: tuple, kwargs: dict, out) -> None:
        self._guard(self._on_model, kwargs, out)

    def _on_backbone(self, out) -> None:
        if not torch.is_grad_enabled() or in_backward():
            return
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        self.hidden, self.start = hidden, InRunGeometry.head_start()

    def _on_model(self, kwargs: dict, out) -> None:
        if not torch.is_grad_enabled() or in_backward() or not kwargs.get("fused_lm_head"):
            return
        if self.watched:
            raise MarginscopeError("the policy was called twice with gradients in one training step")
        self.watched = True
        if kwargs.get("shift_labels") is not None:
            raise MarginscopeError("pre-shifted labels (context or sequence parallelism) are not supported")
        labels, token_logps = kwargs.get("labels"), getattr(out, "log_probs", None)
        if labels is None or token_logps is None:
            raise MarginscopeError("the fused-head call returned no per-token log-probs")
        targets = labels[:, 1:]
        if token_logps.shape != targets.shape or token_logps.shape[0] != 2 * self.n_pairs:
            raise MarginscopeError(f"token log-probs {list(token_logps.shape)} do not match the labels "
                                   f"{list(labels.shape)} shifted by one")
        mask = getattr(out, "label_mask", None)
        mask = (targets != -100) if mask is None else mask
        head = None
        if self.head_in_scope:
            if self.hidden is None:
                raise MarginscopeError("the backbone's hidden states were not seen before the fused head")
            head = FunctionalHead(self.head, self.hidden.detach()[:, :-1], targets.clamp(min=0), self.start,
                                  self.transform)
        self.geo.watch_tokens(token_logps, mask, head=head)
        self.hidden = None


def training_pairs(inputs: dict) -> list[EncodedProbe]:
    """The token ids of a TRL 1.x DPO batch's pairs (rows [chosen; rejected], `completion_mask` marking
    the completions, `attention_mask` the real tokens): one `EncodedProbe` per pair, id ""."""
    ids, attention = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
    completion = inputs["completion_mask"].cpu().bool()
    n = ids.shape[0] // 2
    part = lambda row, mask: tuple(int(t) for t in ids[row][mask[row]])  # noqa: E731
    prompt = attention & ~completion
    return [EncodedProbe("", part(j, prompt), (part(j, completion), part(n + j, completion))) for j in range(n)]


@dataclass(frozen=True)
class InRunRecord:
    """One delivery: the optimizer step, the pairs' geometry and the policy's sequence log-probs [P]."""

    step: int
    pairs: InRunPairs
    logp_w: np.ndarray
    logp_l: np.ndarray


class InRunRecorder(TrainerCallback):
    """A callback that keeps every delivery in `records` (list of InRunRecord)."""

    def __init__(self) -> None:
        self.records: list[InRunRecord] = []

    def on_inrun_pairs(self, step: int, pairs: InRunPairs, logp_w: np.ndarray, logp_l: np.ndarray) -> None:
        self.records.append(InRunRecord(step, pairs, logp_w, logp_l))


class InRunMixin:
    """Mix into a TRL 1.x DPOTrainer (`class MyTrainer(InRunMixin, DPOTrainer)`) to deliver the exact
    in-run geometry of every training micro-batch to the callbacks that have `on_inrun_pairs` (see the
    module doc). `inrun_params`: the parameter scope (default: the trainable parameters)."""

    inrun_params: ParamSpec = "trainable"
    _inrun_disabled: bool = False

    def training_step(self, model: nn.Module, inputs: dict, *args, **kwargs):
        listeners = [] if self._inrun_disabled else self._inrun_listeners()
        if not listeners:
            return super().training_step(model, inputs, *args, **kwargs)
        step = self._inrun_open(model, inputs, listeners)
        try:
            loss = super().training_step(model, inputs, *args, **kwargs)
        finally:
            if step is not None:
                self._inrun_close(step)
        if step is not None:
            delivery = self._inrun_result(step)
            if delivery is not None:
                self._deliver(listeners, delivery, step.examples)
        return loss

    @staticmethod
    def _deliver(listeners: list, delivery: tuple, examples) -> None:
        """The pairs' gradients (and ids) go to the callbacks that asked for them (`wants_pair_gradients`),
        the geometry alone to the others."""
        at, pairs, logp_w, logp_l = delivery
        for callback in listeners:
            if callable(getattr(callback, "wants_pair_gradients", None)):
                callback.on_inrun_pairs(at, pairs, logp_w, logp_l, examples=examples)
            else:
                callback.on_inrun_pairs(at, pairs.without_gradients() if pairs.gradients is not None else pairs,
                                        logp_w, logp_l)

    def _inrun_listeners(self) -> list:
        """The callbacks with `on_inrun_pairs`, less those whose `inrun_active` is False (a tracker whose
        in-run measurement is off, e.g. after another rank's failure)."""
        handler = getattr(self, "callback_handler", None)
        return [cb for cb in getattr(handler, "callbacks", ())
                if callable(getattr(cb, "on_inrun_pairs", None)) and getattr(cb, "inrun_active", True)]

    def _inrun_fail(self, err: BaseException) -> None:
        """Turn the in-run geometry off on this rank and tell the callbacks that have `on_inrun_failed(err)`
        (the tracker's, which then switches its in-run measurement off on every rank at its next step)."""
        if not self._inrun_disabled:
            self._inrun_disabled = True
            logger.warning("in-run geometry turned off for the rest of the run (training is unaffected): %s: %s",
                           type(err).__name__, err, exc_info=err)
            handler = getattr(self, "callback_handler", None)
            for callback in getattr(handler, "callbacks", ()):
                if callable(getattr(callback, "on_inrun_failed", None)):
                    callback.on_inrun_failed(err)

    def _inrun_refusal(self) -> str | None:
        if getattr(self, "aux_loss_enabled", False):
            return "the MoE auxiliary loss adds router gradients that are not per-row ∇log π"
        if getattr(self, "is_fsdp_enabled", False) and not getattr(self.accelerator, "is_fsdp2", False):
            return f"FSDP1 (FullyShardedDataParallel) is not supported; {FSDP_ALTERNATIVE}"
        plugin = getattr(getattr(self, "accelerator", None), "state", None)
        plugin = getattr(plugin, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            return f"DeepSpeed ZeRO-3 partitioned parameters are not supported; {FSDP_ALTERNATIVE}"
        return None

    def _inrun_open(self, model: nn.Module, inputs: dict, listeners: list) -> _Step | None:
        try:
            refusal = self._inrun_refusal()
            if refusal is not None:
                raise MarginscopeError(refusal)
            return _Step(self, model, inputs, self._inrun_fail, listeners)
        except Exception as err:
            self._inrun_fail(err)
            return None

    def _inrun_close(self, step: _Step) -> None:
        try:
            step.close()
        except Exception as err:
            self._inrun_fail(err)

    def _inrun_result(self, step: _Step) -> tuple[int, InRunPairs, np.ndarray, np.ndarray] | None:
        try:
            if step.failed:
                return None
            if not step.watched:
                raise MarginscopeError("the policy's forward did not go through TRL's fused LM head with gradients")
            pairs, logps, n = step.geo.result(), step.geo.logps, step.n_pairs
            return self.state.global_step + 1, pairs, logps[:n].copy(), logps[n:].copy()
        except Exception as err:
            self._inrun_fail(err)
            return None


try:
    from trl import DPOTrainer as _DPOTrainer
except ImportError:  # pragma: no cover - trl is optional
    _DPOTrainer = None

if _DPOTrainer is not None:
    class InRunDPOTrainer(InRunMixin, _DPOTrainer):
        """`trl.DPOTrainer` with the exact in-run pair geometry of every training micro-batch delivered to
        the callbacks that have `on_inrun_pairs(step, pairs, logp_w, logp_l)`."""


def __getattr__(name: str):
    if name == "InRunDPOTrainer":
        raise ImportError("InRunDPOTrainer needs trl (pip install 'trl>=1.0'); InRunMixin works with a "
                          "DPOTrainer subclass of your own")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
