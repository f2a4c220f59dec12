"""Study `losses`: margin-pitfalls §3.3 (Figure 2) — the ten losses of its Table 2 on one probe task.

Setting: the embedded demo's SFT model (per seed) and its long-suffix sentiment task (the demo's
64 training pairs and 16 held-out probes of the "long" style, where chosen and rejected share most
tokens, as summaries of one post do); for every loss of Table 2 — dpo, r-dpo, simpo, ipo, rrhf,
slic-hf, cpo, dpop, kto, sppo — the same run: 40 steps, AdamW 5e-4 constant, batch 8, the zoo's
default hyper-parameters, the tracker every 4 steps. Nothing is tuned per loss.

Claims (§3.3): losses with an explicit term on the chosen log-likelihood (cpo, dpop, rrhf, slic-hf)
keep the chosen log-prob rising; dpo and r-dpo pull chosen and rejected down together; simpo and ipo
lower both length-normalized log-probs; sppo raises the chosen and lowers the rejected. kto is run and
reported (the paper's Figure 2 does not show it, so it makes no claim about it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..demo.recipe import DemoConfig, style_probes
from ..dynamics.summary import finite_mean
from ..losses import get as get_loss
from ..trace import open_trace
from ..trace.summary import summarize
from .findings import Finding, StudyResult, agree, fmt, robust, seed_flags, seed_mean
from .models import (
    RunSetting, Say, preference_run, prepare_out, record_sft, save_figures, sentiment_sft, sft_preference)

NAME = "losses"
TITLE = "Ten margin-based losses (Table 2) on one probe task: chosen and rejected trends"
SOURCE = "margin-pitfalls (gradient entanglement) §3.3, Table 2 and Figure 2"

TABLE2 = ("dpo", "r-dpo", "simpo", "ipo", "rrhf", "slic-hf", "cpo", "dpop", "kto", "sppo")
CHOSEN_TERM = ("cpo", "dpop", "rrhf", "slic-hf")  # explicit regularization of the chosen log-likelihood
MARGIN_ONLY = ("dpo", "r-dpo")
LENGTH_NORMALIZED = ("simpo", "ipo")  # the paper plots their length-normalized log-probs


@dataclass(frozen=True)
class Config:
    seeds: int = 3
    style: str = "long"
    demo: DemoConfig = field(default_factory=DemoConfig)
    losses: tuple[str, ...] = TABLE2
    figures: bool = True

    @classmethod
    def reduced(cls) -> Config:
        return cls(seeds=1, figures=False, demo=replace(DemoConfig(), sft_statements=24, sft_max_steps=20,
                                                         sft_check_every=10, probes=3,
                                                         train_pairs=6, dpo_steps=2, dpo_batch=3, every=2))

    def setting(self) -> RunSetting:
        return RunSetting(steps=self.demo.dpo_steps, batch=self.demo.dpo_batch, lr=self.demo.dpo_lr,
                          every=self.demo.every)


def trends(trace: Path) -> dict[str, float]:
    """Mean over probes of the first→last change of log π (and of log π/|y|) of chosen and rejected,
    the mean gradient cosine and the last record's Case fractions."""
    with open_trace(trace) as tr:
        logp, lengths, names = tr.logp, tr.lengths.astype(np.float64), tr.names
        summary = summarize(tr)
    w, l = names.index("chosen"), names.index("rejected")
    delta = logp[-1] - logp[0]
    last = summary.records[-1]
    return {"chosen": finite_mean(delta[:, w]), "rejected": finite_mean(delta[:, l]),
            "chosen_norm": finite_mean(delta[:, w] / lengths[:, w]),
            "rejected_norm": finite_mean(delta[:, l] / lengths[:, l]),
            "cosine": finite_mean(np.array([r["cosine_mean"] for r in summary.records])),
            **{f"case{c}": last[f"case{c}_frac"] for c in (1, 2, 3, 4)}}


# --- decisions ---------------------------------------------------------------------------------------------


def decide_chosen_rises(numbers: dict[str, Any], loss: str) -> bool:
    """Δlog π(chosen) > 0 (seed mean and a majority of seeds)."""
    return robust(numbers, [f"{loss}:chosen"], lambda v: v[f"{loss}:chosen"] > 0)


def decide_both_fall(numbers: dict[str, Any], loss: str, normalized: bool = False) -> bool:
    """Δlog π(chosen) < 0 and Δlog π(rejected) < 0 (of log π/|y| when `normalized`)."""
    suffix = "_norm" if normalized else ""
    keys = [f"{loss}:chosen{suffix}", f"{loss}:rejected{suffix}"]
    return robust(numbers, keys, lambda v: v[keys[0]] < 0 and v[keys[1]] < 0)


def decide_chosen_up_rejected_down(numbers: dict[str, Any], loss: str) -> bool:
    """Δlog π(chosen) > 0 > Δlog π(rejected)."""
    keys = [f"{loss}:chosen", f"{loss}:rejected"]
    return robust(numbers, keys, lambda v: v[keys[0]] > 0 > v[keys[1]])


def findings(numbers: dict[str, Any], losses: tuple[str, ...] = TABLE2) -> list[Finding]:
    def m(key: str) -> str:
        return fmt(seed_mean(numbers[key]))

    def pick(*keys: str) -> dict[str, Any]:
        return {k: numbers[k] for k in keys}

    out = []
    for loss in (x for x in CHOSEN_TERM if x in losses):
        keys = [f"{loss}:chosen"]
        flags = seed_flags(numbers, keys, lambda v, k=keys[0]: v[k] > 0)
        out.append(Finding(f"{loss}: an explicit chosen-likelihood term keeps the chosen log-prob rising (§3.3)",
                           "Δlog π(chosen) > 0", f"Δlog π(chosen) {m(keys[0])}, rejected {m(f'{loss}:rejected')} "
                           f"({agree(flags)})", decide_chosen_rises(numbers, loss),
                           pick(keys[0], f"{loss}:rejected")))
    for loss in (x for x in MARGIN_ONLY if x in losses):
        keys = [f"{loss}:chosen", f"{loss}:rejected"]
        flags = seed_flags(numbers, keys, lambda v, k=keys: v[k[0]] < 0 and v[k[1]] < 0)
        out.append(Finding(f"{loss}: a pure margin loss pulls chosen and rejected down together (§3.3)",
                           "Δlog π(chosen) < 0 and Δlog π(rejected) < 0",
                           f"chosen {m(keys[0])}, rejected {m(keys[1])} ({agree(flags)})",
                           decide_both_fall(numbers, loss), pick(*keys)))
    for loss in (x for x in LENGTH_NORMALIZED if x in losses):
        keys = [f"{loss}:chosen_norm", f"{loss}:rejected_norm"]
        flags = seed_flags(numbers, keys, lambda v, k=keys: v[k[0]] < 0 and v[k[1]] < 0)
        out.append(Finding(f"{loss}: the length-normalized chosen and rejected log-probs both fall (§3.3)",
                           "Δ(log π/|y|) < 0 for chosen and for rejected",
                           f"chosen {m(keys[0])}/token, rejected {m(keys[1])}/token ({agree(flags)})",
                           decide_both_fall(numbers, loss, normalized=True), pick(*keys)))
    if "sppo" in losses:
        keys = ["sppo:chosen", "sppo:rejected"]
        flags = seed_flags(numbers, keys, lambda v: v["sppo:chosen"] > 0 > v["sppo:rejected"])
        out.append(Finding("sppo: the chosen log-prob rises while the rejected one falls (§3.3)",
                           "Δlog π(chosen) > 0 > Δlog π(rejected)",
                           f"chosen {m(keys[0])}, rejected {m(keys[1])} ({agree(flags)})",
                           decide_chosen_up_rejected_down(numbers, "sppo"), pick(*keys)))
    return out


def run(out: Path, *, config: Config = Config(), cache: Path | None = None, say: Say = print) -> StudyResult:
    started = time.perf_counter()
    out = prepare_out(out)
    cache = Path(cache) if cache is not None else out / "sft-models"
    seeds = list(range(config.seeds))
    setting = config.setting()
    numbers: dict[str, list[float]] = {}
    context: dict[str, list[float]] = {}
    rows: dict[str, list[dict[str, float]]] = {loss: [] for loss in config.losses}
    traces: list[Path] = []
    first_tokenizer = None
    for seed in seeds:
        say(f"[{NAME}] seed {seed}: SFT model (cache {cache})")
        sft, tokenizer, sft_report = sentiment_sft(seed, cache, config.demo)
        record_sft(context, sft_report, say, f"[{NAME}] seed {seed}")
        first_tokenizer = tokenizer if first_tokenizer is None else first_tokenizer
        probes, pairs = style_probes(replace(config.demo, seed=seed), config.style)
        folder = prepare_out(out / f"seed{seed}")
        for loss in config.losses:
            say(f"[{NAME}] seed {seed}: {get_loss(loss)!r} on the {config.style!r} pairs ({setting.steps} steps)")
            trace = folder / f"{loss}.h5"
            result = preference_run(setting, loss=loss, hparams={}, data=pairs, probes=probes, trace=trace,
                                    sft=sft, tokenizer=tokenizer, seed=seed)
            traces.append(trace)
            t = trends(trace)
            for key in ("chosen", "rejected", "chosen_norm", "rejected_norm"):
                numbers.setdefault(f"{loss}:{key}", []).append(t[key])
            rows[loss].append({**t, "final_loss": result.final_loss})
            if loss == config.losses[0]:
                pref = sft_preference(trace)
                context.setdefault("sft_prefers_chosen", []).append(pref["prefers_chosen"])
                context.setdefault("sft_logp_gap", []).append(pref["gap"])
    observations = [{"loss": repr(get_loss(loss)),
                     "Δlog π chosen": seed_mean([r["chosen"] for r in rows[loss]]),
                     "Δlog π rejected": seed_mean([r["rejected"] for r in rows[loss]]),
                     "Δ chosen/token": seed_mean([r["chosen_norm"] for r in rows[loss]]),
                     "Δ rejected/token": seed_mean([r["rejected_norm"] for r in rows[loss]]),
                     "mean cos(a_w,a_l)": seed_mean([r["cosine"] for r in rows[loss]]),
                     **{f"Case {c} (last)": seed_mean([r[f"case{c}"] for r in rows[loss]]) for c in (1, 2, 3, 4)}}
                    for loss in config.losses]
    figures, error = [], None
    if config.figures:
        figures, error = save_figures(traces[:len(config.losses)], out / "figures", first_tokenizer, say)
    result = StudyResult(NAME, TITLE, SOURCE, _setting(config), seeds, findings(numbers, config.losses), observations,
                         context, [str(t) for t in traces], figures, error, time.perf_counter() - started, str(out))
    result.save(out)
    return result


def _setting(config: Config) -> dict[str, Any]:
    s = config.setting()
    return {"task": f"sentiment, {config.style!r} style (the demo's pairs and probes)", "losses": list(config.losses),
            "hparams": {loss: get_loss(loss).hparams for loss in config.losses}, "steps": s.steps, "batch": s.batch,
            "lr": s.lr, "schedule": "constant", "every": s.every, "train_pairs": config.demo.train_pairs,
            "probes": config.demo.probes, "sft": "embedded demo recipe, per seed",
            "figures": "seed 0's traces" if config.figures else "off"}
