"""Exact (slow) gradient geometry by autograd: the oracle every fast path is tested against.

For a response set R(x) and a parameter scope θ_S, a_i = ∇_{θ_S} log π(y_i | x) is obtained with one
backward per response, and K[i, j] = ⟨a_i, a_j⟩ is accumulated in float64, parameter by parameter.
Per token, g_t = ∇ log π(y_t | x, y_<t) takes one backward per token (DESIGN.md §1).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import MarginscopeError
from .scoring import EncodedProbe, ScoredRows, score_rows

ParamSpec = str | Sequence[str] | Callable[[str, nn.Parameter], bool]


@dataclass(frozen=True)
class ParameterScope:
    """The parameters gradients are taken over: names in model order, tied tensors counted once."""

    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    spec: str

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def select_parameters(model: nn.Module, params: ParamSpec = "trainable") -> ParameterScope:
    """Resolve a scope: "trainable" (requires_grad; the LoRA adapters of a peft model), "all",
    a regular expression searched in parameter names, a list of exact names, or a predicate."""
    named = list(model.named_parameters())  # deduplicates tied parameters
    if params == "trainable":
        chosen = [(n, p) for n, p in named if p.requires_grad]
        spec = "trainable"
    elif params == "all":
        chosen, spec = named, "all"
    elif isinstance(params, str):
        try:
            pattern = re.compile(params)
        except re.error as err:
            raise MarginscopeError(f"params: invalid regular expression {params!r}: {err}") from None
        chosen = [(n, p) for n, p in named if pattern.search(n)]
        spec = f"regex:{params}"
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
        spec = f"callable:{getattr(params, '__name__', 'predicate')}"
    else:
        wanted = list(params)
        by_name = dict(named)
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise MarginscopeError(f"params: no parameter named {unknown[0]!r} in the model")
        chosen = [(n, by_name[n]) for n in dict.fromkeys(wanted)]
        spec = "names:" + ",".join(wanted)
    if not chosen:
        raise MarginscopeError(f"params={spec!r} selects no parameter of the model")
    return ParameterScope(tuple(n for n, _ in chosen), tuple(p for _, p in chosen), spec)


@contextlib.contextmanager
def gradient_scope(model: nn.Module, scope: ParameterScope) -> Iterator[None]:
    """Eval mode, grad enabled, requires_grad exactly on the scope; everything restored on exit.

    Nothing here writes `.grad` or consumes random numbers; gradients come from `autograd.grad`.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    in_scope = {id(p) for p in scope.params}
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in in_scope)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _grads(output: torch.Tensor, scope: ParameterScope) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, scope.params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, scope.params)]


def _gram_of(grads_a: list[list[torch.Tensor]], grads_b: list[list[torch.Tensor]]) -> torch.Tensor:
    """[len(a), len(b)] float64 inner products of gradient lists, parameter by parameter."""
    out = torch.zeros(len(grads_a), len(grads_b), dtype=torch.float64)
    for k in range(len(grads_a[0])):
        a = torch.stack([g[k].reshape(-1) for g in grads_a]).to(torch.float64)
        b = torch.stack([g[k].reshape(-1) for g in grads_b]).to(torch.float64)
        out += (a @ b.T).cpu()
    return out


def probe_chunks(encoded: Sequence[EncodedProbe], batch_size: int) -> Iterable[list[EncodedProbe]]:
    for start in range(0, len(encoded), batch_size):
        yield list(encoded[start:start + batch_size])


def exact_gram_chunk(model: nn.Module, chunk: Sequence[EncodedProbe], scope: ParameterScope, *,
                     padding_side: str = "right", pad_id: int = 0
                     ) -> tuple[ScoredRows, list[torch.Tensor]]:
    """One forward over every response of `chunk`, one backward per response; returns the scores
    (detached) and one [R, R] float64 Gram per probe. Call inside `gradient_scope`."""
    rows = [row for probe in chunk for row in probe.rows()]
    scored = score_rows(model, rows, padding_side=padding_side, pad_id=pad_id)
    logp = scored.logp
    grams, i = [], 0
    for probe in chunk:
        r = len(probe.response_ids)
        grads = [_grads(logp[i + k], scope) for k in range(r)]
        grams.append(_gram_of(grads, grads))
        i += r
    return scored.detach(), grams


def exact_token_gram(model: nn.Module, probe: EncodedProbe, scope: ParameterScope, *,
                     w: int = 0, l: int = 1, padding_side: str = "right", pad_id: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G[t, s] = ⟨∇ log π(w_t | x, w_<t), ∇ log π(l_s | x, l_<s)⟩ by one backward per token, with the
    per-token squared norms of both responses. Call inside `gradient_scope`."""
    rows = [(probe.prompt_ids, probe.response_ids[w]), (probe.prompt_ids, probe.response_ids[l])]
    scored = score_rows(model, rows, padding_side=padding_side, pad_id=pad_id)
    t_w, t_l = len(probe.response_ids[w]), len(probe.response_ids[l])
    grads_w = [_grads(scored.token_logp[0, t], scope) for t in range(t_w)]
    grads_l = [_grads(scored.token_logp[1, s], scope) for s in range(t_l)]
    sq_w = torch.stack([_gram_of([g], [g])[0, 0] for g in grads_w])
    sq_l = torch.stack([_gram_of([g], [g])[0, 0] for g in grads_l])
    return _gram_of(grads_w, grads_l), sq_w, sq_l
