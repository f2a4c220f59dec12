"""In-run pair geometry: exact ⟨a_w,a_l⟩, ‖a_w‖², ‖a_l‖² of every pair of a real training step.

In a preference step the chosen and rejected rows share one forward and one backward; row i's
output cotangents are s_i·(those of ∇log π_i) with s_i = ∂loss/∂log π_i, because rows are
independent. Ghost hooks (`GhostCollector`) see each layer's inputs and cotangents during the
trainer's own backward; a hook on the per-row log-probs reads s_i, which is divided out, so the
Gram of the unscaled a_i comes at no extra backward. A pair with s_i = 0 (e.g. SPO exactly at its
target) is NaN. With s_w = −c·d_w and s_l = c·d_l (c > 0 the batch averaging), the Case follows
from the same signs as `classify`.

    with InRunGeometry(model, n_pairs=P) as geo:         # TRL layout: P chosen rows, then P rejected
        logps = score_pairs(model, batch)                 # or the trainer's own [2P] sequence log-probs
        geo.watch(logps)
        loss = loss_fn(logps[:P], logps[P:], ...).mean()
        loss.backward()
    geo.result().cosine, geo.result().case

Trainers that score per token (TRL 1.x's fused LM head returns [B, T] token log-probs) use
`watch_tokens(token_logps, mask)` instead: s_i is the gradient reaching row i's scored tokens, the same
for every token of a row when the loss sees Σ_t log π(y_t) (a row whose tokens get different gradients,
e.g. TRL's `ld_alpha` down-weighting, is not a scaled a_i and is NaN). A head used outside its module
(the fused kernel) is declared with `head=FunctionalHead(...)` (ghost/collector.py); `marginscope.integrations.
trl_inrun` wires all of this into `trl.DPOTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .attribution import PairGradientCollector
from .coefficients import classify
from .exact import ParamSpec, select_parameters
from .ghost import FunctionalHead, GhostCollector, sequence_mark
from .scoring import EncodedProbe, ScoredRows, score_rows


@dataclass(frozen=True)
class InRunPairs:
    """Per pair of one training step (float64 [P]; case int8 [P], 0 where undetermined). A row whose
    scale is unusable (exactly 0, or unequal gradients across its tokens) is NaN in its scale and in
    every entry it enters; the other row's squared norm stays."""

    inner: np.ndarray  # ⟨a_w, a_l⟩
    sq_w: np.ndarray  # ‖a_w‖²
    sq_l: np.ndarray  # ‖a_l‖²
    scale_w: np.ndarray  # ∂loss/∂log π_w as seen by the backward (= −c·d_w)
    scale_l: np.ndarray  # ∂loss/∂log π_l (= +c·d_l)
    case: np.ndarray
    # with `pair_gradients`: {name: [P, *param.shape]} each pair's share of the gradient this backward
    # accumulated (`attribution.PairGradientCollector`); None otherwise
    gradients: dict[str, Tensor] | None = None

    def without_gradients(self) -> InRunPairs:
        """The same geometry without the (parameter-sized) gradients."""
        return InRunPairs(self.inner, self.sq_w, self.sq_l, self.scale_w, self.scale_l, self.case)

    @property
    def cosine(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.inner / np.sqrt(self.sq_w * self.sq_l)

    @property
    def gram(self) -> np.ndarray:
        """[P, 2, 2] Gram of (chosen, rejected)."""
        return np.stack([np.stack([self.sq_w, self.inner], -1), np.stack([self.inner, self.sq_l], -1)], -2)


def trl_pairs(n_pairs: int) -> list[tuple[int, int]]:
    """Row indices (chosen, rejected) of TRL 1.x's batch layout: all chosen rows, then all rejected."""
    return [(p, n_pairs + p) for p in range(n_pairs)]


def score_pairs(model: nn.Module, pairs: Sequence[EncodedProbe], *, padding_side: str = "right",
                pad_id: int = 0) -> tuple[Tensor, ScoredRows]:
    """Plain-loop helper: differentiable [2P] sequence log-probs of the pairs' chosen then rejected
    responses (response 0 and 1 of each probe) in TRL's layout, with the per-token scores."""
    rows = [(p.prompt_ids, p.response_ids[0]) for p in pairs] + [(p.prompt_ids, p.response_ids[1]) for p in pairs]
    scored = score_rows(model, rows, padding_side=padding_side, pad_id=pad_id)
    return scored.logp, scored


class InRunGeometry:
    """Context manager around one forward+backward of a preference step (see the module doc).

    Only observes: the hooks never change a gradient, nothing is written to `.grad`, no random
    numbers are drawn, and the hooks are removed on exit.

    on_error: None (errors raise, also from inside the forward or backward), or a handler that receives
    an error raised by a hook instead; the geometry is then `failed`, observes nothing more and its
    result is NaN (for trainers that must never be interrupted). materialize: as in `GhostCollector`.
    pair_gradients: also materialize each pair's gradient (`InRunPairs.gradients`, for the per-pair
    attribution of `ms.dynamics.attribution`), kept on `store` (None: beside the parameters; "cpu").
    """

    def __init__(self, model: nn.Module, *, n_pairs: int | None = None,
                 pairs: Sequence[tuple[int, int]] | None = None, params: ParamSpec = "trainable",
                 on_error: Callable[[BaseException], None] | None = None,
                 materialize: bool | None = None, pair_gradients: bool = False,
                 store: str | torch.device | None = None) -> None:
        if (n_pairs is None) == (pairs is None):
            raise ValueError("give exactly one of n_pairs (TRL layout) or pairs")
        self.pairs = list(pairs) if pairs is not None else trl_pairs(n_pairs)
        self.scope = select_parameters(model, params)
        groups = [list(p) for p in self.pairs]
        self._collector = (PairGradientCollector(model, self.scope, groups, store=store, materialize=materialize,
                                                 on_error=on_error) if pair_gradients else
                           GhostCollector(model, self.scope, groups, on_error=on_error, materialize=materialize))
        self._scale: Tensor | None = None
        self._logps: Tensor | None = None
        self._mask: Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> InRunGeometry:
        self._collector.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._collector.__exit__(*exc)

    @property
    def failed(self) -> bool:
        """Whether a hook failed (only with `on_error`; the result is then NaN)."""
        return self._collector.failed

    def fail(self, err: BaseException) -> None:
        """Stop observing (the result becomes NaN) and hand `err` to `on_error`; for code that watches the
        step from outside (e.g. a trainer integration's own hooks)."""
        self._collector.fail(err)

    @property
    def logps(self) -> np.ndarray | None:
        """The watched per-row sequence log-probs [B] (float64; Σ of the scored token log-probs with
        `watch_tokens`), or None before `watch` / `watch_tokens`."""
        return None if self._logps is None else self._logps.cpu().numpy()

    @staticmethod
    def head_start() -> int:
        """The `FunctionalHead.start` mark: call when the hidden states fed to the head are produced."""
        return sequence_mark() + 1

    def watch(self, logps: Tensor) -> Tensor:
        """Register the step's per-row sequence log-probs [B]; their gradient is each row's scale s_i."""
        if logps.dim() != 1:
            raise ValueError(f"watch() expects the [B] per-row sequence log-probs, got shape {list(logps.shape)}")
        self._collector.check_attribution(logps)
        self._logps = logps.detach().to(torch.float64)
        self._handles.append(logps.register_hook(self._read_scale))
        return logps

    def watch_tokens(self, token_logps: Tensor, mask: Tensor, *, head: FunctionalHead | None = None) -> Tensor:
        """Register the step's per-token log-probs [B, T] and the scored positions `mask` [B, T]: row i's
        sequence log-prob is Σ_t over its scored tokens, and the gradient reaching them is s_i (NaN for
        a row whose scored tokens get different gradients, 0 → NaN for a row with none). `head`: the LM
        head's use when it computes token_logps outside its module (see `FunctionalHead`); only needed
        when the head holds parameters of the scope."""
        if token_logps.dim() != 2 or mask.shape != token_logps.shape:
            raise ValueError(f"watch_tokens() expects [B, T] token log-probs and a mask of the same shape, got "
                             f"{list(token_logps.shape)} and {list(mask.shape)}")
        mask = mask.detach().bool()
        if head is not None:
            self._collector.watch_head(head, token_logps, mask)
        self._collector.check_attribution(token_logps)
        self._mask = mask
        self._logps = (token_logps.detach().to(torch.float64) * mask).sum(1)
        self._handles.append(token_logps.register_hook(self._read_token_scale))
        return token_logps

    def _read_scale(self, grad: Tensor) -> None:
        self._collector.stop_recording()
        self._scale = grad.detach().clone()
        self._collector.row_scale = self._scale

    def _read_token_scale(self, grad: Tensor) -> None:
        if self._collector.failed:
            return
        try:
            self._token_scale(grad)
        except Exception as err:
            if self._collector.on_error is None:
                raise
            self._collector.fail(err)

    def _token_scale(self, grad: Tensor) -> None:
        self._collector.stop_recording()
        g, mask = grad.detach().to(torch.float64), self._mask.to(grad.device)
        first = g.gather(1, mask.to(torch.int8).argmax(1, keepdim=True))  # a scored token's gradient
        uniform = (torch.isclose(g, first, rtol=1e-6, atol=0) | ~mask).all(1)
        scale = torch.where(mask.any(1), first.squeeze(1), 0.0)
        self._scale = torch.where(uniform, scale, torch.nan)
        self._collector.row_scale = self._scale

    def result(self) -> InRunPairs:
        """The pairs' geometry after the backward (NaN everywhere if no backward reached the log-probs
        or the geometry failed)."""
        n = len(self.pairs)
        if self._scale is None or self.failed:
            nan = np.full(n, np.nan)
            return InRunPairs(nan, nan, nan, nan, nan, np.zeros(n, dtype=np.int8))
        grams = torch.stack(self._collector.grams).numpy()
        scale = self._scale.to(torch.float64).cpu().numpy()
        s_w = np.array([scale[w] for w, _ in self.pairs])
        s_l = np.array([scale[l] for _, l in self.pairs])
        # a row without a usable scale (0, or unequal token gradients) is NaN in every entry it enters;
        # the other row's squared norm stays
        gradients = getattr(self._collector, "gradients", None)
        return InRunPairs(grams[:, 0, 1], grams[:, 0, 0], grams[:, 1, 1], s_w, s_l,
                          classify(grams, -s_w, s_l), gradients)
