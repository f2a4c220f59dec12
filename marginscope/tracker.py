"""`Tracker`: record a probe set's dynamics during a training run into an HDF5 trace.

    tracker = ms.Tracker(model, tokenizer, probes, path="run.h5", loss=loss, every=10)  # records step 0
    for step, batch in enumerate(loader, start=1):
        with tracker.in_run(n_pairs=len(batch)) as geo:      # optional: exact per-pair geometry of the batch
            logps, _ = ms.dynamics.score_pairs(model, batch)
            geo.watch(logps)
            loss_fn(logps).backward()
        optimizer.step(); optimizer.zero_grad()
        tracker.step(step)                                   # records when step % every == 0
    tracker.close()

A record holds, for every probe and response: sequence and per-token log-probs, the Gram of the
log-prob gradients, the loss's d_w/d_l, the Case, the first-order prediction and the change since the
previous record, the top-k next tokens at every position (where the probability mass goes), and the
per-token Gram of a chosen subset of probes. In-run rows (training-batch pairs) are written at every
`step()`.

The never-hurt-the-run policy: measurements run in eval mode without touching `.grad`; the RNG state,
train/eval mode and grad mode are restored afterwards; an exception inside a measurement is logged once
and disables that measurement (geometry, per_token, top_k, in_run, trace), never training. Problems a
user can fix (bad probe file, trace exists, options, a tokenizer or reference that does not fit the
model's vocabulary) raise `MarginscopeError` at construction, before any training step. Under torch.distributed every rank calls the same methods; probes are split across
ranks, results gathered, and rank 0 alone writes. A measurement that fails on one rank is disabled on
every rank together (the ranks compare their failures at every `step()` and after each record's
measurements; a record's values of a measurement that failed on some rank are dropped everywhere).
FSDP2-sharded models (`fully_shard`) are measured unsharded (`integrations.fsdp.gathered`); FSDP1 and
DeepSpeed ZeRO-3 are refused at construction.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import losses as loss_zoo
from .checkpoint import versions
from .dynamics.attribution import pair_tangents, scale_terms
from .dynamics.coefficients import classify_delta
from .dynamics.exact import select_parameters
from .dynamics.inrun import InRunGeometry, InRunPairs
from .dynamics.measure import check_options, measure, pair_dynamics_of
from .compatibility import check_compatible
from .conventions import check_convention, encode_probes
from .dynamics.optimizers import STEP_PARTS
from .dynamics.scoring import (EncodedProbe, model_max_length, score_rows, sequence_logp, top_tokens,
                               vocabulary_text)
from .dynamics.summary import inrun_summary, record_summary, update_summary
from .dynamics.update import directional_logp, trapezoid
from .errors import MarginscopeError
from .integrations.distributed import (agree_failures, broadcast_from_main, gather_to_main, my_chunks, unwrap_model,
                                       world)
from .integrations.fsdp import check_supported, full_values, gathered, is_sharded, sharded_scope, unsharded
from .loading import config_hash
from .probes import ProbeSet
from .probes import load as load_probes
from .step_capture import CapturedStep, StepCapture
from .trace.schema import Record, TraceWriter

log = logging.getLogger("marginscope")

MEASUREMENTS = ("geometry", "per_token", "top_k", "update", "in_run", "attribution", "trace")
# attribution=None turns the per-pair attribution on when its per-pair gradients take at most this much
ATTRIBUTION_AUTO_BYTES = 1 << 30


@dataclass
class _InRunRows:
    """One micro-batch's in-run pairs, pending until written: the step they belong to (None until the
    next `step()`), the geometry, the policy's log-probs [P] and the pairs' ids (`EncodedProbe`s, when
    the caller gave them); after attribution, effect [P, N, R] (before the scale κ) and the terms κ is
    fitted from (‖c⊙g_t‖², this micro-batch's ⟨c⊙g_t, Σ_j c⊙g_j⟩)."""

    step: int | None
    pairs: InRunPairs
    logp_w: np.ndarray
    logp_l: np.ndarray
    examples: Sequence[EncodedProbe] | None = None
    attributed: bool = False
    effect: np.ndarray | None = None
    scale_terms: tuple[float, float] | None = None


class _Guard:
    """The first exception of a measurement is logged (with its traceback) and disables it."""

    def __init__(self) -> None:
        self.disabled: dict[str, str] = {}

    def agree(self) -> set[str]:
        """Disable what another rank has disabled (collective); returns the names newly disabled here."""
        missing = agree_failures(self.disabled)
        for name, reason in missing.items():
            self.disabled[name] = reason
            log.error("marginscope: %s measurement failed on %s; disabled on every rank", name, reason)
        return set(missing)

    def active(self, name: str) -> bool:
        return name not in self.disabled

    def run(self, name: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        if name in self.disabled:
            return False, None
        try:
            return True, fn()
        except Exception as err:  # noqa: BLE001 — the policy: never let a measurement stop training
            self.fail(name, err)
            return False, None

    def fail(self, name: str, err: BaseException) -> None:
        """Disable `name` after `err` (logged with its traceback the first time only)."""
        if name in self.disabled:
            return
        self.disabled[name] = f"{type(err).__name__}: {err}"
        log.error("marginscope: %s measurement failed and is disabled for the rest of the run: %s",
                  name, self.disabled[name], exc_info=err)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Measure `model` as saved, not as the trainer runs it: autocast off, and the forward that
    accelerate wrapped in autocast for mixed precision (its `_original_forward`) used directly. On exit
    the RNG streams (CPU and CUDA), train/eval mode, grad mode and the wrapped forward are restored."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    training, grad = model.training, torch.is_grad_enabled()
    wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    try:
        if wrapped is not None:
            model.forward = model._original_forward
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda") if cuda is not None else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        if wrapped is not None:
            model.forward = wrapped
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        model.train(training)
        torch.set_grad_enabled(grad)


def _sequence(token_values: np.ndarray) -> np.ndarray:
    """Sum over the last (position) axis; NaN where every position is NaN (an unmeasured response)."""
    out = np.nansum(token_values, axis=-1)
    out[np.isnan(token_values).all(axis=-1)] = np.nan
    return out


class Tracker:
    """Record `probes` on `model` at step `start_step` (on construction) and every `every` steps.

    loss: a `PairLoss` or a registered loss name (d_w/d_l, Cases, predictions). per_token: None,
    "head", "tail" or "exact" for the per-token Gram of `per_token_probes` (ids; default all probes).
    top_k: next tokens kept per position. Reference log-probs: `ref_logp` [N, R], else those of
    `ref_model` (inside `ref_context()` when given, e.g. a PEFT model's `disable_adapter`; `ref_model`
    then defaults to the model itself), else the model's own at the first record (the usual DPO
    set-up: reference = initial policy). A reference in another dtype than the policy (bf16 policy, fp32
    reference) makes the step-0 reward non-zero: its size is logged as a warning and recorded as the
    trace attribute `reference_noise_floor` (nats).
    convention / max_length / truncation_mode / add_eos: how probes become token ids
    (`marginscope.conventions`; default "trl", TRL 1.x's DPOTrainer), recorded in the trace; `encoded`
    (one `EncodedProbe` per probe) overrides them with ids prepared elsewhere (TRLCallback does).

    What actually happened (DESIGN.md §2b; the "update" measurement): at every record after the first,
    `actual_delta` = ½⟨a(θ_prev) + a(θ_now), θ_now − θ_prev⟩ per response and per token, θ_prev the
    parameters in scope at the previous record (one copy kept, on `snapshot_device`: None = beside the
    parameters, "cpu" to offload). With `optimizer` (a torch optimizer, or accelerate's wrapper), the
    step before each record is captured by a step pre-hook: `step_delta` = ⟨a(θ_t), θ_t − θ_{t−1}⟩ and,
    for torch Adam/AdamW/SGD, its split into "gradient", "momentum" and "weight_decay" parts by the
    optimizer's formula, plus the "residual" the formula leaves (float rounding); other optimizers get
    step_delta only and the metadata says why.
    Who pushed it (the "attribution" measurement; needs `optimizer`, torch Adam/AdamW/SGD, and in-run
    pairs: `in_run`, `marginscope train`, `InRunDPOTrainer`): on the step before each record every
    training pair's gradient is materialized during the backward and its share of the "gradient"
    part's effect on every probe is written with the in-run rows (`inrun()["probe_effect"]`,
    `ms.dynamics.attribution`). attribution: True, False, or None (default) = on while the step's
    per-pair gradients take at most ATTRIBUTION_AUTO_BYTES (1 GiB: LoRA scopes, small models); kept
    on `snapshot_device`.
    start_step > 0 with an existing trace resumes it: records past start_step are dropped, the run
    appends to the same file, and start_step itself is recorded only when it is on the `every`
    schedule (so a resumed trace equals an uninterrupted one); start_step = 0 refuses an existing file
    unless `overwrite`.
    """

    def __init__(self, model: nn.Module, tokenizer, probes: ProbeSet | str | os.PathLike, path: str | os.PathLike,
                 loss, every: int = 10, *, params="trainable", engine: str = "auto",
                 per_token: str | None = None, per_token_probes: Sequence[str] | None = None, top_k: int = 5,
                 ref_model: nn.Module | None = None, ref_logp: np.ndarray | None = None, batch_size: int = 8,
                 padding_side: str = "right", convention: str = "trl", max_length: int | None = None,
                 truncation_mode: str = "keep_start", add_eos: bool = False,
                 encoded: Sequence[EncodedProbe] | None = None,
                 ref_context: Callable[[], contextlib.AbstractContextManager] | None = None, start_step: int = 0,
                 overwrite: bool = False, metadata: dict[str, Any] | None = None, optimizer=None,
                 snapshot_device: str | torch.device | None = None, attribution: bool | None = None) -> None:
        if every < 1:
            raise MarginscopeError(f"every must be ≥ 1; got {every}")
        if top_k < 1:
            raise MarginscopeError(f"top_k must be ≥ 1; got {top_k}")
        check_options(engine=engine, per_token=per_token, batch_size=batch_size, padding_side=padding_side)
        check_convention(convention, max_length=max_length, truncation_mode=truncation_mode, add_eos=add_eos)
        self.model = unwrap_model(model)
        check_supported(self.model)
        self.tokenizer, self.every, self.top_k = tokenizer, every, top_k
        self.loss = loss_zoo.get(loss) if isinstance(loss, str) else loss
        self.probes = probes if isinstance(probes, ProbeSet) else load_probes(probes)
        self.names = list(self.probes.response_names)
        self.path = Path(path)
        self.options = dict(params=params, engine=engine, batch_size=batch_size, padding_side=padding_side)
        self.convention = dict(convention=convention, max_length=max_length, truncation_mode=truncation_mode,
                               add_eos=add_eos)
        self.per_token = per_token
        self.scope = sharded_scope(self.model, select_parameters(self.model, params))
        if encoded is None:
            self.encoded = encode_probes(tokenizer, self.probes, **self.convention,
                                         context_length=model_max_length(self.model))
        elif [e.probe_id for e in encoded] != self.probes.ids:
            raise MarginscopeError("encoded: one EncodedProbe per probe, in the probe set's order")
        else:
            self.encoded = list(encoded)
        check_compatible(self.model, tokenizer, None if ref_model is None else unwrap_model(ref_model),
                         encoded=self.encoded)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.lengths = np.array([[len(ids) for ids in e.response_ids] for e in self.encoded], dtype=np.int64)
        self.token_gram_probes = self._token_gram_indices(per_token, per_token_probes)
        self.rank, self.world_size = world()
        self.guard = _Guard()
        self.summary: dict[str, float] = {}
        self._inrun: list[_InRunRows] = []
        self._attribution = attribution
        self._attribution_skip_logged = False
        self._inrun_written_step: int | None = None
        self._writer: TraceWriter | None = None
        self._last_logp: np.ndarray | None = None
        self._last_step: int | None = None
        self._warned_nonfinite = False
        self._closed = False
        self._snapshot_device = snapshot_device
        self._snapshot: dict[str, Tensor] | None = None  # θ in scope at the previous record
        self._last_case: np.ndarray | None = None
        self._capture = self._step_capture(optimizer)
        self._ref_logp = None if ref_logp is None else np.asarray(ref_logp, dtype=np.float64)
        if self._ref_logp is not None and self._ref_logp.shape != self.lengths.shape:
            raise MarginscopeError(f"ref_logp has shape {self._ref_logp.shape}; expected {self.lengths.shape}")
        self._extra_metadata = dict(metadata or {})
        self._ref_dtype: torch.dtype | None = None
        self._noise_floor: float | None = None
        self._start(start_step, overwrite, ref_model, ref_context)

    # --- public -------------------------------------------------------------------------------------

    def step(self, step: int) -> bool:
        """Call after each optimizer step (step = 1, 2, ...) on every rank; records when
        step % every == 0. In-run rows gathered since the previous call get this step and are written
        now. Returns whether a record was made."""
        self._inrun = [replace(e, step=step) if e.step is None else e for e in self._inrun]
        if self._closed:
            return False
        self.guard.agree()
        if not self.inrun_active:  # it failed during this step (on some rank): its rows exist on some ranks only
            self._inrun = [e for e in self._inrun if e.step != step]
        recorded = not (step % self.every or step == self._last_step)
        if recorded:
            captured = self._capture.take(step) if self._capture is not None else None
            self._record(step, captured)
            self._attribute(step, captured)
        self._flush_inrun()
        self._arm_capture(step + 1)
        return recorded

    @property
    def inrun_active(self) -> bool:
        """Whether in-run rows are still taken: the in-run measurement has not failed (on any rank, as of
        the last `step()`) and the tracker is open."""
        return self.guard.active("in_run") and not self._closed

    @property
    def snapshot_device(self) -> str | torch.device | None:
        """Where parameter copies (and the pairs' gradients) are kept; None: beside the parameters."""
        return self._snapshot_device

    def in_run(self, *, n_pairs: int | None = None, pairs: Sequence[tuple[int, int]] | None = None,
               examples: Sequence[EncodedProbe] | None = None) -> InRunStep:
        """Context for one training forward+backward: exact per-pair geometry of its batch (see
        `ms.dynamics.InRunGeometry`) and, on the step before a record, each pair's gradient for the
        attribution; the result is kept for the next `step()`. examples: the batch's pairs (an
        `EncodedProbe` each, chosen = response 0, rejected = response 1; e.g. what `score_pairs` got),
        so the trace can name them (of another length than the pairs: ignored, with a warning)."""
        count = n_pairs if n_pairs is not None else len(pairs or ())
        if examples is not None and len(examples) != count:
            log.warning("marginscope: in_run got %d examples for %d pairs; the pairs are recorded without their "
                        "ids and texts", len(examples), count)
            examples = None
        return InRunStep(self, n_pairs=n_pairs, pairs=pairs, examples=examples)

    def wants_pair_gradients(self, n_pairs: int) -> bool:
        """Whether the coming backward (of `n_pairs` pairs) should materialize each pair's gradient: the
        optimizer step it feeds precedes a record, its split is available and the attribution is on
        (with attribution=None: the gradients fit ATTRIBUTION_AUTO_BYTES)."""
        if (self._attribution is False or self._capture is None or self._capture.unavailable is not None
                or self._capture.armed is None or self._closed or not self.guard.active("attribution")):
            return False
        if is_sharded(self.model):  # per-pair gradients of sharded parameters: not built
            if not self._attribution_skip_logged:
                log.warning("marginscope: per-pair attribution is not available on FSDP-sharded models; the other "
                            "measurements run")
                self._attribution_skip_logged = True
            return False
        if self._attribution is None:
            size = sum(p.numel() * (8 if p.dtype == torch.float64 else 4) for p in self.scope.params)
            pending = sum(len(e.pairs.inner) for e in self._inrun if e.pairs.gradients is not None)
            if size * (n_pairs + pending) > ATTRIBUTION_AUTO_BYTES:
                if not self._attribution_skip_logged:
                    log.warning("marginscope: per-pair attribution skipped: the step's pair gradients would take "
                                "%.2f GiB (more than %.0f GiB); pass attribution=True (snapshot_device='cpu' to "
                                "keep them in host memory) to record it", size * (n_pairs + pending) / 2**30,
                                ATTRIBUTION_AUTO_BYTES / 2**30)
                    self._attribution_skip_logged = True
                return False
        return True

    def on_inrun_pairs(self, step: int | None, pairs: InRunPairs, logp_w: np.ndarray, logp_l: np.ndarray, *,
                       examples: Sequence[EncodedProbe] | None = None) -> None:
        """Sink for in-run geometry computed elsewhere (the TRL mixin); step None = the next `step()`;
        examples as in `in_run`. Ignored once the in-run measurement is off (`inrun_active`)."""
        if not self.inrun_active:
            return
        self._inrun.append(_InRunRows(step, pairs, np.asarray(logp_w, dtype=np.float64),
                                      np.asarray(logp_l, dtype=np.float64), examples))

    def close(self) -> None:
        """Write pending in-run rows and close the trace (every rank; idempotent)."""
        if self._closed:
            return
        self._flush_inrun()
        self._closed = True
        self._snapshot = None
        if self._capture is not None:
            self._capture.close()
        if self._writer is not None:
            self.guard.run("trace", self._writer.close)
            self._writer = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- start and resume ----------------------------------------------------------------------------

    def _token_gram_indices(self, per_token: str | None, ids: Sequence[str] | None) -> list[int]:
        if per_token is None:
            if ids is not None:
                raise MarginscopeError("per_token_probes given but per_token is None; choose a tier")
            return []
        if ids is None:
            return list(range(len(self.probes)))
        known = self.probes.ids
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise MarginscopeError(f"per_token_probes: no probe with id {unknown[0]!r}")
        return sorted(known.index(i) for i in dict.fromkeys(ids))

    def _start(self, start_step: int, overwrite: bool, ref_model: nn.Module | None,
               ref_context: Callable[[], contextlib.AbstractContextManager] | None) -> None:
        record_now = True
        if self.rank == 0:
            if self.path.exists() and start_step > 0:
                self._writer = TraceWriter.resume(self.path, probes=self.probes, names=self.names,
                                                  step=start_step, top_k=self.top_k)
                self._ref_logp = self._writer.ref_logp
                self._last_logp = self._writer.last_logp()
                steps = self._writer.steps
                # the records of the uninterrupted run: at start_step only when it is on the schedule
                record_now = not len(steps) or (start_step % self.every == 0 and int(steps[-1]) != start_step)
            elif self.path.exists() and not overwrite:
                raise MarginscopeError(f"{self.path}: exists; pass overwrite=True, another path, or a "
                                       "start_step > 0 to resume it")
            elif not self.path.parent.is_dir():
                raise MarginscopeError(f"{self.path}: folder {self.path.parent} does not exist")
        if broadcast_from_main(self._ref_logp is None) and (ref_model is not None or ref_context is not None):
            ref = self.model if ref_model is None else unwrap_model(ref_model)
            self._ref_dtype = next(ref.parameters()).dtype
            with gathered(ref), preserved_state(ref), \
                    (ref_context() if ref_context is not None else contextlib.nullcontext()):
                if self.rank == 0:  # the others only take part in unsharding a sharded reference
                    self._ref_logp = sequence_logp(
                        ref, self.encoded, batch_size=self.options["batch_size"],
                        padding_side=self.options["padding_side"], pad_id=self.pad_id).numpy()
        if broadcast_from_main(record_now):
            self._record(start_step)
        else:
            self._last_step = start_step
        self._arm_capture(start_step + 1)

    def _step_capture(self, optimizer) -> StepCapture | None:
        if optimizer is None:
            return None
        try:
            return StepCapture(optimizer, self.scope, device=self._snapshot_device,
                               on_error=lambda err: self.guard.fail("update", err))
        except TypeError as err:
            raise MarginscopeError(str(err)) from None

    def _arm_capture(self, step: int) -> None:
        """Arm the step capture when the optimizer step producing `step` precedes a record."""
        if self._capture is None or self._closed or step % self.every or not self.guard.active("update"):
            return
        # every = 1: θ_{t−1} is the previous record's snapshot, already held
        self._capture.arm(step, copy_before=not (self._snapshot is not None and self._last_step == step - 1),
                          coefficient=self._attribution is not False and self.guard.active("attribution"))

    def _step_split(self) -> str:
        if self._capture is None:
            return "unavailable: no optimizer given to the tracker"
        if self._capture.unavailable:
            return f"unavailable: {self._capture.unavailable}"
        return f"{type(self._capture.optimizer).__module__}.{type(self._capture.optimizer).__name__}"

    def _metadata(self, start_step: int) -> dict[str, Any]:
        cfg = getattr(self.model, "config", None)
        return {
            "kind": "tracker", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "start_step": start_step, "every": self.every,
            "model": getattr(cfg, "_name_or_path", "") or type(self.model).__name__,
            "model_config_hash": config_hash(self.model) if cfg is not None else "",
            "model_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "reference": "given" if self._ref_logp is not None else "initial policy (first record)",
            "loss": self.loss.name, "loss_hparams": self.loss.hparams, "engine": self.options["engine"],
            "per_token": self.per_token, "per_token_probes": [self.probes.ids[i] for i in self.token_gram_probes],
            "top_k": self.top_k, "padding_side": self.options["padding_side"], **self.convention,
            "world_size": self.world_size, "step_split": self._step_split(), "step_parts": list(STEP_PARTS),
            "snapshot_device": str(self._snapshot_device or "parameters"), "versions": versions(),
            "attribution": {None: "auto", True: "on", False: "off"}[self._attribution],
            **self._extra_metadata,
        }

    # --- one record ------------------------------------------------------------------------------------

    def _record(self, step: int, captured: CapturedStep | None = None) -> None:
        # a sharded model is measured unsharded: every rank enters, and no collective runs inside
        # but the vectors' reassembly (`full_values`), which every rank does as the ranks agree
        with preserved_state(self.model), gathered(self.model):
            mine = [i for chunk in my_chunks(len(self.encoded), self.options["batch_size"], self.rank,
                                              self.world_size) for i in chunk]
            part = self._measure_part(mine) if mine else {}
            if self.guard.active("update") and (self._snapshot is not None or captured is not None):
                ok, whole = self.guard.run("update", lambda: self._full_views(captured))
                if ok and mine:
                    ok, views = self.guard.run("update", lambda: self._update_part(mine, *whole))
                    part.update(views if ok else {})
            self._take_snapshot()
        self._drop_failed(part, self.guard.agree())
        self._last_step = step
        parts = gather_to_main(part)
        if parts is None or self._closed:
            return
        self.guard.run("trace", lambda: self._write_record(step, parts))

    def _measure_part(self, indices: list[int]) -> dict[str, Any]:
        """This rank's share: {"index", "logp", "token_logp", "gram", "engine", "n_params",
        "topk_ids", "topk_prob", "token_gram"} for the probes `indices`, NaN where a measurement is off."""
        subset = ProbeSet([self.probes[i] for i in indices])
        encoded = [self.encoded[i] for i in indices]
        n, r, t = len(indices), len(self.names), int(self.lengths.max())
        part: dict[str, Any] = {"index": indices, "gram": np.full((n, r, r), np.nan),
                                "token_logp": np.full((n, r, t), np.nan), "token_gram": {}}
        ok, geo = self.guard.run("geometry", lambda: measure(self.model, self.tokenizer, subset, encoded=encoded,
                                                             **self.options))
        if ok:
            part["gram"] = geo.gram
            part["token_logp"][:, :, :geo.token_logp.shape[-1]] = geo.token_logp
            part["engine"], part["n_params"], part["scope"] = geo.engine, geo.n_params, geo.scope_spec
        else:
            self._score_only(encoded, part["token_logp"])
        wanted = [k for k, i in enumerate(indices) if i in self.token_gram_probes]
        if wanted:
            ok, tok = self.guard.run("per_token", lambda: measure(
                self.model, self.tokenizer, ProbeSet([subset[k] for k in wanted]), per_token=self.per_token,
                encoded=[encoded[k] for k in wanted], **self.options))
            if ok:
                part["token_gram"] = {indices[k]: (tok.token_gram[pid], *tok.token_sqnorm[pid])
                                      for k, pid in zip(wanted, tok.probe_ids)}
        part["topk_ids"] = np.full((n, r, t, self.top_k), -1, dtype=np.int32)
        part["topk_prob"] = np.full((n, r, t, self.top_k), np.nan, dtype=np.float32)
        ok, top = self.guard.run("top_k", lambda: top_tokens(
            self.model, encoded, self.top_k, batch_size=self.options["batch_size"],
            padding_side=self.options["padding_side"], pad_id=self.pad_id))
        if ok:
            part["topk_ids"][:, :, :top[0].shape[2]] = top[0]
            part["topk_prob"][:, :, :top[1].shape[2]] = top[1]
        return part

    def _take_snapshot(self) -> None:
        """Keep θ in scope for the next record's actual-update view (one copy of the scope)."""
        if not self.guard.active("update"):
            self._snapshot = None
            return
        ok, snap = self.guard.run("update", lambda: {
            n: p.detach().to(device=self._snapshot_device or p.device, copy=True)
            for n, p in zip(self.scope.names, self.scope.params)})
        self._snapshot = snap if ok else None

    def _full_views(self, captured: CapturedStep | None
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, CapturedStep | None]:
        """(now, before, captured): the scope's parameters as the model computes with them, the previous
        record's θ and the captured step as whole tensors like them: reassembled from shards on a
        sharded model (collective: every rank calls it), else as kept."""
        now = unsharded(self.model, list(self.scope.names))
        before = full_values(self._snapshot, now)
        if captured is not None:
            parts = None if captured.parts is None else {k: full_values(v, now) for k, v in captured.parts.items()}
            captured = CapturedStep(captured.step, full_values(captured.before, now), parts,
                                    full_values(captured.coefficient, now))
        return now, before, captured

    def _drop_failed(self, part: dict[str, Any], failed: set[str]) -> None:
        """Drop this record's values of the measurements another rank has just disabled (see `_Guard.agree`)."""
        if not part:
            return
        if "geometry" in failed:
            part["gram"] = np.full_like(part["gram"], np.nan)
        if "per_token" in failed:
            part["token_gram"] = {}
        if "top_k" in failed:
            part["topk_ids"][:] = -1
            part["topk_prob"][:] = np.nan
        if "update" in failed:
            self._snapshot = None
            for key in ("actual_token", "step", "step_parts"):
                part.pop(key, None)

    def _update_part(self, indices: list[int], now: dict[str, Tensor], before: dict[str, Tensor] | None,
                     captured: CapturedStep | None) -> dict[str, np.ndarray]:
        """This rank's share of the actual-update views: "actual_token" [n, R, T] (trapezoid over the
        interval since the previous record), "step" [n, R] and "step_parts" [n, R, P] (the step before
        this record), each present only when measurable. now: the scope's parameters as the model
        computes with them; before: θ at the previous record (None: not kept). Vectors that are zero (no
        momentum yet, no weight decay) are not differentiated along: their effect is 0."""
        encoded = [self.encoded[i] for i in indices]
        opts = dict(batch_size=self.options["batch_size"], padding_side=self.options["padding_side"],
                    pad_id=self.pad_id)
        vectors: dict[str, dict[str, Tensor]] = {}
        if before is not None:
            vectors["interval"] = {n: now[n] - before[n] for n in now}
        if captured is not None and captured.before is not None:
            vectors["step"] = {n: now[n] - v for n, v in captured.before.items()}
        elif captured is not None and before is not None:
            vectors["step"] = vectors["interval"]  # every = 1: the interval is the step
        else:
            captured = None  # the step's start was not kept: nothing to measure it against
        if captured is not None and captured.parts is not None:
            vectors.update({name: captured.parts[name] for name in STEP_PARTS
                            if any(bool(t.any()) for t in captured.parts[name].values())})
        distinct = list({id(v): v for v in vectors.values()}.values())
        if not distinct:
            return {}
        _, derivative = directional_logp(self.model, encoded, distinct, **opts)
        at_now = {label: derivative[[id(d) for d in distinct].index(id(v))] for label, v in vectors.items()}
        out: dict[str, np.ndarray] = {}
        if before is not None:
            _, at_prev = directional_logp(self.model, encoded, [vectors["interval"]], at=before, **opts)
            out["actual_token"] = trapezoid(at_prev[0], at_now["interval"])
        if captured is not None:
            out["step"] = _sequence(at_now["step"])
            if captured.parts is not None:
                parts = np.stack([_sequence(at_now[name]) if name in at_now else np.zeros_like(out["step"])
                                  for name in STEP_PARTS], axis=-1)
                out["step_parts"] = np.concatenate([parts, (out["step"] - parts.sum(-1))[..., None]], axis=-1)
        return out

    def _score_only(self, encoded: list[EncodedProbe], token_logp: np.ndarray) -> None:
        """Per-token log-probs without gradients, when the geometry measurement is off."""
        self.model.eval()
        with torch.no_grad():
            for k, probe in enumerate(encoded):
                scored = score_rows(self.model, probe.rows(), padding_side=self.options["padding_side"],
                                    pad_id=self.pad_id)
                values = scored.token_logp.to(torch.float64).cpu().numpy()
                for j, ids in enumerate(probe.response_ids):
                    token_logp[k, j, :len(ids)] = values[j, :len(ids)]

    def _write_record(self, step: int, parts: list[dict[str, Any]]) -> None:
        n, r, t = len(self.encoded), len(self.names), int(self.lengths.max())
        gram, token_logp = np.full((n, r, r), np.nan), np.full((n, r, t), np.nan)
        topk_ids = np.full((n, r, t, self.top_k), -1, dtype=np.int32)
        topk_prob = np.full((n, r, t, self.top_k), np.nan, dtype=np.float32)
        actual_token = np.full((n, r, t), np.nan)
        step_delta, step_parts = np.full((n, r), np.nan), np.full((n, r, len(STEP_PARTS) + 1), np.nan)
        token_gram: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        info: dict[str, Any] = {}
        for part in parts:
            if not part:
                continue
            idx = part["index"]
            gram[idx], token_logp[idx] = part["gram"], part["token_logp"]
            topk_ids[idx], topk_prob[idx] = part["topk_ids"], part["topk_prob"]
            if "actual_token" in part:
                actual_token[idx, :, :part["actual_token"].shape[-1]] = part["actual_token"]
            if "step" in part:
                step_delta[idx] = part["step"]
            if "step_parts" in part:
                step_parts[idx] = part["step_parts"]
            token_gram.update(part["token_gram"])
            for key in ("engine", "n_params", "scope"):
                info.setdefault(key, part.get(key))
        logp = np.nansum(token_logp, axis=-1)
        logp[np.isnan(token_logp[:, :, 0])] = np.nan
        if self._ref_logp is None:
            self._ref_logp = logp.copy()
        elif self._writer is None and self._ref_dtype is not None:
            self._check_noise_floor(step, logp)
        dyn = pair_dynamics_of(logp, gram, self.lengths, self.names, self.loss, self._ref_logp)
        observed = np.full_like(logp, np.nan) if self._last_logp is None else logp - self._last_logp
        actual = _sequence(actual_token)
        w, l = self.names.index("chosen"), self.names.index("rejected")
        record = Record(step=step, logp=logp, token_logp=token_logp, gram=gram, d_w=dyn.d_w, d_l=dyn.d_l,
                        case=dyn.case, predicted_delta=dyn.predicted_delta, observed_delta=observed,
                        topk_ids=topk_ids, topk_prob=topk_prob, token_gram=token_gram, actual_delta=actual,
                        actual_token_delta=actual_token, step_delta=step_delta, step_parts=step_parts,
                        case_observed=classify_delta(observed, w, l), case_actual=classify_delta(actual, w, l))
        if self._writer is None:
            metadata = {**self._metadata(step), "engine_resolved": info.get("engine"),
                        "n_params": info.get("n_params"), "scope": info.get("scope"),
                        "reference_noise_floor": self._noise_floor}
            shapes = {i: (int(self.lengths[i, self.names.index("chosen")]),
                          int(self.lengths[i, self.names.index("rejected")])) for i in self.token_gram_probes}
            self._writer = TraceWriter.create(self.path, probes=self.probes, encoded=self.encoded, names=self.names,
                                              metadata=metadata, ref_logp=self._ref_logp, top_k=self.top_k,
                                              token_gram_shapes=shapes, overwrite=True,
                                              vocab_text=vocabulary_text(self.tokenizer))
        self._writer.append(record)
        self._last_logp = logp
        summary = record_summary(self.names, record.logp, record.gram, record.case)
        summary.update(update_summary(self.names, observed, actual, self._last_case, record.case_observed,
                                      record.case_actual))
        self._last_case = record.case
        self.summary = {f"marginscope/{k}": v for k, v in summary.items()}
        if not np.isfinite(record.logp).all() or not np.isfinite(record.gram).all():
            if not self._warned_nonfinite:
                log.warning("marginscope: step %d has non-finite log-probs or Gram entries (recorded and "
                            "flagged in records/nonfinite)", step)
                self._warned_nonfinite = True

    def _check_noise_floor(self, step: int, logp: np.ndarray) -> None:
        """A reference in another dtype than the policy: the first record's reward |log π − log π_ref| is
        (at the start of a run) rounding noise, not learning; warn once and keep its max."""
        policy = next(self.model.parameters()).dtype
        if self._ref_dtype == policy:
            return
        self._noise_floor = float(np.nanmax(np.abs(logp - self._ref_logp)))
        log.warning("marginscope: the policy is %s and the reference %s; at step %d the probes' reward "
                    "|log π − log π_ref| is up to %.3g nats without any training (recorded as "
                    "reference_noise_floor): smaller reward changes are rounding noise",
                    str(policy).removeprefix("torch."), str(self._ref_dtype).removeprefix("torch."), step,
                    self._noise_floor)

    # --- in-run rows -------------------------------------------------------------------------------------

    def _attribute(self, step: int, captured: CapturedStep | None) -> None:
        """Each pending pair of `step` with a gradient: its share of the gradient part's first-order effect
        on every probe response, ⟨a_i(θ_t), c_t ⊙ g_j⟩ (before κ, applied once every process's terms are
        gathered: `_write_inrun`). The gradients are dropped here in any case. A step some of whose pairs
        were seen without their gradient (attribution=None's budget refused a later micro-batch, or the
        in-run measurement failed during the step) is attributed nowhere: κ fitted to part of the pairs
        would inflate their shares by the missing ones'."""
        intended = captured is not None and captured.coefficient is not None
        of_step = [e for e in self._inrun if e.step == step]
        rows = [e for e in of_step if e.pairs.gradients is not None]
        incomplete = len(rows) < len(of_step) or (bool(rows) and not self.guard.active("in_run"))
        if incomplete and intended:
            if rows:
                log.warning("marginscope: step %d: some training pairs were seen without their gradient (a later "
                            "micro-batch over the attribution budget, or the in-run measurement failed); no "
                            "per-pair attribution is recorded for this step", step)
            for e in of_step:  # no κ for this step on any process: its effects are not written
                e.pairs, e.attributed, e.effect, e.scale_terms = e.pairs.without_gradients(), True, None, None
            return
        if not rows:
            return
        usable = (captured is not None and captured.coefficient is not None and captured.parts is not None
                  and self.guard.active("attribution") and not incomplete)
        if usable:
            ok, _ = self.guard.run("attribution", lambda: self._pair_effects(rows, captured))
            if not ok:
                for e in rows:
                    e.effect = e.scale_terms = None
        for e in rows:
            e.pairs, e.attributed = e.pairs.without_gradients(), True

    def _pair_effects(self, rows: list[_InRunRows], captured: CapturedStep) -> None:
        now = {n: p.detach() for n, p in zip(self.scope.names, self.scope.params)}
        opts = dict(batch_size=self.options["batch_size"], padding_side=self.options["padding_side"],
                    pad_id=self.pad_id)
        gradient_part = captured.parts["gradient"]
        with preserved_state(self.model):
            for e in rows:
                effects = []
                n_pairs = len(e.pairs.inner)
                for start in range(0, n_pairs, _TANGENTS_PER_PASS):
                    tangents = pair_tangents(e.pairs.gradients, captured.coefficient,
                                             range(start, min(n_pairs, start + _TANGENTS_PER_PASS)), like=now)
                    _, derivative = directional_logp(self.model, self.encoded, tangents, **opts)
                    effects.append(_sequence(derivative))
                e.effect = np.concatenate(effects)
                gp2, dot, _ = scale_terms(gradient_part, e.pairs.gradients, captured.coefficient)
                e.scale_terms = (gp2, dot)
        if self.world_size == 1 and not self._explains_the_step(rows, gradient_part, captured.coefficient):
            for e in rows:  # no κ: the step's effects are not written
                e.effect = e.scale_terms = None

    def _explains_the_step(self, rows: list[_InRunRows], gradient_part, coefficient) -> bool:
        """One process: whether the pairs' gradients add up to the gradient the optimizer stepped with, up
        to one scalar (κ); warns when they do not (a loss term or parameter use outside the watched pairs,
        or a low-precision run: in bf16 the hooks' and the optimizer's gradients differ by far more than
        rounding at Adam's first steps)."""
        total = {n: sum(e.pairs.gradients[n].to(torch.float64).sum(0, keepdim=True) for e in rows)
                 for n in rows[0].pairs.gradients}
        gp2, dot, u2 = scale_terms(gradient_part, total, coefficient)
        if gp2 == 0 or dot == 0:
            return True
        kappa = gp2 / dot
        residual = max(0.0, gp2 - 2 * kappa * dot + kappa * kappa * u2) ** 0.5 / gp2 ** 0.5
        if residual > _DECOMPOSITION_TOLERANCE:
            log.warning("marginscope: step %d: the training pairs' gradients explain the step's gradient only up to "
                        "a relative residual of %.2g (a loss term or parameter use outside the watched pairs, or a "
                        "low-precision run); no per-pair attribution is recorded for this step", rows[0].step,
                        residual)
            return False
        return True

    def _flush_inrun(self) -> None:
        """Gather pending in-run rows (those already given a step) to rank 0 and append them."""
        ready = [e for e in self._inrun if e.step is not None]
        self._inrun = [e for e in self._inrun if e.step is None]
        for e in ready:  # never gathered: a step not followed by a record keeps no gradient
            if e.pairs.gradients is not None:
                e.pairs = e.pairs.without_gradients()
        gathered = gather_to_main(ready)
        if gathered is None or self._writer is None:
            return
        self.guard.run("trace", lambda: self._write_inrun(gathered))

    def _pair_texts(self, examples: Sequence[EncodedProbe] | None, n: int, with_text: bool) -> dict[str, list[str]]:
        if examples is None or len(examples) != n:
            return {}
        texts = {"pair_id": [e.probe_id for e in examples]}
        if with_text:
            decode = lambda ids: self.tokenizer.decode(list(ids))  # noqa: E731
            texts.update(prompt=[decode(e.prompt_ids) for e in examples],
                         chosen=[decode(e.response_ids[0]) for e in examples],
                         rejected=[decode(e.response_ids[1]) for e in examples])
        return texts

    def _write_inrun(self, gathered: list[list[_InRunRows]]) -> None:
        kappa = _effect_scales(gathered)
        counts: dict[int, int] = {}
        for rank, rows in enumerate(gathered):
            counts.clear()
            for e in rows:
                start, pairs, n = counts.get(e.step, 0), e.pairs, len(e.pairs.inner)
                measured = e.effect is not None and e.step in kappa
                self._writer.append_inrun(
                    e.step, rank=rank, pair_start=start, inner=pairs.inner, sq_w=pairs.sq_w, sq_l=pairs.sq_l,
                    scale_w=pairs.scale_w, scale_l=pairs.scale_l, case=pairs.case, logp_w=e.logp_w,
                    logp_l=e.logp_l, probe_effect=e.effect * kappa[e.step] if measured else None,
                    effect_scale=np.full(n, kappa[e.step]) if measured else None,
                    texts=self._pair_texts(e.examples, n, measured))
                counts[e.step] = start + n
        rows = [e.pairs for per_rank in gathered for e in per_rank]
        if rows:
            summary = inrun_summary(np.concatenate([p.cosine for p in rows]), np.concatenate([p.case for p in rows]))
            self.summary.update({f"marginscope/{k}": v for k, v in summary.items()})


_TANGENTS_PER_PASS = 4  # pairs differentiated along in one vmapped forward-mode pass
# relative residual above which the pairs are said not to explain the step's gradient: a missing loss term
# or parameter use is O(1); float32 rounding at Adam's early steps, where c_t ⊙ g amplifies the coordinates
# whose gradient is at rounding level to ±lr, reaches ~1e-3
_DECOMPOSITION_TOLERANCE = 1e-2


def _effect_scales(gathered: list[list[_InRunRows]]) -> dict[int, float]:
    """κ per attributed step, κ = ‖c⊙g_t‖² / Σ_j ⟨c⊙g_t, c⊙g_j⟩ over every process's pairs; a step where
    some process's pairs lack their terms gets none (its effects are not written)."""
    terms: dict[int, list] = {}
    for rows in gathered:
        for e in rows:
            if e.attributed:
                terms.setdefault(e.step, []).append(e.scale_terms)
    out = {}
    for step, values in terms.items():
        if any(v is None for v in values):
            continue
        dot = sum(v[1] for v in values)
        out[step] = values[0][0] / dot if dot != 0 else np.nan
    return out


class InRunStep:
    """`Tracker.in_run(...)`: an `InRunGeometry` whose failures are logged once and disable the in-run
    measurement instead of reaching the training step. Exceptions of the training code itself pass."""

    def __init__(self, tracker: Tracker, *, n_pairs: int | None, pairs: Sequence[tuple[int, int]] | None,
                 examples: Sequence[EncodedProbe] | None = None) -> None:
        self.tracker = tracker
        self.examples = examples
        self._geo: InRunGeometry | None = None
        self._logps: Tensor | None = None
        if tracker.guard.active("in_run"):
            count = n_pairs if n_pairs is not None else len(pairs or ())
            ok, geo = tracker.guard.run("in_run", lambda: InRunGeometry(
                tracker.model, n_pairs=n_pairs, pairs=pairs, params=tracker.options["params"],
                on_error=lambda err: tracker.guard.fail("in_run", err),
                pair_gradients=tracker.wants_pair_gradients(count), store=tracker.snapshot_device))
            self._geo = geo if ok else None

    def __enter__(self) -> InRunStep:
        if self._geo is not None:
            ok, _ = self.tracker.guard.run("in_run", self._geo.__enter__)
            if not ok:
                self._geo = None
        return self

    def watch(self, logps: Tensor) -> Tensor:
        """Register the step's [B] per-row sequence log-probs (returned unchanged)."""
        if self._geo is not None:
            ok, _ = self.tracker.guard.run("in_run", lambda: self._geo.watch(logps))
            if ok:
                self._logps = logps.detach()
            else:
                self._close_geometry()
        return logps

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._geo is None:
            return
        geo = self._geo
        self._close_geometry()
        if exc_type is not None or self._logps is None or geo.failed:
            return
        ok, result = self.tracker.guard.run("in_run", geo.result)
        if ok:
            logps = self._logps.to(torch.float64).cpu().numpy()
            self.tracker.on_inrun_pairs(None, result, logps[[w for w, _ in geo.pairs]],
                                        logps[[l for _, l in geo.pairs]], examples=self.examples)

    def _close_geometry(self) -> None:
        geo, self._geo = self._geo, None
        if geo is not None:
            self.tracker.guard.run("in_run", lambda: geo.__exit__(None, None, None))
