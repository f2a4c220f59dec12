"""Study `spo-stability`: the stable preference loss (SPO, ℓ = −X·e^{−X}, X = β·margin) against DPO.

Setting: the embedded demo's SFT model (per seed) and its single-token sentiment pairs (64 training
pairs, 16 held-out probes) — the style in which the rejected log-prob falls fastest, i.e. π_l → 0 —
trained with DPO and with SPO at the same β = 0.1 (target margin 1/β = 10 nats) for 160 steps (four
times the demo's 40, so that DPO's margin can pass the target), AdamW 5e-4 constant, batch 8, no
clipping, the tracker every 8 steps. The margin is the probes' log-ratio margin
(log π_w − log π_ref,w) − (log π_l − log π_ref,l) from the trace and its reference log-probs; the
gradient norm is `TrainResult.history[k].grad_norm` (before the optimizer step).

Claims (spo-stable-loss §2.2 and §3.1): SPO's margin settles near its target 1/β, while DPO's keeps
growing; SPO's gradient stays bounded as π_l → 0, unlike DPO's — tested on the runs' gradient norms
and, exactly, on the paper's own quantity |∂ℓ/∂π_l| (its eqs. 7 and 8) along π_l → 0, by autograd on
the zoo's `dpo` and `spo` losses.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..demo.recipe import DemoConfig, style_probes
from ..dynamics.coefficients import coefficients
from ..dynamics.summary import finite_mean
from ..losses import get as get_loss
from ..trace import open_trace
from ..train import TrainResult
from .findings import Finding, StudyResult, agree, fmt, robust, seed_flags, seed_mean
from .models import (
    RunSetting, Say, preference_run, prepare_out, record_sft, save_figures, sentiment_sft, sft_preference)

NAME = "spo-stability"
TITLE = "Stable preference loss vs DPO: margin target and gradient as π_l → 0"
SOURCE = "spo-stable-loss §2.2 (eq. 6) and §3.1 (eqs. 7–8)"
LOSSES = ("dpo", "spo")
SWEEP = (0.0, -25.0, -50.0, -100.0, -200.0)  # log π_l − log π_ref,l along π_l → 0 (log π_w = log π_ref,w)
SETTLE = 0.5  # "near the target": |margin − 1/β| ≤ SETTLE/β
DRIFT = 0.1  # "settled" / "still growing": last-quarter change below / above DRIFT/β


@dataclass(frozen=True)
class Config:
    seeds: int = 3
    style: str = "single"
    beta: float = 0.1
    demo: DemoConfig = field(default_factory=DemoConfig)
    run: RunSetting = field(default_factory=lambda: RunSetting(steps=160, batch=8, lr=5e-4, every=8))
    figures: bool = True

    @classmethod
    def reduced(cls) -> Config:
        return cls(seeds=1, figures=False, demo=replace(DemoConfig(), sft_statements=24, sft_max_steps=20,
                                                         sft_check_every=10, probes=3,
                                                         train_pairs=6),
                   run=RunSetting(steps=4, batch=3, lr=5e-4, every=1))


def margin_numbers(trace: Path) -> dict[str, float]:
    """The probes' mean log-ratio margin at the last record, its change over the last quarter of the
    records, and the mean first→last Δlog π of chosen and rejected."""
    with open_trace(trace) as tr:
        logp, ref, names = tr.logp, tr.ref_logp, tr.names
    w, l = names.index("chosen"), names.index("rejected")
    margin = np.array([finite_mean((x[:, w] - ref[:, w]) - (x[:, l] - ref[:, l])) for x in logp])
    quarter = len(margin) - 1 - max(1, (len(margin) - 1) // 4)
    return {"margin": float(margin[-1]), "drift": float(margin[-1] - margin[max(quarter, 0)]),
            "chosen": finite_mean(logp[-1, :, w] - logp[0, :, w]),
            "rejected": finite_mean(logp[-1, :, l] - logp[0, :, l]), "ref_w": finite_mean(ref[:, w]),
            "ref_l": finite_mean(ref[:, l])}


def grad_numbers(result: TrainResult) -> dict[str, float]:
    """Mean per-step gradient norm over the first and the last quarter of the steps, their ratio, the max;
    and the training batches' mean log-ratio margin over the last quarter of the steps."""
    norms = np.array([h.grad_norm for h in result.history], dtype=np.float64)
    q = max(1, len(norms) // 4)
    early, late = float(norms[:q].mean()), float(norms[-q:].mean())
    margins = np.array([h.margin for h in result.history], dtype=np.float64)
    return {"early": early, "late": late, "ratio": late / early if early > 0 else math.nan, "max": float(norms.max()),
            "train_margin": float(margins[-q:].mean())}


def prob_gradient_sweep(loss_name: str, beta: float, ref_w: float, ref_l: float) -> list[float]:
    """log10 |∂ℓ/∂π_l| = log10(|d_l| / π_l) (d_l = ∂ℓ/∂log π_l by autograd) at log π_l = ref_l + δ for δ
    in SWEEP, with log π_w = ref_w: the paper's eq. 7 (DPO) and eq. 8 (SPO) along π_l → 0."""
    loss = get_loss(loss_name, beta=beta)
    deltas = np.array(SWEEP)
    n = len(deltas)
    _, d_l = coefficients(loss, np.full(n, ref_w), ref_l + deltas, np.full(n, ref_w), np.full(n, ref_l),
                          np.ones(n), np.ones(n))
    with np.errstate(divide="ignore"):
        return list((np.log(np.abs(d_l)) - (ref_l + deltas)) / math.log(10))


# --- decisions ---------------------------------------------------------------------------------------------


def _settles(v: dict[str, float]) -> bool:
    target = v["target"]
    return abs(v["spo_margin"] - target) <= SETTLE * target and abs(v["spo_drift"]) <= DRIFT * target


def _grows(v: dict[str, float]) -> bool:
    return v["dpo_margin"] > v["target"] and v["dpo_drift"] > DRIFT * v["target"]


def _grad_contrast(v: dict[str, float]) -> bool:
    return v["dpo_grad_ratio"] > 1 and v["spo_grad_ratio"] <= 1


def _sweep_contrast(v: dict[str, float]) -> bool:
    return v["spo_dldp_200"] <= v["spo_dldp_100"] and v["dpo_dldp_200"] > v["dpo_dldp_100"]


def decide_spo_settles(numbers: dict[str, Any]) -> bool:
    """|SPO margin − 1/β| ≤ 0.5/β at the end and its last-quarter change |Δ| ≤ 0.1/β."""
    return robust(numbers, ["spo_margin", "spo_drift", "target"], _settles)


def decide_dpo_grows(numbers: dict[str, Any]) -> bool:
    """DPO margin > 1/β at the end and still rising: last-quarter change > 0.1/β."""
    return robust(numbers, ["dpo_margin", "dpo_drift", "target"], _grows)


def decide_grad_contrast(numbers: dict[str, Any]) -> bool:
    """Per-step gradient norm, last quarter / first quarter: DPO > 1 (grows) and SPO ≤ 1 (does not)."""
    return robust(numbers, ["dpo_grad_ratio", "spo_grad_ratio"], _grad_contrast)


def decide_sweep_contrast(numbers: dict[str, Any]) -> bool:
    """|∂ℓ/∂π_l| at δ = −200 vs −100: SPO's does not grow, DPO's does."""
    return robust(numbers, ["spo_dldp_100", "spo_dldp_200", "dpo_dldp_100", "dpo_dldp_200"], _sweep_contrast)


def findings(numbers: dict[str, Any]) -> list[Finding]:
    def m(key: str, digits: int = 2, sign: bool = True) -> str:
        return fmt(seed_mean(numbers[key]), digits, sign)

    def pick(*keys: str) -> dict[str, Any]:
        return {k: numbers[k] for k in keys}

    target = seed_mean(numbers["target"])
    return [
        Finding("SPO's log-ratio margin settles near its target 1/β (§2.2)",
                f"final probe margin within ±{SETTLE:g}/β of 1/β = {target:g} and its change over the last "
                f"quarter of training within ±{DRIFT:g}/β",
                f"SPO margin {m('spo_margin')} (last-quarter change {m('spo_drift')}); target {target:g}; "
                f"training batches, last quarter: {m('spo_train_margin')} "
                f"({agree(seed_flags(numbers, ['spo_margin', 'spo_drift', 'target'], _settles))})",
                decide_spo_settles(numbers), pick("spo_margin", "spo_drift", "target", "spo_train_margin")),
        Finding("DPO's margin instead keeps growing past 1/β (§2.1: DPO maximizes it without bound)",
                f"final DPO margin > 1/β and still rising: last-quarter change > {DRIFT:g}/β",
                f"DPO margin {m('dpo_margin')} (last-quarter change {m('dpo_drift')}); training batches, "
                f"last quarter: {m('dpo_train_margin')} "
                f"({agree(seed_flags(numbers, ['dpo_margin', 'dpo_drift', 'target'], _grows))})",
                decide_dpo_grows(numbers), pick("dpo_margin", "dpo_drift", "target", "dpo_train_margin")),
        Finding("SPO's gradient stays bounded as π_l → 0, unlike DPO's (§3.1), in training",
                "per-step gradient norm, mean of the last quarter / first quarter of steps: DPO > 1, SPO ≤ 1",
                f"ratio DPO {m('dpo_grad_ratio', 3, False)}, SPO {m('spo_grad_ratio', 3, False)} "
                f"(max norm DPO {m('dpo_grad_max', 3, False)}, SPO {m('spo_grad_max', 3, False)}); "
                f"Δlog π(rejected) DPO {m('dpo_rejected')}, SPO {m('spo_rejected')} "
                f"({agree(seed_flags(numbers, ['dpo_grad_ratio', 'spo_grad_ratio'], _grad_contrast))})",
                decide_grad_contrast(numbers),
                pick("dpo_grad_ratio", "spo_grad_ratio", "dpo_grad_max", "spo_grad_max", "dpo_rejected",
                     "spo_rejected")),
        Finding("|∂ℓ/∂π_l| stays bounded for SPO as π_l → 0 but not for DPO (eqs. 7–8), exactly",
                "log10|∂ℓ/∂π_l| at log π_l − log π_ref,l = −200 vs −100 (log π_w at its reference): "
                "SPO's does not rise, DPO's does",
                f"log10|∂ℓ/∂π_l| at −100 → −200: DPO {m('dpo_dldp_100', 1)} → {m('dpo_dldp_200', 1)}, "
                f"SPO {m('spo_dldp_100', 1)} → {m('spo_dldp_200', 1)}",
                decide_sweep_contrast(numbers),
                pick("dpo_dldp_100", "dpo_dldp_200", "spo_dldp_100", "spo_dldp_200", "beta")),
    ]


def run(out: Path, *, config: Config = Config(), cache: Path | None = None, say: Say = print) -> StudyResult:
    started = time.perf_counter()
    out = prepare_out(out)
    cache = Path(cache) if cache is not None else out / "sft-models"
    seeds = list(range(config.seeds))
    numbers: dict[str, list[float]] = {}
    context: dict[str, list[float]] = {}
    traces: list[Path] = []
    first_tokenizer = None
    for seed in seeds:
        say(f"[{NAME}] seed {seed}: SFT model (cache {cache})")
        sft, tokenizer, sft_report = sentiment_sft(seed, cache, config.demo)
        record_sft(context, sft_report, say, f"[{NAME}] seed {seed}")
        first_tokenizer = tokenizer if first_tokenizer is None else first_tokenizer
        probes, pairs = style_probes(replace(config.demo, seed=seed), config.style)
        folder = prepare_out(out / f"seed{seed}")
        numbers.setdefault("target", []).append(1.0 / config.beta)
        numbers.setdefault("beta", []).append(config.beta)
        for loss in LOSSES:
            say(f"[{NAME}] seed {seed}: {loss} (beta={config.beta}) on the {config.style!r} pairs "
                f"({config.run.steps} steps)")
            trace = folder / f"{loss}.h5"
            result = preference_run(config.run, loss=loss, hparams={"beta": config.beta}, data=pairs, probes=probes,
                                    trace=trace, sft=sft, tokenizer=tokenizer, seed=seed)
            traces.append(trace)
            if loss == LOSSES[0]:
                pref = sft_preference(trace)
                context.setdefault("sft_prefers_chosen", []).append(pref["prefers_chosen"])
                context.setdefault("sft_logp_gap", []).append(pref["gap"])
            mn, gn = margin_numbers(trace), grad_numbers(result)
            for key in ("margin", "drift", "chosen", "rejected"):
                numbers.setdefault(f"{loss}_{key}", []).append(mn[key])
            numbers.setdefault(f"{loss}_grad_ratio", []).append(gn["ratio"])
            numbers.setdefault(f"{loss}_grad_max", []).append(gn["max"])
            numbers.setdefault(f"{loss}_grad_early", []).append(gn["early"])
            numbers.setdefault(f"{loss}_grad_late", []).append(gn["late"])
            numbers.setdefault(f"{loss}_train_margin", []).append(gn["train_margin"])
            sweep = prob_gradient_sweep(loss, config.beta, mn["ref_w"], mn["ref_l"])
            numbers.setdefault(f"{loss}_dldp_100", []).append(sweep[SWEEP.index(-100.0)])
            numbers.setdefault(f"{loss}_dldp_200", []).append(sweep[SWEEP.index(-200.0)])
            numbers.setdefault(f"{loss}_sweep", []).append(sweep)
    observations = [{"loss": loss, "final margin": seed_mean(numbers[f"{loss}_margin"]),
                     "last-quarter Δmargin": seed_mean(numbers[f"{loss}_drift"]),
                     "train margin last ¼": seed_mean(numbers[f"{loss}_train_margin"]),
                     "Δlog π chosen": seed_mean(numbers[f"{loss}_chosen"]),
                     "Δlog π rejected": seed_mean(numbers[f"{loss}_rejected"]),
                     "grad norm first ¼": seed_mean(numbers[f"{loss}_grad_early"]),
                     "grad norm last ¼": seed_mean(numbers[f"{loss}_grad_late"]),
                     **{f"log10|∂ℓ/∂π_l| δ={d:g}": seed_mean([s[i] for s in numbers[f"{loss}_sweep"]])
                        for i, d in enumerate(SWEEP)}}
                    for loss in LOSSES]
    figures, error = [], None
    if config.figures:
        figures, error = save_figures(traces[:len(LOSSES)], out / "figures", first_tokenizer, say)
    result = StudyResult(NAME, TITLE, SOURCE, _setting(config), seeds, findings(numbers), observations,
                         context, [str(t) for t in traces], figures, error, time.perf_counter() - started, str(out))
    result.save(out)
    return result


def _setting(config: Config) -> dict[str, Any]:
    return {"task": f"sentiment, {config.style!r} style (the demo's pairs and probes)", "losses": list(LOSSES),
            "beta": config.beta, "target": 1.0 / config.beta, **asdict(config.run), "schedule": "constant",
            "max_grad_norm": None, "train_pairs": config.demo.train_pairs, "probes": config.demo.probes,
            "sweep": list(SWEEP), "settle": f"±{SETTLE}/β", "drift": f"{DRIFT}/β over the last quarter",
            "figures": "seed 0's traces" if config.figures else "off"}
