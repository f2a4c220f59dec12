"""Factored per-row gradients: what a handler returns for each parameter of one call.

`Outer` (Σ_t l_t ⊗ m_t, e.g. D and X of a linear layer), `Dense` (materialized, e.g. a norm's weight)
and `SoftmaxHead` (a softmax head used outside its module, whose [B, T, V] cotangent is recomputed in
vocabulary chunks, never held). Contractions between factors are in `contract.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

HEAD_CHUNK_ELEMENTS = 1 << 24  # a functional head's logits are recomputed in [tokens, chunk] blocks this size


@dataclass
class Outer:
    """Per-row gradient G_r = Σ_t l_r,t ⊗ m_r,t in the parameter's [dim_l, dim_m] layout.

    `l` is [B, T, dim_l], or token ids [B, T] standing for one-hot rows; `columns` (sorted ids),
    when set, are the parameter rows a dense `l` was cut down to (see `_compact`)."""

    l: Tensor
    m: Tensor
    columns: Tensor | None = None

    @property
    def ids(self) -> bool:
        return not self.l.is_floating_point()


@dataclass
class Dense:
    """Materialized per-row gradient, [B, numel]."""

    g: Tensor


@dataclass(frozen=True)
class LogitTransform:
    """What a head applies to its raw output y = W h + b before the softmax: z = scale·y/temperature,
    or softcap·tanh(scale·y/softcap)/temperature with softcapping (TRL's fused head: the config's
    logit scale and final_logit_softcapping, the trainer's temperature)."""

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __call__(self, y: Tensor) -> tuple[Tensor, Tensor | float]:
        """(z, dz/dy), elementwise."""
        y = y * self.scale
        if self.softcap is None:
            return y / self.temperature, self.scale / self.temperature
        t = torch.tanh(y / self.softcap)
        return self.softcap * t / self.temperature, (1 - t * t) * (self.scale / self.temperature)


@dataclass
class SoftmaxHead:
    """Per-row gradient of a softmax head's weight [V, d], G_r = Σ_t D_r,t ⊗ h_r,t with
    D_r,t = g_r,t · z'(y_r,t) ⊙ (e_{target_r,t} − softmax(z_r,t)), y = W h + b: an outer factor whose
    [B, T, V] side is never materialized; the logits are recomputed in vocabulary chunks.

    h [B, T, d] (float32 at least), targets [B, T], g [B, T] (0 where unscored), log_z [B, T] the
    log-partition of every position; weight and bias detached."""

    h: Tensor
    targets: Tensor
    g: Tensor
    log_z: Tensor
    weight: Tensor
    bias: Tensor | None
    transform: LogitTransform

    def block(self, h: Tensor, targets: Tensor, g: Tensor, log_z: Tensor, lo: int, hi: int) -> Tensor:
        """D of some tokens (h [N, d], targets/g/log_z [N]) over the vocabulary columns [lo, hi): [N, hi − lo]."""
        z, dz = self.transform(_head_logits(h, self.weight[lo:hi], None if self.bias is None else self.bias[lo:hi]))
        onehot = targets[:, None] == torch.arange(lo, hi, device=targets.device)[None, :]
        return g[:, None] * dz * (onehot.to(z.dtype) - torch.exp(z - log_z[:, None]))

    def columns(self, ids: Tensor) -> Outer:
        """The dense-l outer factor restricted to the vocabulary columns `ids` (sorted, unique), e.g. for
        the cross terms of a tied head with its embedding use."""
        ids = ids.to(self.weight.device)
        z, dz = self.transform(_head_logits(self.h, self.weight[ids], None if self.bias is None else self.bias[ids]))
        onehot = self.targets[..., None] == ids
        d = self.g[..., None] * dz * (onehot.to(z.dtype) - torch.exp(z - self.log_z[..., None]))
        return Outer(d, self.h, ids)

    def tokens(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The scored tokens (g ≠ 0) of `rows`: (row position in `rows`, h, targets, g, log_z), flattened."""
        r, t = (self.g[rows] != 0).nonzero(as_tuple=True)
        src = rows[r]
        return r, self.h[src, t], self.targets[src, t], self.g[src, t], self.log_z[src, t]


Factor = Outer | Dense | SoftmaxHead


def _head_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = h Wᵀ + b in h's dtype (float32 at least), autocast off."""
    with torch.autocast(h.device.type, enabled=False):
        y = h @ weight.to(h.dtype).T
        return y if bias is None else y + bias.to(h.dtype)


def _vocab_chunks(n_tokens: int, vocab: int) -> list[tuple[int, int]]:
    step = max(1, min(vocab, HEAD_CHUNK_ELEMENTS // max(n_tokens, 1)))
    return [(lo, min(lo + step, vocab)) for lo in range(0, vocab, step)]


def softmax_head_factors(hidden: Tensor, targets: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None,
                         transform: LogitTransform, attributes: Sequence[str]) -> dict[str, Factor]:
    """{"weight": SoftmaxHead, "bias": Dense ∇b_r = Σ_t D_r,t} of a softmax head over hidden [B, T, d]
    whose scored tokens received the log-prob gradients g [B, T] (0 elsewhere); only positions some row
    scores are kept. The log-partition of every kept position is computed here, in vocabulary chunks."""
    keep = (g != 0).any(0)
    hidden, targets, g = hidden[:, keep.to(hidden.device)], targets[:, keep.to(targets.device)], g[:, keep]
    h = _wide(hidden.detach()).to(weight.device)
    g = g.to(device=weight.device, dtype=h.dtype)
    targets = targets.to(weight.device).long()
    b, t = g.shape
    flat = h.reshape(b * t, -1)
    log_z = torch.full((b * t,), -torch.inf, dtype=h.dtype, device=h.device)
    for lo, hi in _vocab_chunks(b * t, weight.shape[0]):
        z, _ = transform(_head_logits(flat, weight[lo:hi], None if bias is None else bias[lo:hi]))
        log_z = torch.logaddexp(log_z, torch.logsumexp(z, -1))
    head = SoftmaxHead(h, targets, g, log_z.view(b, t), weight.detach(),
                       None if bias is None else bias.detach(), transform)
    factors: dict[str, Factor] = {"weight": head}
    if "bias" in attributes:
        everything = torch.arange(b, device=h.device)
        r, ht, yt, gt, lzt = head.tokens(everything)
        grad = torch.zeros(b, weight.shape[0], dtype=torch.float64, device=h.device)
        for lo, hi in _vocab_chunks(len(r), weight.shape[0]):
            grad[:, lo:hi].index_add_(0, r, _f64(head.block(ht, yt, gt, lzt, lo, hi)))
        factors["bias"] = Dense(grad)
    return {a: factors[a] for a in attributes}


def _f64(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def _wide(t: Tensor) -> Tensor:
    """Float32 at least: feature-dimension dot products of bf16/fp16 activations run in float32,
    float64 ones stay float64; the Gram sums over tokens, uses and layers are float64 throughout."""
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
