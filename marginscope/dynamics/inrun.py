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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .coefficients import classify
from .exact import ParamSpec, select_parameters
from .ghost import GhostCollector
from .scoring import EncodedProbe, ScoredRows, score_rows


@dataclass(frozen=True)
class InRunPairs:
    """Per pair of one training step (float64 [P]; case int8 [P], 0 where undetermined)."""

    inner: np.ndarray  # ⟨a_w, a_l⟩
    sq_w: np.ndarray  # ‖a_w‖²
    sq_l: np.ndarray  # ‖a_l‖²
    scale_w: np.ndarray  # ∂loss/∂log π_w as seen by the backward (= −c·d_w)
    scale_l: np.ndarray  # ∂loss/∂log π_l (= +c·d_l)
    case: np.ndarray

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
    """

    def __init__(self, model: nn.Module, *, n_pairs: int | None = None,
                 pairs: Sequence[tuple[int, int]] | None = None, params: ParamSpec = "trainable") -> None:
        if (n_pairs is None) == (pairs is None):
            raise ValueError("give exactly one of n_pairs (TRL layout) or pairs")
        self.pairs = list(pairs) if pairs is not None else trl_pairs(n_pairs)
        scope = select_parameters(model, params)
        self._collector = GhostCollector(model, scope, [list(p) for p in self.pairs])
        self._scale: Tensor | None = None

    def __enter__(self) -> InRunGeometry:
        self._collector.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._collector.__exit__(*exc)

    def watch(self, logps: Tensor) -> Tensor:
        """Register the step's per-row sequence log-probs [B]; their gradient is each row's scale s_i."""
        if logps.dim() != 1:
            raise ValueError(f"watch() expects the [B] per-row sequence log-probs, got shape {list(logps.shape)}")
        self._collector.check_attribution(logps)
        logps.register_hook(self._read_scale)
        return logps

    def _read_scale(self, grad: Tensor) -> None:
        self._scale = grad.detach().clone()
        self._collector.row_scale = self._scale

    def result(self) -> InRunPairs:
        """The pairs' geometry after the backward (NaN everywhere if no backward reached the log-probs)."""
        n = len(self.pairs)
        if self._scale is None:
            nan = np.full(n, np.nan)
            return InRunPairs(nan, nan, nan, nan, nan, np.zeros(n, dtype=np.int8))
        grams = torch.stack(self._collector.grams).numpy()
        scale = self._scale.to(torch.float64).cpu().numpy()
        s_w = np.array([scale[w] for w, _ in self.pairs])
        s_l = np.array([scale[l] for _, l in self.pairs])
        gram = np.where(np.isnan(grams).any(axis=(1, 2))[:, None, None], np.nan, grams)
        return InRunPairs(gram[:, 0, 1], gram[:, 0, 0], gram[:, 1, 1], s_w, s_l,
                          classify(gram, -s_w, s_l))
