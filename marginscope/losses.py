"""The loss zoo in margin form: per-pair preference losses and a registry.

Every loss is a per-pair callable

    loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l) -> Tensor[B]

over tensors of shape [B]: `logp_*` the policy's sequence log-prob sums of the chosen (w) and
rejected (l) responses, `ref_*` the reference model's (constants), `len_*` the response token counts
(float). It returns the per-pair loss (no mean), differentiable in `logp_w` and `logp_l`, so it can
be used directly as a training loss. Below r_w = logp_w − ref_w and r_l = logp_l − ref_l are the
log-ratios, σ the logistic function, and the margin-form coefficients are
d_w = −∂ℓ/∂logp_w, d_l = +∂ℓ/∂logp_l (margin-pitfalls, eq. 8 and Table 2).

    import marginscope as ms
    loss = ms.losses.get("dpo", beta=0.1)          # dpo(beta=0.1)
    loss = ms.losses.trl_loss(["sigmoid", "sft"], beta=0.1, loss_weights=[1.0, 0.5])

TRL `loss_type` names are registered under TRL's own names, except TRL's length-normalized 'ipo',
which is `trl-ipo` here (`ipo` is the paper's sequence-sum form); `trl_loss` does this mapping.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MarginscopeError

PairFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class PairLoss:
    """A per-pair loss with its name and hyper-parameters; call it like the function it wraps."""

    name: str
    hparams: dict[str, Any]
    fn: PairFn = field(repr=False)
    uses_reference: bool = True
    doc: str = ""

    def __call__(self, logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor,
                 len_w: Tensor, len_l: Tensor) -> Tensor:
        return self.fn(logp_w, logp_l, ref_w, ref_l, len_w, len_l)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class _Spec:
    factory: Callable[..., PairFn]
    defaults: dict[str, Any]
    uses_reference: bool
    doc: str


_REGISTRY: dict[str, _Spec] = {}
_TRL: dict[str, _Spec] = {}  # TRL loss_type -> spec, fixed at import (unaffected by register)


def _builtin(name: str | None, *, uses_reference: bool, trl: str | None = None, **defaults: Any):
    """Register a built-in factory under `name` (and/or as TRL's `trl` loss type)."""
    def deco(factory: Callable[..., PairFn]) -> Callable[..., PairFn]:
        spec = _Spec(factory, defaults, uses_reference, inspect.getdoc(factory) or "")
        if name is not None:
            _REGISTRY[name] = spec
        if trl is not None:
            _TRL[trl] = spec
        return factory
    return deco


def _build(name: str, spec: _Spec, hparams: dict[str, Any]) -> PairLoss:
    unknown = [k for k in hparams if k not in spec.defaults]
    if unknown:
        accepted = ", ".join(spec.defaults) or "none"
        raise MarginscopeError(f"loss '{name}' has no hyper-parameter '{unknown[0]}'; accepted: {accepted}")
    values = {**spec.defaults, **hparams}
    return PairLoss(name, values, spec.factory(**values), spec.uses_reference, spec.doc)


def names() -> list[str]:
    """Registered loss names, built-ins first in the order of the module docstrings."""
    return list(_REGISTRY)


def get(name: str, **hparams: Any) -> PairLoss:
    """The registered loss `name` with `hparams` overriding its defaults (`get("dpo").hparams == {"beta": 0.1}`)."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise MarginscopeError(f"unknown loss '{name}'; known: {', '.join(_REGISTRY)}")
    return _build(name, spec, hparams)


def _takes_pair_args(obj: Callable) -> bool:
    try:
        inspect.signature(obj).bind(*range(6))
    except TypeError:
        return False
    except ValueError:  # no introspectable signature: treat as a per-pair function
        return True
    return True


def register(name: str, fn_or_factory: Callable, *, defaults: dict[str, Any] | None = None,
             doc: str | None = None, uses_reference: bool = True, overwrite: bool = False) -> None:
    """Register a user's loss under `name` so `get(name, **hparams)` builds it.

    `fn_or_factory` is either a per-pair function (it accepts the six tensors positionally; the
    hyper-parameters, if any, are passed to it as keywords on every call) or a factory called once as
    `factory(**hparams)` that returns the per-pair function. `defaults` lists every accepted
    hyper-parameter with its default. Overriding an existing name raises unless `overwrite=True`.
    """
    if name in _REGISTRY and not overwrite:
        raise MarginscopeError(f"loss '{name}' is already registered; pass overwrite=True to replace it")
    factory = partial(partial, fn_or_factory) if _takes_pair_args(fn_or_factory) else fn_or_factory
    _REGISTRY[name] = _Spec(factory, dict(defaults or {}), uses_reference,
                            doc if doc is not None else inspect.getdoc(fn_or_factory) or "")


# --- losses of margin-pitfalls Table 2 and the seed papers -------------------------------------


@_builtin("dpo", uses_reference=True, beta=0.1)
def _dpo(beta: float) -> PairFn:
    """DPO: ℓ = −log σ(β(r_w − r_l)).

    beta (0.1): inverse temperature. Rafailov et al. 2023, "Direct Preference Optimization".
    d_w = d_l = β·σ(−β(r_w − r_l)).
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return -F.logsigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)))
    return loss


@_builtin("r-dpo", uses_reference=True, beta=0.1, alpha=0.01)
def _r_dpo(beta: float, alpha: float) -> PairFn:
    """R-DPO: ℓ = −log σ(β(r_w − r_l) − α(|y_w| − |y_l|)).

    beta (0.1), alpha (0.01): length-regularization weight. Park et al. 2024, "Disentangling
    Length from Quality in Direct Preference Optimization". d_w = d_l.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return -F.logsigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)) - alpha * (len_w - len_l))
    return loss


@_builtin("simpo", uses_reference=False, beta=2.0, gamma=1.0)
def _simpo(beta: float, gamma: float) -> PairFn:
    """SimPO: ℓ = −log σ(β/|y_w|·logp_w − β/|y_l|·logp_l − γ); no reference model.

    beta (2.0), gamma (1.0): target reward margin. Meng et al. 2024, "SimPO: Simple Preference
    Optimization with a Reference-Free Reward". d_w/d_l = |y_l|/|y_w|.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return -F.logsigmoid(beta * logp_w / len_w - beta * logp_l / len_l - gamma)
    return loss


@_builtin("ipo", uses_reference=True, beta=0.1)
def _ipo(beta: float) -> PairFn:
    """IPO (paper form, sequence sums): ℓ = (r_w − r_l − 1/(2β))².

    beta (0.1): the regularization τ of the paper. Azar et al. 2023, "A General Theoretical
    Paradigm to Understand Learning from Human Preferences" (as in margin-pitfalls Table 2).
    TRL's 'ipo' divides each log-ratio by the response length: that is `trl-ipo` here.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return ((logp_w - ref_w) - (logp_l - ref_l) - 1.0 / (2.0 * beta)) ** 2
    return loss


@_builtin("rrhf", uses_reference=False, lam=1.0)
def _rrhf(lam: float) -> PairFn:
    """RRHF: ℓ = max(0, logp_l/|y_l| − logp_w/|y_w|) − λ·logp_w.

    lam (1.0): weight of the SFT term on the chosen response. Yuan et al. 2023, "RRHF: Rank
    Responses to Align Language Models with Human Feedback".
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return torch.relu(logp_l / len_l - logp_w / len_w) - lam * logp_w
    return loss


@_builtin("slic-hf", uses_reference=False, delta=1.0, lam=0.1)
def _slic_hf(delta: float, lam: float) -> PairFn:
    """SLiC-HF: ℓ = max(0, δ − (logp_w − logp_l)) − λ·logp_w.

    delta (1.0): calibration margin, lam (0.1): SFT weight. Zhao et al. 2023, "SLiC-HF: Sequence
    Likelihood Calibration with Human Feedback".
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return torch.relu(delta - (logp_w - logp_l)) - lam * logp_w
    return loss


@_builtin("cpo", uses_reference=False, beta=0.1, lam=1.0)
def _cpo(beta: float, lam: float) -> PairFn:
    """CPO: ℓ = −log σ(β(logp_w − logp_l)) − λ·logp_w.

    beta (0.1), lam (1.0): weight of the NLL term. Xu et al. 2024, "Contrastive Preference
    Optimization".
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return -F.logsigmoid(beta * (logp_w - logp_l)) - lam * logp_w
    return loss


@_builtin("dpop", uses_reference=True, beta=0.1, lam=50.0)
def _dpop(beta: float, lam: float) -> PairFn:
    """DPO-Positive: ℓ = −log σ(β[(r_w − r_l) − λ·max(0, ref_w − logp_w)]).

    beta (0.1), lam (50.0): penalty on the chosen log-prob falling below the reference. Pal et al.
    2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive".
    d_w/d_l = 1 while logp_w ≥ ref_w, 1 + λ below it.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        margin = (logp_w - ref_w) - (logp_l - ref_l) - lam * torch.relu(ref_w - logp_w)
        return -F.logsigmoid(beta * margin)
    return loss


@_builtin("kto", uses_reference=True, beta=0.1, lam_w=1.0, lam_l=1.0, z_ref=0.0)
def _kto(beta: float, lam_w: float, lam_l: float, z_ref: float) -> PairFn:
    """Paired KTO: ℓ = λ_w(1 − σ(β r_w − z_ref)) + λ_l(1 − σ(z_ref − β r_l)).

    beta (0.1), lam_w (1.0), lam_l (1.0): desirable/undesirable weights, z_ref (0.0): the KL
    baseline, a constant here (detached in KTO). Ethayarajh et al. 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization". d_w/d_l = λ_w σ'(β r_w − z)/(λ_l σ'(z − β r_l)).
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return (lam_w * torch.sigmoid(z_ref - beta * (logp_w - ref_w))
                + lam_l * torch.sigmoid(beta * (logp_l - ref_l) - z_ref))
    return loss


@_builtin("sppo", uses_reference=True, beta=0.1)
def _sppo(beta: float) -> PairFn:
    """SPPO (hard labels): ℓ = (r_w − 1/β)² + (r_l + 1/β)².

    beta (0.1, so the target β⁻¹ = 10). Wu et al. 2024, "Self-Play Preference Optimization for
    Language Model Alignment"; with ref = 0 this is margin-pitfalls appendix A.1, where
    d_w/d_l = (β⁻¹ − logp_w)/(β⁻¹ + logp_l). TRL's `sppo_hard` uses the target 1/(2β) instead.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return ((logp_w - ref_w) - 1.0 / beta) ** 2 + ((logp_l - ref_l) + 1.0 / beta) ** 2
    return loss


@_builtin("spo", uses_reference=True, beta=0.1)
def _spo(beta: float) -> PairFn:
    """Stable preference loss: X = β(r_w − r_l), ℓ = −X·e^{−X}.

    beta (0.1). Minimum at X = 1, so d_w = d_l = β(1 − X)e^{−X} changes sign past the target
    (spo-stable-loss, eq. 6).
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        x = beta * ((logp_w - ref_w) - (logp_l - ref_l))
        return -x * torch.exp(-x)
    return loss


@_builtin("alpha-dpo", uses_reference=True, beta=2.5, gamma=0.3, alpha=0.05)
def _alpha_dpo(beta: float, gamma: float, alpha: float) -> PairFn:
    """α-DPO: ℓ = −log σ(u − sg[γ + α·M*]), u = β/|y_w|·logp_w − β/|y_l|·logp_l.

    M = r_w − r_l and M* its z-score over the B pairs of the call (mean and unbiased std; M* = 0
    when B == 1 or the std is 0); sg = stop-gradient, so d_w/d_l = |y_l|/|y_w| exactly. The paper's
    M carries a factor β, which the z-score removes; its code keeps a running mean/std across steps,
    this per-call batch statistic is the stateless version. beta (2.5), gamma (0.3), alpha (0.05).
    Wu et al. 2024, "α-DPO: Adaptive Reward Margin is What Direct Preference Optimization Needs",
    eq. 12.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        u = beta * logp_w / len_w - beta * logp_l / len_l
        with torch.no_grad():
            m = ((logp_w - ref_w) - (logp_l - ref_l)).to(torch.float64)
            std = m.std() if m.numel() > 1 else m.new_zeros(())
            z = torch.where(std > 0, (m - m.mean()) / std, torch.zeros_like(m)).to(u.dtype)
        return -F.logsigmoid(u - (gamma + alpha * z))
    return loss


def _chosen_nll(logp_w: Tensor, len_w: Tensor) -> Tensor:
    """Token-mean NLL of the chosen response, −logp_w/|y_w|."""
    return -logp_w / len_w


@_builtin("bilevel-spo", uses_reference=True, beta=0.1, lam=1.0)
def _bilevel_spo(beta: float, lam: float) -> PairFn:
    """Bilevel stable preference optimization as a loss: ℓ = −log σ(β(r_w − r_l)) + λ·(−logp_w/|y_w|).

    beta (0.1), lam (1.0): weight of the SFT (token-mean NLL) loss on the chosen response. The
    bilevel "Stable Preference Optimization" paper (spo-bilevel-probability-dynamics); its
    Corollary-1 hinge on ‖a_l‖ − ‖a_w‖ is a gradient-norm diagnostic
    (`dynamics.probability_dynamics`), not part of this loss.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        dpo = -F.logsigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)))
        return dpo + lam * _chosen_nll(logp_w, len_w)
    return loss


# --- TRL DPOTrainer loss types (trl/trainer/dpo_trainer.py, f_divergence_type="reverse_kl") -----


@_builtin("sigmoid", uses_reference=True, trl="sigmoid", beta=0.1)
def _trl_sigmoid(beta: float) -> PairFn:
    """TRL 'sigmoid': ℓ = −log σ(β(r_w − r_l)), i.e. DPO.

    beta (0.1). TRL's 'sigmoid' ignores `label_smoothing` (use 'robust' for conservative DPO).
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return -F.logsigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l)))
    return loss


@_builtin("hinge", uses_reference=True, trl="hinge", beta=0.1)
def _trl_hinge(beta: float) -> PairFn:
    """TRL 'hinge': ℓ = max(0, 1 − β(r_w − r_l)). beta (0.1). SLiC (Zhao et al. 2023) with a reference."""
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return torch.relu(1.0 - beta * ((logp_w - ref_w) - (logp_l - ref_l)))
    return loss


@_builtin("trl-ipo", uses_reference=True, trl="ipo", beta=0.1)
def _trl_ipo(beta: float) -> PairFn:
    """TRL 'ipo' (length-normalized): ℓ = (r_w/|y_w| − r_l/|y_l| − 1/(2β))², lengths clamped to ≥ 1.

    beta (0.1): IPO's τ. TRL divides each log-ratio by its completion length (confirmed with the IPO
    authors, per TRL's source); TRL's loss_type 'ipo' maps here, the paper's sequence-sum form is `ipo`.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        delta = (logp_w - ref_w) / len_w.clamp(min=1.0) - (logp_l - ref_l) / len_l.clamp(min=1.0)
        return (delta - 1.0 / (2.0 * beta)) ** 2
    return loss


@_builtin("exo_pair", uses_reference=True, trl="exo_pair", beta=0.1, label_smoothing=1e-3)
def _trl_exo_pair(beta: float, label_smoothing: float) -> PairFn:
    """TRL 'exo_pair' (EXO-pref, Ji et al. 2024, eq. 16): with x = β(r_w − r_l), ε = label_smoothing,

    ℓ = σ(x)(log σ(x) − log(1 − ε)) + σ(−x)(log σ(−x) − log ε).
    beta (0.1), label_smoothing (1e-3, the EXO paper's value; must be > 0, as TRL requires).
    """
    if not label_smoothing > 0.0:
        raise MarginscopeError("loss 'exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    log_pw, log_pl = math.log1p(-label_smoothing), math.log(label_smoothing)

    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        x = beta * ((logp_w - ref_w) - (logp_l - ref_l))
        return (torch.sigmoid(x) * (F.logsigmoid(x) - log_pw)
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - log_pl))
    return loss


@_builtin("nca_pair", uses_reference=True, trl="nca_pair", beta=0.1)
def _trl_nca_pair(beta: float) -> PairFn:
    """TRL 'nca_pair' (NCA, Chen et al. 2024): ℓ = −log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l). beta (0.1)."""
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        rw, rl = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
        return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return loss


@_builtin("robust", uses_reference=True, trl="robust", beta=0.1, label_smoothing=0.0)
def _trl_robust(beta: float, label_smoothing: float) -> PairFn:
    """TRL 'robust' (rDPO, Chowdhury et al. 2024): with x = β(r_w − r_l), ε = label_smoothing,

    ℓ = (−(1 − ε) log σ(x) + ε log σ(−x)) / (1 − 2ε).
    beta (0.1), label_smoothing (0.0, TRL's default: then ℓ is DPO; the paper suggests 0.1; ε < 0.5).
    """
    eps = label_smoothing

    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        x = beta * ((logp_w - ref_w) - (logp_l - ref_l))
        return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)
    return loss


@_builtin("bco_pair", uses_reference=True, trl="bco_pair", beta=0.1)
def _trl_bco_pair(beta: float) -> PairFn:
    """TRL 'bco_pair' (BCO, Jung et al. 2024), current TRL form without a running reward mean:

    ℓ = −log σ(β r_w) − log σ(−β r_l). beta (0.1).
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return -F.logsigmoid(beta * (logp_w - ref_w)) - F.logsigmoid(-beta * (logp_l - ref_l))
    return loss


@_builtin("sppo_hard", uses_reference=True, trl="sppo_hard", beta=0.1)
def _trl_sppo_hard(beta: float) -> PairFn:
    """TRL 'sppo_hard' (SPPO with hard labels, Wu et al. 2024): ℓ = (r_w − 1/(2β))² + (r_l + 1/(2β))². beta (0.1)."""
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return ((logp_w - ref_w) - 0.5 / beta) ** 2 + ((logp_l - ref_l) + 0.5 / beta) ** 2
    return loss


@_builtin("apo_zero", uses_reference=True, trl="apo_zero", beta=0.1)
def _trl_apo_zero(beta: float) -> PairFn:
    """TRL 'apo_zero' (APO, D'Oosterlinck et al. 2024, eq. 7): ℓ = 1 − σ(β r_w) + σ(β r_l). beta (0.1)."""
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return 1.0 - torch.sigmoid(beta * (logp_w - ref_w)) + torch.sigmoid(beta * (logp_l - ref_l))
    return loss


@_builtin("apo_down", uses_reference=True, trl="apo_down", beta=0.1)
def _trl_apo_down(beta: float) -> PairFn:
    """TRL 'apo_down' (APO, eq. 8): ℓ = σ(β r_w) + 1 − σ(β(r_w − r_l)). beta (0.1)."""
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        rw, rl = logp_w - ref_w, logp_l - ref_l
        return torch.sigmoid(beta * rw) + 1.0 - torch.sigmoid(beta * (rw - rl))
    return loss


@_builtin("discopop", uses_reference=True, trl="discopop", beta=0.1, discopop_tau=0.05)
def _trl_discopop(beta: float, discopop_tau: float) -> PairFn:
    """TRL 'discopop' (DiscoPOP, Chris Lu et al. 2024, eq. 5): with x = β(r_w − r_l), m = σ(x/τ),

    ℓ = −log σ(x)·(1 − m) + e^{−x}·m. beta (0.1), discopop_tau (0.05).
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        x = beta * ((logp_w - ref_w) - (logp_l - ref_l))
        m = torch.sigmoid(x / discopop_tau)
        return -F.logsigmoid(x) * (1.0 - m) + torch.exp(-x) * m
    return loss


@_builtin("sigmoid_norm", uses_reference=True, trl="sigmoid_norm", beta=0.1)
def _trl_sigmoid_norm(beta: float) -> PairFn:
    """TRL 'sigmoid_norm': ℓ = −log σ(β(r_w/|y_w| − r_l/|y_l|)), lengths clamped to ≥ 1. beta (0.1)."""
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        delta = (logp_w - ref_w) / len_w.clamp(min=1.0) - (logp_l - ref_l) / len_l.clamp(min=1.0)
        return -F.logsigmoid(beta * delta)
    return loss


@_builtin(None, uses_reference=False, trl="sft")
def _trl_sft() -> PairFn:
    """TRL 'sft' per pair: ℓ = −logp_w/|y_w|, the token-mean NLL of the chosen response.

    TRL averages the NLL over all chosen tokens of the batch (Σ logp_w / Σ |y_w|), which weights
    pairs by length; the per-pair form equals it when all chosen responses have the same length.
    """
    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return _chosen_nll(logp_w, len_w)
    return loss


_TRL_BATCH_COUPLED = {
    "aot": "it sorts the log-ratios across the batch, so a pair's loss depends on the other pairs",
    "aot_unpaired": "it sorts chosen and rejected log-ratios across the batch separately, "
                    "pairing different examples",
}


def trl_loss(loss_type: str | list[str], beta: float = 0.1, loss_weights: list[float] | None = None,
             *, label_smoothing: float = 0.0, discopop_tau: float = 0.05, f_divergence_type: str = "reverse_kl",
             use_weighting: bool = False, ld_alpha: float | None = None) -> PairLoss:
    """The per-pair loss of a `trl.DPOConfig`: Σ_k loss_weights[k]·ℓ_{loss_type[k]}.

    Arguments mirror DPOConfig fields and defaults. TRL's 'ipo' is the length-normalized `trl-ipo`.
    'sft' is −logp_w/|y_w| per pair, whereas TRL averages the NLL over all chosen tokens of the batch
    (the two agree when the chosen responses have equal lengths). Raises
    MarginscopeError for 'aot'/'aot_unpaired' (not per-pair), for 'exo_pair' with label_smoothing 0
    (TRL raises too), and for settings that change what TRL feeds the loss: a non-reverse_kl
    f-divergence, WPO weighting (`use_weighting`) and LD-DPO (`ld_alpha`).
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise MarginscopeError("loss_type is empty; TRL's default is 'sigmoid'")
    weights = [1.0] * len(types) if loss_weights is None else [float(x) for x in loss_weights]
    if len(weights) != len(types):
        raise MarginscopeError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    if f_divergence_type != "reverse_kl":
        raise MarginscopeError(f"f_divergence_type '{f_divergence_type}' is not supported; "
                               "marginscope's TRL losses follow TRL's default 'reverse_kl'")
    if use_weighting:
        raise MarginscopeError("use_weighting=True (WPO) scales each pair by the policy's token probabilities, "
                               "which a per-pair loss of sequence log-probs cannot express")
    if ld_alpha is not None:
        raise MarginscopeError("ld_alpha (LD-DPO) reweights the tokens in TRL's sequence log-probs; "
                               "marginscope scores plain sums, so its coefficients would not match")
    available = {"beta": beta, "label_smoothing": label_smoothing, "discopop_tau": discopop_tau}
    parts: list[tuple[float, PairFn]] = []
    for t, weight in zip(types, weights):
        if t in _TRL_BATCH_COUPLED:
            raise MarginscopeError(f"TRL loss_type '{t}' is not a per-pair loss: {_TRL_BATCH_COUPLED[t]}")
        if t not in _TRL:
            raise MarginscopeError(f"unknown TRL loss_type '{t}'; known: {', '.join([*_TRL, *_TRL_BATCH_COUPLED])}")
        spec = _TRL[t]
        parts.append((weight, spec.factory(**{k: available[k] for k in spec.defaults})))

    def loss(logp_w, logp_l, ref_w, ref_l, len_w, len_l):
        return sum(w * fn(logp_w, logp_l, ref_w, ref_l, len_w, len_l) for w, fn in parts)

    hparams: dict[str, Any] = {"loss_type": types, "loss_weights": weights, "beta": beta}
    if "robust" in types or "exo_pair" in types:
        hparams["label_smoothing"] = label_smoothing
    if "discopop" in types:
        hparams["discopop_tau"] = discopop_tau
    return PairLoss("trl", hparams, loss, any(_TRL[t].uses_reference for t in types),
                    trl_loss.__doc__ or "")
