"""Ghost engine: the exact Gram of per-response gradients from one forward and one backward.

Rows are independent, so one backward of Σ_r log π(y_r | x) gives every module call's output
cotangent D_r exactly as row r's own backward would. With the call's input X_r, each parameter's
per-row gradient is known in factored form, G_r = Σ_t l_r,t ⊗ m_r,t, and Grams are contracted
without ever materializing a parameter-sized tensor:

    ⟨G_a, G'_b⟩ = Σ_{t,s} (l_a,t · l'_b,s)(m_a,t · m'_b,s)

    nn.Linear weight [d_out, d_in]      l = D, m = X  → Σ (D_a D_bᵀ) ⊙ (X_a X_bᵀ)
    GPT-2 Conv1D weight [d_in, d_out]   l = X, m = D
    nn.Embedding weight (ids i)         l = one-hot(i), m = D → Σ [i_a,t = i_b,s] D_a,t · D_b,s
                                        (called on one row for the batch, e.g. GPT-2's positions without
                                        position_ids: D read where its output is broadcast-added)
    biases                              ∇b_r = Σ_t D_r,t, materialized
    any other small leaf module         ∇θ_r materialized by a vmap over rows of a vjp (norms)

A layer switches to materializing D_rᵀX_r when 2·T² > d_in·d_out. A parameter used by several calls
(tied embeddings, a module called twice) has ∇θ_r = Σ_u ∇θ_r^u, so the cross terms of its uses are
added (`GramSums`). Everything is contracted per group of rows (one probe's responses): dot products over a layer's
feature dimension in the activations' dtype (float32 at least), every Gram sum in float64.
Module kinds are recognized by their `forward` function, never by isinstance alone.

A softmax LM head used outside its module (a fused log-prob kernel such as TRL 1.x's `fused_lm_head`)
is attributed as a "functional head" (`FunctionalHead`, `GhostCollector.watch_head`): its per-row gradient
is the outer factor of the hidden states H fed to it and D = g·z'(y)⊙(e_target − softmax(z)), with g the
gradient reaching each scored token's log-prob; D is never held as a [B, T, V] tensor (`SoftmaxHead`
recomputes the logits in vocabulary chunks wherever a Gram needs them).

`GhostCollector` contracts each call's factors in a tensor hook on its output during the backward.
`CallRecorder`, its base, is the capture mode: the same forward hooks record each call and its output
and touch no tensor, so that `autograd.grad` can differentiate straight to the outputs (batched over
per-token cotangents in tokens.py, where tensor hooks would not fire); the handlers, `pair_gram` and
`GramSums` then contract any rows built from those inputs and cotangents ("virtual rows").

Limits: a generic module must treat rows independently (every norm does) and replay from its
captured inputs; a scope parameter used outside the hooked calls (a functional use, a bypassed
module, reentrant checkpointing) is detected by `GhostCollector.check_attribution`, not attributed;
hooked calls' inputs are held until their cotangent arrives, so under checkpointing the collector
keeps what checkpointing would have dropped; forward calls made while a backward runs (checkpointing
recomputation) are never recorded; one forward/backward pass over one batch of rows per collector.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial, wraps
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from transformers.pytorch_utils import Conv1D

from ..errors import MarginscopeError
from .exact import ParameterScope
from .scoring import EncodedProbe, ScoredRows, score_rows

ROWWISE_MAX_NUMEL = 1 << 16  # largest own-parameter count of a generic module materialized per row
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


# --- contractions: [G, R, R] float64 Grams between two factors over the rows of G groups -------------
# `rows` is [G, R]: G groups of R rows each, contracted at once (batched matrix products).

def _f64(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def _wide(t: Tensor) -> Tensor:
    """Float32 at least: feature-dimension dot products of bf16/fp16 activations run in float32,
    float64 ones stay float64; the Gram sums over tokens, uses and layers are float64 throughout."""
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def _flat_l(o: Outer, rows: Tensor) -> Tensor:
    """l of each group's rows over (row, token): [G, R·T, dim_l], or [G, R·T] ids."""
    l = o.l[rows].flatten(1, 2)
    return l if o.ids else _wide(l)


def _flat_m(o: Outer, rows: Tensor) -> Tensor:
    return _wide(o.m[rows].flatten(1, 2))


def _column_index(o: Outer, ids: Tensor) -> Tensor:
    """Where token ids fall among the columns of a dense l (all of them, or `o.columns`)."""
    return ids if o.columns is None else torch.searchsorted(o.columns, ids)


def _pick_columns(l: Tensor, idx: Tensor) -> Tensor:
    """l [G, N, dim_l] at columns idx [G, M]: [G, N, M]."""
    return torch.gather(l, 2, idx[:, None, :].expand(-1, l.shape[1], -1))


def _l_gram(u: Outer, v: Outer, rows: Tensor) -> Tensor:
    """[G, R·T, R·S] l_u,t · l_v,s; a one-hot side picks columns of the other: l[:, id]."""
    lu = _flat_l(u, rows)
    lv = lu if v is u else _flat_l(v, rows)
    if u.ids and v.ids:
        return _f64(lu[:, :, None] == lv[:, None, :])
    if v.ids:
        return _f64(_pick_columns(lu, _column_index(u, lv)))
    if u.ids:
        return _f64(_pick_columns(lv, _column_index(v, lu)).mT)
    return _f64(lu @ lv.mT)


def _materialized(o: Outer, rows: Tensor) -> Tensor:
    """[G, R, dim_l·dim_m] per-row gradients Σ_t l_t ⊗ m_t of a dense-l factor."""
    return torch.einsum("grtl,grtm->grlm", _f64(o.l[rows]), _f64(o.m[rows])).flatten(2)


def _materializes(u: Outer, v: Outer, forced: bool | None) -> bool:
    """Materialize two dense-l factors when 2·T·S > dim_l·dim_m (or as forced); never one-hot ones."""
    if u.ids or v.ids:
        return False
    if forced is not None:
        return forced
    return 2 * u.m.shape[1] * v.m.shape[1] > u.l.shape[-1] * u.m.shape[-1]


def _outer_gram(u: Outer, v: Outer, rows: Tensor, materialize: bool | None) -> Tensor:
    """Σ_{t,s} (l_a,t·l_b,s)(m_a,t·m_b,s) per row pair, or ⟨G_a, G_b⟩ of materialized gradients."""
    if _materializes(u, v, materialize):
        a = _materialized(u, rows)
        return a @ (a if v is u else _materialized(v, rows)).mT
    (g, r), t, s = rows.shape, u.m.shape[1], v.m.shape[1]
    mu = _flat_m(u, rows)
    mv = mu if v is u else _flat_m(v, rows)
    k = _l_gram(u, v, rows) * _f64(mu @ mv.mT)
    return k.view(g, r, t, r, s).sum((2, 4))


def _dense_outer_gram(d: Dense, o: Outer, rows: Tensor) -> Tensor:
    """⟨G_a, Σ_s l_b,s ⊗ m_b,s⟩; for ids Σ_s G_a[id_b,s] · m_b,s, else against materialized G_b."""
    gd = _f64(d.g[rows])
    if not o.ids:
        return gd @ _materialized(o, rows).mT
    (g, r), s = rows.shape, o.m.shape[1]
    table = gd.view(g, r, -1, o.m.shape[-1])  # [G, R, dim_l, dim_m]
    ids = o.l[rows].flatten(1, 2)  # [G, R·S]
    picked = table[torch.arange(g, device=ids.device)[:, None, None],
                   torch.arange(r, device=ids.device)[None, :, None], ids[:, None, :]]  # [G, R, R·S, dim_m]
    return (picked * _flat_m(o, rows)[:, None]).sum(-1).view(g, r, r, s).sum(-1)


def _head_gram(u: SoftmaxHead, rows: Tensor, materialize: bool | None) -> Tensor:
    """⟨G_a, G_b⟩ of a softmax head over each group's scored tokens, the logits recomputed per vocabulary
    chunk: Σ_c (D_c D_cᵀ) ⊙ (H Hᵀ) summed per row pair, or per-row D_cᵀH materialized per chunk when
    2·T² > V·d (T the most tokens a row scores). One group at a time."""
    return torch.stack([_head_group_gram(u, group, materialize) for group in rows])


def _head_group_gram(u: SoftmaxHead, rows: Tensor, materialize: bool | None) -> Tensor:
    r_count = len(rows)
    r, h, y, g, lz = u.tokens(rows)
    out = torch.zeros(r_count, r_count, dtype=torch.float64, device=h.device)
    if len(r) == 0:
        return out
    vocab, width = u.weight.shape
    most = int(torch.bincount(r, minlength=r_count).max())
    chunks = _vocab_chunks(len(r), vocab)
    if materialize if materialize is not None else 2 * most * most > vocab * width:
        own = [(r == i).nonzero(as_tuple=True)[0] for i in range(r_count)]
        for lo, hi in chunks:
            d = u.block(h, y, g, lz, lo, hi)
            a = torch.stack([_f64(d[i].T @ h[i]).flatten() for i in own])
            out += a @ a.T
        return out
    k = torch.zeros(len(r), len(r), dtype=torch.float64, device=h.device)
    for lo, hi in chunks:
        d = u.block(h, y, g, lz, lo, hi)
        k += _f64(d @ d.T)
    k *= _f64(h @ h.T)
    sel = torch.nn.functional.one_hot(r, r_count).to(torch.float64)
    return sel.T @ k @ sel


def _head_pair_gram(u: Factor, v: Factor, rows: Tensor, materialize: bool | None) -> Tensor:
    """Terms involving a softmax head: its own Gram, or the cross terms with an embedding use of a tied
    weight (the head restricted to the columns the embedding's ids hit)."""
    if u is v:
        return _head_gram(u, rows, materialize)
    if not isinstance(u, SoftmaxHead):
        return _head_pair_gram(v, u, rows, materialize).mT
    if isinstance(v, Outer) and v.ids:
        return _outer_gram(u.columns(v.l[rows].unique()), v, rows, False)
    raise MarginscopeError("a functional softmax head's weight is used by another call that is not a token "
                           "embedding; the ghost engine cannot add the cross terms; use engine='exact'")


def pair_gram(u: Factor, v: Factor, rows: Tensor, materialize: bool | None = None) -> Tensor:
    """[G, R, R] float64 ⟨G^u_a, G^v_b⟩ for a, b in each group of `rows` [G, R] (two uses of one
    parameter, or u is v)."""
    if isinstance(u, SoftmaxHead) or isinstance(v, SoftmaxHead):
        return _head_pair_gram(u, v, rows, materialize)
    if isinstance(u, Dense) and isinstance(v, Dense):
        return _f64(u.g[rows]) @ _f64(v.g[rows]).mT
    if isinstance(u, Dense):
        return _dense_outer_gram(u, v, rows)
    if isinstance(v, Dense):
        return _dense_outer_gram(v, u, rows).mT
    return _outer_gram(u, v, rows, materialize)


# --- one handler per parameter kind ------------------------------------------------------------------

@dataclass(eq=False)
class Call:
    """One hooked forward call: its captured (detached) inputs and the scope parameters it uses."""

    module: nn.Module
    kind: Kind
    params: list[tuple[str, nn.Parameter]]  # (attribute, parameter)
    args: tuple | None
    kwargs: dict | None


@dataclass(frozen=True)
class Kind:
    """How the per-row gradients of one kind of module's own parameters are factored.

    claims: whether the module is of this kind; attributes: the own parameters it attributes;
    factors: (call, output cotangent) → {attribute: factor} for the call's parameters."""

    name: str
    claims: Callable[[nn.Module], bool]
    attributes: Callable[[nn.Module], tuple[str, ...]]
    factors: Callable[[Call, Tensor], dict[str, Factor]]


def _first_input(call: Call) -> Tensor:
    return (*call.args, *call.kwargs.values())[0]


def _per_row(t: Tensor, b: int) -> Tensor:
    """[B, ..., d] → [B, T, d] (T: every position of the row)."""
    return t.reshape(b, -1, t.shape[-1])


def _nonzero_positions(x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the positions where every row's cotangent is zero (they add nothing to any Gram): e.g. the
    LM head sees cotangents only at scored response positions, not over the prompt or padding."""
    keep = d.flatten(2).ne(0).any(-1).any(0)
    return (x, d) if bool(keep.all()) else (x[:, keep], d[:, keep])


def _affine_factors(call: Call, grad: Tensor, weight: Callable[[Tensor, Tensor], Outer]
                    ) -> dict[str, Factor]:
    """Linear / Conv1D: the weight's outer factor from (X, D) in its layout; ∇b_r = Σ_t D_r,t."""
    b = grad.shape[0]
    x, d = _nonzero_positions(_per_row(_first_input(call), b), _per_row(grad, b))
    factors = {"weight": lambda: weight(x, d), "bias": lambda: Dense(d.sum(1, dtype=torch.float64))}
    return {a: factors[a]() for a, _ in call.params}


def _embedding_factors(call: Call, grad: Tensor) -> dict[str, Factor]:
    """l = ids, m = D; positions holding `padding_idx` get no gradient, as in F.embedding."""
    b, module = grad.shape[0], call.module
    ids, d = _first_input(call).reshape(b, -1), _per_row(grad, b)
    if module.padding_idx is not None:
        d = d.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    return {"weight": Outer(ids, d)}


def _rowwise_factors(call: Call, grad: Tensor) -> dict[str, Factor]:
    """∇θ_r = vjp of θ ↦ module(θ; inputs_r) at D_r, vmapped over rows (tensors with a leading
    batch dimension are split by row, anything else is shared)."""
    module, b = call.module, grad.shape[0]
    params = {a: p.detach() for a, p in call.params}
    flat, spec = tree_flatten((call.args, call.kwargs))
    dims = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else None for t in flat]

    def row(flat_row: list, d: Tensor) -> dict[str, Tensor]:
        unsplit = [t.unsqueeze(0) if dim == 0 else t for t, dim in zip(flat_row, dims)]
        args, kwargs = tree_unflatten(unsplit, spec)
        _, pull = vjp(lambda p: functional_call(module, p, args, kwargs), params)
        return pull(d.unsqueeze(0))[0]

    return {a: Dense(g.flatten(1)) for a, g in vmap(row, in_dims=(dims, 0))(flat, grad).items()}


def _forward_is(cls: type) -> Callable[[nn.Module], bool]:
    return lambda module: type(module).forward is cls.forward


def _is_leaf(module: nn.Module) -> bool:
    """No descendant holds parameters: the module's own forward is all that uses them."""
    return sum(1 for _ in module.parameters()) == sum(1 for _ in module.parameters(recurse=False))


def _is_small_leaf(module: nn.Module) -> bool:
    return _is_leaf(module) and sum(p.numel() for p in module.parameters(recurse=False)) <= ROWWISE_MAX_NUMEL


LINEAR = Kind("linear", _forward_is(nn.Linear), lambda m: ("weight", "bias"),
              partial(_affine_factors, weight=lambda x, d: Outer(d, x)))
CONV1D = Kind("conv1d", _forward_is(Conv1D), lambda m: ("weight", "bias"),
              partial(_affine_factors, weight=lambda x, d: Outer(x, d)))
EMBEDDING = Kind("embedding", _forward_is(nn.Embedding),
                 lambda m: () if m.scale_grad_by_freq else ("weight",), _embedding_factors)
ROWWISE = Kind("rowwise", _is_small_leaf, lambda m: tuple(a for a, _ in m.named_parameters(recurse=False)),
               _rowwise_factors)
KINDS = (LINEAR, CONV1D, EMBEDDING, ROWWISE)  # first claim wins; ROWWISE is the generic fallback


def _why(module: nn.Module, kind: Kind | None) -> str:
    if kind is not None:
        return f"the {kind.name} handler attributes only {kind.attributes(module)} of this module"
    if not _is_leaf(module):
        return ("it is used in the forward of a module with parameterized submodules, not by a Linear, "
                "Conv1D, Embedding or small leaf module")
    return f"a leaf module of unknown kind with more than {ROWWISE_MAX_NUMEL} parameters"


Plan = dict[nn.Module, tuple[Kind, list[tuple[str, nn.Parameter]]]]


def plan_modules(model: nn.Module, scope: ParameterScope) -> tuple[Plan, dict[str, str]]:
    """The modules to hook with their kind and scope parameters, and {name: reason} for every scope
    parameter some owning module cannot attribute."""
    names = {id(p): n for n, p in zip(scope.names, scope.params)}
    plan, problems = {}, {}
    for qual, module in model.named_modules():
        own = [(a, p) for a, p in module.named_parameters(recurse=False) if id(p) in names]
        if not own:
            continue
        kind = next((k for k in KINDS if k.claims(module)), None)
        handled = kind.attributes(module) if kind else ()
        for a, p in own:
            if a not in handled:
                where = f"{type(module).__name__} '{qual}'.{a}"
                problems.setdefault(names[id(p)], f"{where}: {_why(module, kind)}")
        if kind and any(a in handled for a, _ in own):
            plan[module] = (kind, [(a, p) for a, p in own if a in handled])
    return plan, problems


def ghost_supports(model: nn.Module, scope: ParameterScope) -> bool:
    """Whether every scope parameter is owned only by modules the ghost engine attributes."""
    return not plan_modules(model, scope)[1]


# --- Gram sums over every use of each parameter -------------------------------------------------------

class GramSums:
    """Float64 [R, R] Gram sums over groups of rows, fed one factor per parameter use:

        K += ⟨G^u, G^u⟩ + Σ_v (⟨G^u, G^v⟩ + ⟨G^v, G^u⟩)   over the parameter's earlier uses v,

    so a parameter used by several calls (∇θ_r = Σ_u ∇θ_r^u) gets the cross terms of its uses. All of
    a parameter's uses are announced by `expect` before the first of their factors is added; a use's
    factor is kept for the cross terms only while other uses of its parameter are pending (`_compact`).
    Groups of equal size are contracted together (batched), in blocks of at most `BATCH_ELEMENTS`
    entries of their [R·T, R·S] token Grams."""

    BATCH_ELEMENTS = 1 << 25

    def __init__(self, groups: Sequence[Sequence[int]], device: torch.device,
                 materialize: bool | None = None) -> None:
        self.groups, self.materialize = [list(g) for g in groups], materialize
        by_size: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(self.groups):
            by_size[len(g)].append(i)
        self._batches = list(by_size.values())  # group indices, one list per group size
        self._acc = [torch.zeros(len(idx), len(self.groups[idx[0]]), len(self.groups[idx[0]]),
                                 dtype=torch.float64, device=device) for idx in self._batches]
        self._rows: dict[torch.device, list[Tensor]] = {}
        self._pending: dict[int, list[Call]] = defaultdict(list)
        self._stored: dict[int, list[Factor]] = defaultdict(list)

    @property
    def sums(self) -> list[Tensor]:
        """One [R, R] float64 Gram sum per group, in the order of `groups`."""
        out: list[Tensor | None] = [None] * len(self.groups)
        for idx, acc in zip(self._batches, self._acc):
            for j, i in enumerate(idx):
                out[i] = acc[j]
        return out

    def expect(self, call: Call) -> None:
        """Announce a call whose factors will come (its parameters' uses are pending until then)."""
        for _, p in call.params:
            self._pending[id(p)].append(call)

    def add(self, p: nn.Parameter, u: Factor, call: Call) -> None:
        """Add the terms of use `call` of parameter p, whose factor is u."""
        pending, stored = self._pending[id(p)], self._stored[id(p)]
        pending.remove(call)
        tokens = max([_tokens(u)] + [_tokens(v) for v in stored])
        for acc, rows in zip(self._acc, self._group_rows(u)):
            step = max(1, self.BATCH_ELEMENTS // max(1, (rows.shape[1] * tokens) ** 2))
            for lo in range(0, len(rows), step):
                block = rows[lo:lo + step]
                k = pair_gram(u, u, block, self.materialize)
                for v in stored:
                    c = pair_gram(u, v, block, self.materialize)
                    k = k + c + c.mT
                acc[lo:lo + step] += k.to(acc.device)
        if pending:
            stored.append(_compact(u, pending))
        else:
            stored.clear()

    def clear(self) -> None:
        """Drop pending uses and kept factors (the sums stay)."""
        self._pending.clear()
        self._stored.clear()

    def _group_rows(self, u: Factor) -> list[Tensor]:
        """[G, R] row indices of each batch of equal-size groups, on u's device."""
        device = (u.g if isinstance(u, Dense) else u.h if isinstance(u, SoftmaxHead) else u.m).device
        if device not in self._rows:
            self._rows[device] = [torch.tensor([self.groups[i] for i in idx], dtype=torch.long, device=device)
                                  .view(len(idx), -1) for idx in self._batches]
        return self._rows[device]


def _tokens(u: Factor) -> int:
    """Positions per row of a factor (1 for a materialized one)."""
    return 1 if isinstance(u, Dense) else u.h.shape[1] if isinstance(u, SoftmaxHead) else u.m.shape[1]


def _compact(u: Factor, pending: list[Call]) -> Factor:
    """A dense-l factor that only embedding uses still wait for keeps just the columns their ids hit
    (e.g. a tied lm_head's D: [B, T, vocab] → [B, T, #distinct ids]; a softmax head computes only those)."""
    if isinstance(u, Dense) or (isinstance(u, Outer) and u.ids) or any(c.kind is not EMBEDDING for c in pending):
        return u
    device = u.h.device if isinstance(u, SoftmaxHead) else u.l.device
    ids = torch.cat([_first_input(c).flatten() for c in pending]).unique().to(device)
    return u.columns(ids) if isinstance(u, SoftmaxHead) else Outer(u.l[..., ids], u.m, ids)


# --- recording calls ---------------------------------------------------------------------------------

def sequence_mark() -> int:
    """Sequence number of a fresh autograd node (grad mode on); later nodes on this thread get larger."""
    return torch.zeros((), requires_grad=True).view(()).grad_fn._sequence_nr()


def in_backward() -> bool:
    """Whether this thread is running an autograd backward (e.g. a checkpointing recomputation)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _observing(hook: Callable) -> Callable:
    """A hook of a recorder that only observes: once the recorder has failed it does nothing; with an
    `on_error` handler, an exception is handed to it (the recorder fails) instead of reaching the
    forward or backward that ran the hook."""

    @wraps(hook)
    def guarded(self: CallRecorder, *args, **kwargs) -> None:
        if self.failed:
            return None
        try:
            hook(self, *args, **kwargs)
        except Exception as err:
            if self.on_error is None:
                raise
            self.fail(err)
        return None

    return guarded


def _detached(tree):
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _scan_graph(root: Tensor, ids: set[int]) -> tuple[list[tuple[object, Tensor]], list[Tensor]]:
    """Root's autograd graph: (consumer node, parameter) for every edge into a parameter in `ids`,
    and every other leaf tensor that requires a gradient."""
    uses, leaves, stack, seen = [], [], [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            raise MarginscopeError(
                "reentrant gradient checkpointing hides parameters from the autograd graph (and rejects "
                "autograd.grad); enable it with gradient_checkpointing_kwargs={'use_reentrant': False}")
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)
            if variable is None:
                stack.append(child)
            elif id(variable) in ids:
                uses.append((node, variable))
            elif child not in seen:
                seen.add(child)
                leaves.append(variable)
    return uses, leaves


def attributable_plan(model: nn.Module, scope: ParameterScope) -> Plan:
    """`plan_modules`'s plan; raises MarginscopeError naming every scope parameter it cannot attribute."""
    plan, problems = plan_modules(model, scope)
    if problems:
        listed = "; ".join(f"{n} ({why})" for n, why in problems.items())
        raise MarginscopeError(f"the ghost engine cannot attribute {listed}; use engine='exact'")
    return plan


@dataclass(eq=False)
class Recorded:
    """One recorded call with its output tensor, the output's version then, and its autograd span
    [start, end): the sequence numbers of the nodes its forward created."""

    call: Call
    output: Tensor
    version: int
    span: tuple[int, int]


class CallRecorder:
    """Forward hooks on the modules of `plan` that record every call made with grad enabled while the
    recorder is open, in forward order (`calls`): capture mode, which touches no tensor, for
    differentiating to the calls' outputs directly with `autograd.grad` (batched or not; tensor hooks
    do not fire under `is_grads_batched`). Every recorded call must see the same batch of rows, holding
    row `top_row`. Calls made while a backward runs (checkpointing recomputation) are not recorded.
    Hooks are removed on exit, also on error; the records stay.

    on_error: None (a hook's exception propagates into the forward or backward that ran it), or a
    handler that receives it instead; the recorder is then `failed` and its hooks do nothing more."""

    def __init__(self, model: nn.Module, scope: ParameterScope, plan: Plan, *, top_row: int = -1,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.model, self.scope, self.plan = model, scope, plan
        self.on_error = on_error
        self.failed = False
        self.calls: list[Recorded] = []
        self._top_row = top_row
        self._names = {id(p): n for n, p in zip(scope.names, scope.params)}
        self._sources: list[Tensor] = []  # hooked outputs whose inputs need no gradient
        self._spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self._starts: dict[nn.Module, int] = {}
        self._handles: list = []
        self._batch: int | None = None
        self._recording = False

    def __enter__(self) -> CallRecorder:
        self._recording = True
        try:
            for module, (kind, params) in self.plan.items():
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(module.register_forward_hook(
                    partial(self._post, kind=kind, params=params), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._recording = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fail(self, err: BaseException) -> None:
        """Stop observing and hand `err` to `on_error` (once)."""
        if self.failed:
            return
        self.failed, self._recording = True, False
        if self.on_error is not None:
            self.on_error(err)

    def stop_recording(self) -> None:
        """The backward has started: forward calls from now on are recomputations, not new uses."""
        self._recording = False

    def outputs(self, records: Sequence[Recorded]) -> list[Tensor]:
        """The records' output tensors; raises if one was modified in place after its call (autograd
        would differentiate to the modified value)."""
        for r in records:
            if r.output._version != r.version:
                raise MarginscopeError(
                    f"the output of {type(r.call.module).__name__} (which uses "
                    f"{self._names[id(r.call.params[0][1])]}) is modified in place after the call")
        return [r.output for r in records]

    def check_attribution(self, root: Tensor) -> list[Tensor]:
        """Raise unless every use of a scope parameter in root's graph happened inside a hooked call
        that attributes it; a direct functional use, a bypassed module (`module.forward(x)`) or
        reentrant checkpointing would otherwise be missed silently. Call between forward and backward.

        Returns what to differentiate root by so that every hooked output gets its gradient while no
        parameter gradient is computed: the hooked outputs whose inputs need none and
        every other leaf of the graph that requires one (e.g. HF's `enable_input_require_grads`).
        Each hooked output depends on one of them: its inputs come from earlier hooked outputs (all
        uses of scope parameters are inside hooked calls), from such leaves, or need no gradient."""
        uses, leaves = _scan_graph(root, set(self._names))
        for node, param in uses:
            seq = node._sequence_nr()
            if not any(lo <= seq < hi for lo, hi in self._spans[id(param)]):
                raise MarginscopeError(
                    f"{self._names[id(param)]} is used outside the modules the ghost engine hooks (e.g. "
                    f"directly in a functional op, by {node.name()}); use engine='exact'")
        return self._sources + leaves

    def _recordable(self) -> bool:
        return self._recording and torch.is_grad_enabled() and not in_backward()

    @_observing
    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self._recordable():
            self._starts[module] = sequence_mark() + 1

    @_observing
    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out, *, kind: Kind,
              params: list[tuple[str, nn.Parameter]]) -> None:
        if not self._recordable():
            return
        if not isinstance(out, Tensor):
            raise MarginscopeError(
                f"{self._names[id(params[0][1])]}: {type(module).__name__} returns {type(out).__name__}, "
                "not one tensor; the ghost engine cannot attribute its parameters; use engine='exact'")
        if not out.requires_grad:
            return
        broadcast = self._broadcast(out, kind)
        if not broadcast:
            self._check_batch(out.shape[0], module)
        call = Call(module, kind, params, _detached(args), _detached(kwargs))
        span = (self._starts.pop(module), sequence_mark())
        for _, p in params:
            self._spans[id(p)].append(span)
        if not any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves((args, kwargs))):
            self._sources.append(out)
        (self._record_broadcast if broadcast else self._record)(call, out, span)

    def _record(self, call: Call, out: Tensor, span: tuple[int, int]) -> None:
        self.calls.append(Recorded(call, out, out._version, span))

    def _broadcast(self, out: Tensor, kind: Kind) -> bool:
        """Whether a call is made on one row for the whole batch (see `GhostCollector`); never here."""
        return False

    def _record_broadcast(self, call: Call, out: Tensor, span: tuple[int, int]) -> None:
        raise NotImplementedError

    def _check_batch(self, batch: int, module: nn.Module) -> None:
        self._batch = batch if self._batch is None else self._batch
        if batch != self._batch or self._top_row >= batch:
            raise MarginscopeError(
                f"{type(module).__name__} saw a batch of {batch} rows; every hooked call must see the "
                f"same batch ({self._batch} rows), holding every group row (up to {self._top_row})")


# --- the collector -----------------------------------------------------------------------------------

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
    2·T² > d_in·d_out), True or False forces materialized or ghost contraction of dense factors.

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
        params = [(a, p) for a in ("weight", "bias")
                  if isinstance(p := getattr(head.module, a, None), nn.Parameter) and id(p) in names]
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
