"""The chunk driver: the probe Gram of a chunk of probes from one forward and one backward."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..exact import ParameterScope
from ..scoring import EncodedProbe, ScoredRows, score_rows
from .collector import GhostCollector


def ghost_gram_chunk(model: nn.Module, chunk: Sequence[EncodedProbe], scope: ParameterScope, *,
                     padding_side: str = "right", pad_id: int = 0, materialize: bool | None = None
                     ) -> tuple[ScoredRows, list[torch.Tensor]]:
    """Same contract and numbers as `exact_gram_chunk`: one forward over every response of `chunk` and
    one backward of Σ_rows log π; returns the scores (detached) and one [R, R] float64 Gram per probe.
    Call inside `gradient_scope`."""
    rows = [row for probe in chunk for row in probe.rows()]
    groups, start = [], 0
    for probe in chunk:
        groups.append(list(range(start, start + len(probe.response_ids))))
        start += len(probe.response_ids)
    with GhostCollector(model, scope, groups, materialize=materialize) as collector:
        scored = score_rows(model, rows, padding_side=padding_side, pad_id=pad_id)
        total = scored.logp.sum()
        inputs = collector.check_attribution(total)
        if inputs:
            torch.autograd.grad(total, inputs, allow_unused=True)
    return scored.detach(), collector.grams
