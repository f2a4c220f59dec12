"""`TrackerCallback`: a `Tracker` driven by the Hugging Face `Trainer`'s events.

    trainer = Trainer(...)
    ms.integrations.attach(trainer, ms.integrations.TrackerCallback(
        probes="probes.jsonl", path="run.h5", every=10, loss=ms.losses.get("dpo", beta=0.1)))
    trainer.train()

The tracker starts at `on_train_begin` (recording step `state.global_step`: 0, or the checkpoint's step
when the run resumes, which then continues the same trace), records at `on_step_end` and closes at
`on_train_end`. After each record its scalar summaries (mean cosine, Case fractions, mean log-probs)
join the next `logs` the trainer emits. Reporting callbacks (W&B, TensorBoard) see them only when this
callback runs before them: `attach` puts it first; passed in `callbacks=[...]` it runs after them and
its summaries reach `state.log_history` and the callbacks after it only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from transformers import TrainerCallback

from ..dynamics.inrun import InRunPairs
from ..tracker import Tracker

log = logging.getLogger("marginscope")


class TrackerCallback(TrainerCallback):
    """Tracker options as in `ms.Tracker` (params, engine, per_token, per_token_probes, top_k,
    batch_size, padding_side, convention, max_length, truncation_mode, add_eos, ref_logp, overwrite,
    metadata, snapshot_device, optimizer); `tokenizer` defaults to the trainer's processing class,
    `ref_model` to the trainer's reference model when attached, `optimizer` to the trainer's (so the
    step before each record is split by its formula)."""

    def __init__(self, probes, path: str | os.PathLike, every: int = 10, *, loss=None, tokenizer=None,
                 ref_model=None, **tracker_options: Any) -> None:
        self.probes, self.path, self.every, self.loss = probes, path, every, loss
        self.tokenizer, self.ref_model, self.tracker_options = tokenizer, ref_model, tracker_options
        self.tracker: Tracker | None = None
        self.trainer = None
        self._pending: dict[str, float] = {}

    def resolve_loss(self, args):
        """The per-pair loss the trace's d_w/d_l are computed for."""
        if self.loss is None:
            raise TypeError("TrackerCallback needs loss=... (a PairLoss or a loss name); "
                            "for trl.DPOTrainer use TRLCallback, which reads it from the DPOConfig")
        return self.loss

    def scoring_options(self, args, model, tokenizer) -> dict[str, Any]:
        """Tracker options that make the probes scored as this trainer scores its pairs (none here;
        options given to the callback win)."""
        return {}

    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        tokenizer = self.tokenizer or getattr(processing_class, "tokenizer", None) or processing_class
        # the trainer's optimizer and scoring, unless the callback was given its own
        options = {"optimizer": optimizer, **self.scoring_options(args, model, tokenizer), **self.tracker_options}
        self.tracker = Tracker(model, tokenizer, self.probes, self.path, self.resolve_loss(args), self.every,
                               ref_model=self.ref_model, start_step=state.global_step,
                               metadata={"trainer": type(self.trainer).__name__ if self.trainer else "unknown"},
                               **options)
        self._pending = dict(self.tracker.summary)

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None and self.tracker.step(state.global_step):
            self._pending = dict(self.tracker.summary)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._pending or not state.is_world_process_zero:
            return
        logs.update(self._pending)
        if state.log_history:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.close()

    def on_inrun_pairs(self, step: int, pairs: InRunPairs, logp_w: np.ndarray, logp_l: np.ndarray, *,
                       examples=None) -> None:
        """Receives the in-run geometry of a training micro-batch (from `InRunMixin`)."""
        if self.tracker is not None:
            self.tracker.on_inrun_pairs(step, pairs, logp_w, logp_l, examples=examples)

    @property
    def inrun_active(self) -> bool:
        """Whether the tracker takes in-run geometry (started, and its in-run measurement not switched off)."""
        return self.tracker is not None and self.tracker.inrun_active

    def on_inrun_failed(self, err: BaseException) -> None:
        """The in-run geometry failed on this rank (from `InRunMixin`): the tracker's in-run measurement is
        switched off, on every rank at its next `step()`."""
        if self.tracker is not None:
            self.tracker.guard.fail("in_run", err)

    def wants_pair_gradients(self, n_pairs: int) -> bool:
        """Whether the coming micro-batch should deliver its pairs' gradients (`Tracker.wants_pair_gradients`)."""
        return self.tracker is not None and self.tracker.wants_pair_gradients(n_pairs)

    @property
    def pair_gradient_store(self):
        """Where the pairs' gradients are kept: the tracker's `snapshot_device`."""
        return self.tracker.snapshot_device if self.tracker is not None else None


def attach(trainer, callback: TrackerCallback) -> TrackerCallback:
    """Add `callback` to `trainer` ahead of every other callback (so its summaries reach the reporting
    integrations) and let it read the trainer (reference model)."""
    callback.trainer = trainer
    if callback.ref_model is None and getattr(trainer, "ref_model", None) is not None:
        callback.ref_model = trainer.ref_model
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
