"""The loss zoo: formulas at hand-computed points, defaults, registry, and TRL's loss types."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

from marginscope import losses
from marginscope.errors import MarginscopeError


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def nls(x: float) -> float:
    """−log σ(x)."""
    return math.log1p(math.exp(-x))


def ev(loss, lw, ll, rw, rl, nw=1.0, nl=1.0) -> float:
    """The loss of one pair, evaluated in float64."""
    t = [torch.tensor([v], dtype=torch.float64) for v in (lw, ll, rw, rl, nw, nl)]
    out = loss(*t)
    assert out.shape == (1,)
    return out.item()


# (name, hparams, point (logp_w, logp_l, ref_w, ref_l, len_w, len_l), expected)
CASES = [
    ("dpo", {}, (-5, -7, -6, -6, 1, 1), nls(0.2)),
    ("dpo", {"beta": 0.5}, (-10, -8, -9, -9, 1, 1), nls(-1.0)),
    ("r-dpo", {}, (-5, -7, -6, -6, 5, 3), nls(0.2 - 0.02)),
    ("r-dpo", {"alpha": 0.1}, (-5, -7, -6, -6, 2, 6), nls(0.2 + 0.4)),
    ("simpo", {}, (-10, -12, 0, 0, 5, 4), nls(2 * -2 - 2 * -3 - 1)),
    ("simpo", {"beta": 1.0, "gamma": 0.5}, (-6, -6, 99, 99, 3, 2), nls(-2 + 3 - 0.5)),
    ("ipo", {}, (-5, -7, -6, -6, 10, 10), 9.0),
    ("ipo", {"beta": 0.25}, (-5, -7, -6, -6, 1, 1), 0.0),
    ("ipo", {"beta": 0.5}, (-6.5, -6, -6, -6.5, 1, 1), 4.0),
    ("rrhf", {}, (-6, -4, 0, 0, 3, 4), 1.0 + 6.0),
    ("rrhf", {"lam": 0.5}, (-2, -9, 0, 0, 2, 3), 0.0 + 1.0),
    ("slic-hf", {}, (-5, -5.5, 0, 0, 1, 1), 0.5 + 0.5),
    ("slic-hf", {}, (-3, -8, 0, 0, 1, 1), 0.0 + 0.3),
    ("cpo", {}, (-5, -7, 0, 0, 1, 1), nls(0.2) + 5.0),
    ("cpo", {"beta": 1.0, "lam": 0.0}, (-7, -5, 0, 0, 1, 1), nls(-2.0)),
    ("dpop", {}, (-5, -7, -6, -6, 1, 1), nls(0.2)),
    ("dpop", {}, (-6.1, -8, -6, -6, 1, 1), nls(0.1 * (1.9 - 50 * 0.1))),
    ("kto", {}, (-5, -7, -6, -6, 1, 1), 2 * (1 - sig(0.1))),
    ("kto", {"lam_w": 2.0, "lam_l": 0.5, "z_ref": 0.05}, (-8, -3, -6, -6, 1, 1),
     2 * (1 - sig(-0.2 - 0.05)) + 0.5 * (1 - sig(0.05 - 0.3))),
    ("sppo", {}, (-3, -4, 0, 0, 1, 1), 13.0 ** 2 + 6.0 ** 2),
    ("sppo", {"beta": 0.5}, (-5, -7, -6, -6, 1, 1), 2.0),
    ("spo", {}, (-5, -7, -6, -6, 1, 1), -0.2 * math.exp(-0.2)),
    ("spo", {}, (-1, -11, 0, 0, 1, 1), -math.exp(-1.0)),
    ("spo", {}, (-9, -4, 0, 0, 1, 1), 0.5 * math.exp(0.5)),
    ("alpha-dpo", {}, (-4, -6, -5, -6, 2, 3), nls(0.0 - 0.3)),  # B == 1: M* = 0
    ("bilevel-spo", {}, (-5, -7, -6, -6, 5, 2), nls(0.2) + 1.0),
    ("bilevel-spo", {"lam": 0.5}, (-6, -7, -6, -6, 3, 2), nls(0.1) + 0.5 * 2.0),
]


@pytest.mark.parametrize(("name", "hparams", "point", "expected"), CASES)
def test_formula_at_hand_computed_points(name, hparams, point, expected):
    assert ev(losses.get(name, **hparams), *point) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_alpha_dpo_uses_batch_z_score_of_the_margin():
    # margins M = r_w - r_l = 1, 2, 3: mean 2, unbiased std 1, so M* = -1, 0, 1
    lw = torch.tensor([-4.0, -3.0, -2.0], dtype=torch.float64)
    ll = torch.full((3,), -6.0, dtype=torch.float64)
    rw, rl = torch.full((3,), -5.0, dtype=torch.float64), torch.full((3,), -6.0, dtype=torch.float64)
    nw, nl = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 2.0, 6.0], dtype=torch.float64)
    out = losses.get("alpha-dpo")(lw, ll, rw, rl, nw, nl)
    # u = 2.5 lw/nw - 2.5 ll/nl = 0, 5, -2.5; shift = 0.3 + 0.05 M*
    expected = [nls(0.0 - 0.25), nls(5.0 - 0.3), nls(-2.5 - 0.35)]
    assert out.tolist() == pytest.approx(expected, rel=1e-12)
    # identical margins: std 0, so M* = 0 for every pair
    same = losses.get("alpha-dpo")(lw, ll + (lw + 4.0), rw, rl, nw, nl)
    u = [2.5 * (lw[i].item() / nw[i].item() - (ll[i].item() + lw[i].item() + 4.0) / nl[i].item()) for i in range(3)]
    assert same.tolist() == pytest.approx([nls(x - 0.3) for x in u], rel=1e-12)


# TRL loss types, re-derived from trl/trainer/dpo_trainer.py (_compute_loss, reverse_kl) at fixed
# points. Point P: r_w = 1, r_l = -1 (delta 2), lengths 2 and 4.
P = (-5, -7, -6, -6, 2, 4)
EPS = 1e-3
TRL_CASES = [
    ("sigmoid", {}, P, nls(0.2)),
    ("hinge", {}, P, 1 - 0.2),
    ("hinge", {}, (0, -15, 0, 0, 1, 1), 0.0),
    ("trl-ipo", {}, P, (1 / 2 + 1 / 4 - 5) ** 2),
    ("trl-ipo", {"beta": 0.5}, (-5, -7, -6, -6, 0, 4), (1 / 1 + 1 / 4 - 1) ** 2),  # length 0 clamped to 1
    ("exo_pair", {}, P, sig(0.2) * (-nls(0.2) - math.log(1 - EPS)) + sig(-0.2) * (-nls(-0.2) - math.log(EPS))),
    ("exo_pair", {"label_smoothing": 0.1, "beta": 1.0}, P,
     sig(2.0) * (-nls(2.0) - math.log(0.9)) + sig(-2.0) * (-nls(-2.0) - math.log(0.1))),
    ("nca_pair", {}, P, nls(0.1) + 0.5 * nls(-0.1) + 0.5 * nls(0.1)),
    ("robust", {}, P, nls(0.2)),
    ("robust", {"label_smoothing": 0.1}, P, (0.9 * nls(0.2) - 0.1 * nls(-0.2)) / 0.8),
    ("bco_pair", {}, P, 2 * nls(0.1)),
    ("sppo_hard", {}, P, (1 - 5) ** 2 + (-1 + 5) ** 2),
    ("apo_zero", {}, P, 1 - sig(0.1) + sig(-0.1)),
    ("apo_down", {}, P, sig(0.1) + 1 - sig(0.2)),
    ("discopop", {}, P, nls(0.2) * (1 - sig(0.2 / 0.05)) + math.exp(-0.2) * sig(0.2 / 0.05)),
    ("discopop", {"discopop_tau": 1.0, "beta": 1.0}, (-7, -5, -6, -6, 1, 1),
     nls(-2.0) * (1 - sig(-2.0)) + math.exp(2.0) * sig(-2.0)),
    ("sigmoid_norm", {}, P, nls(0.1 * (1 / 2 + 1 / 4))),
]


@pytest.mark.parametrize(("name", "hparams", "point", "expected"), TRL_CASES)
def test_trl_loss_types_match_trl_formulas(name, hparams, point, expected):
    assert ev(losses.get(name, **hparams), *point) == pytest.approx(expected, rel=1e-12, abs=1e-12)


EXPECTED_DEFAULTS = {
    "dpo": {"beta": 0.1},
    "r-dpo": {"beta": 0.1, "alpha": 0.01},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "ipo": {"beta": 0.1},
    "rrhf": {"lam": 1.0},
    "slic-hf": {"delta": 1.0, "lam": 0.1},
    "cpo": {"beta": 0.1, "lam": 1.0},
    "dpop": {"beta": 0.1, "lam": 50.0},
    "kto": {"beta": 0.1, "lam_w": 1.0, "lam_l": 1.0, "z_ref": 0.0},
    "sppo": {"beta": 0.1},
    "spo": {"beta": 0.1},
    "alpha-dpo": {"beta": 2.5, "gamma": 0.3, "alpha": 0.05},
    "bilevel-spo": {"beta": 0.1, "lam": 1.0},
    "sigmoid": {"beta": 0.1},
    "hinge": {"beta": 0.1},
    "trl-ipo": {"beta": 0.1},
    "exo_pair": {"beta": 0.1, "label_smoothing": 1e-3},
    "nca_pair": {"beta": 0.1},
    "robust": {"beta": 0.1, "label_smoothing": 0.0},
    "bco_pair": {"beta": 0.1},
    "sppo_hard": {"beta": 0.1},
    "apo_zero": {"beta": 0.1},
    "apo_down": {"beta": 0.1},
    "discopop": {"beta": 0.1, "discopop_tau": 0.05},
    "sigmoid_norm": {"beta": 0.1},
}


def test_names_and_default_hparams():
    assert losses.names() == list(EXPECTED_DEFAULTS)
    for name, defaults in EXPECTED_DEFAULTS.items():
        loss = losses.get(name)
        assert loss.name == name and loss.hparams == defaults, name
        assert loss.doc, name


def test_repr_and_overrides():
    assert repr(losses.get("dpo")) == "dpo(beta=0.1)"
    loss = losses.get("simpo", gamma=0.5)
    assert repr(loss) == "simpo(beta=2.0, gamma=0.5)"
    assert loss.hparams == {"beta": 2.0, "gamma": 0.5}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_uses_reference():
    no_ref = {n for n in losses.names() if not losses.get(n).uses_reference}
    assert no_ref == {"simpo", "rrhf", "slic-hf", "cpo"}
    # and the flag is true to the formula: a reference-free loss ignores ref_w/ref_l
    lw, ll, nw, nl = t(-5.0, -4.0, -9.0), t(-7.0, -8.0, -3.0), t(3.0, 2.0, 5.0), t(4.0, 4.0, 1.0)
    for name in losses.names():
        a = losses.get(name)(lw, ll, t(-6.0, -6.0, -6.0), t(-6.0, -6.0, -6.0), nw, nl)
        b = losses.get(name)(lw, ll, t(-2.0, -5.0, -8.0), t(-9.0, -1.0, -4.0), nw, nl)
        assert torch.equal(a, b) == (name in no_ref), name


def test_unknown_name_and_hparam():
    with pytest.raises(MarginscopeError, match=r"unknown loss 'dpoo'.*dpo, r-dpo") as err:
        losses.get("dpoo")
    assert "\n" not in str(err.value)
    with pytest.raises(MarginscopeError, match=r"'gamma'.*accepted: beta$"):
        losses.get("dpo", gamma=1.0)
    with pytest.raises(MarginscopeError, match="label_smoothing > 0"):
        losses.get("exo_pair", label_smoothing=0.0)


def test_register_factory_and_plain_function(monkeypatch):
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))

    def factory(scale=1.0):
        """Scaled margin."""
        return lambda lw, ll, rw, rl, nw, nl: scale * (ll - lw)

    losses.register("mine", factory, defaults={"scale": 1.0}, uses_reference=False)
    loss = losses.get("mine", scale=3.0)
    assert "mine" in losses.names() and repr(loss) == "mine(scale=3.0)"
    assert loss.doc == "Scaled margin." and not loss.uses_reference
    assert ev(loss, -5, -7, 0, 0) == pytest.approx(-6.0)
    with pytest.raises(MarginscopeError, match="'beta'.*accepted: scale"):
        losses.get("mine", beta=1.0)

    def per_pair(lw, ll, rw, rl, nw, nl, *, offset=0.0):
        return (lw - ll) + offset

    losses.register("plain", per_pair, defaults={"offset": 0.0}, doc="plain margin")
    assert ev(losses.get("plain", offset=0.5), -5, -7, 0, 0) == pytest.approx(2.5)
    assert losses.get("plain").doc == "plain margin"

    with pytest.raises(MarginscopeError, match="already registered"):
        losses.register("dpo", per_pair)
    losses.register("dpo", per_pair, overwrite=True)
    assert ev(losses.get("dpo"), -5, -7, 0, 0) == pytest.approx(2.0)


def test_trl_loss_weighted_sum():
    loss = losses.trl_loss(["sigmoid", "sft"], beta=0.1, loss_weights=[1.0, 0.5])
    # chosen NLL per token: 5 / 2 = 2.5
    assert ev(loss, *P) == pytest.approx(nls(0.2) + 0.5 * 2.5, rel=1e-12)
    assert loss.hparams == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1}
    assert loss.uses_reference
    assert not losses.trl_loss("sft").uses_reference


def test_trl_loss_maps_ipo_and_passes_trl_arguments():
    assert ev(losses.trl_loss("ipo", beta=0.1), *P) == pytest.approx((1 / 2 + 1 / 4 - 5) ** 2)
    robust = losses.trl_loss(["robust", "sigmoid"], beta=0.1, label_smoothing=0.1)
    assert ev(robust, *P) == pytest.approx((0.9 * nls(0.2) - 0.1 * nls(-0.2)) / 0.8 + nls(0.2))
    assert robust.hparams["label_smoothing"] == 0.1
    disco = losses.trl_loss("discopop", beta=1.0, discopop_tau=1.0)
    assert ev(disco, -7, -5, -6, -6) == pytest.approx(nls(-2.0) * (1 - sig(-2.0)) + math.exp(2.0) * sig(-2.0))


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    (([],), {}, "loss_type is empty"),
    (("aot",), {}, "not a per-pair loss"),
    ((["sigmoid", "aot_unpaired"],), {}, "not a per-pair loss"),
    (("exo_pair",), {}, "label_smoothing > 0"),  # TRL's default label_smoothing is 0 and TRL raises too
    (("nope",), {}, "unknown TRL loss_type 'nope'"),
    ((["sigmoid", "sft"],), {"loss_weights": [1.0]}, "loss_weights has 1 entries for 2"),
    (("sigmoid",), {"f_divergence_type": "js_divergence"}, "reverse_kl"),
    (("sigmoid",), {"use_weighting": True}, "WPO"),
    (("sigmoid",), {"ld_alpha": 0.5}, "LD-DPO"),
])
def test_trl_loss_errors(args, kwargs, match):
    with pytest.raises(MarginscopeError, match=match):
        losses.trl_loss(*args, **kwargs)


def test_every_trl_loss_type_is_covered():
    """Each loss_type branch of the installed TRL DPOTrainer is either per-pair here or refused."""
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("trl is not installed")
    source = (Path(spec.origin).parent / "trainer" / "dpo_trainer.py").read_text()
    trl_types = set(re.findall(r'loss_type == "(\w+)"', source))
    assert {"sigmoid", "ipo", "sft", "aot"} <= trl_types
    for t in sorted(trl_types):
        if t in {"aot", "aot_unpaired"}:
            with pytest.raises(MarginscopeError):
                losses.trl_loss(t)
        else:
            ls = {"label_smoothing": 1e-3} if t == "exo_pair" else {}
            assert torch.isfinite(torch.tensor(ev(losses.trl_loss(t, **ls), *P))), t
