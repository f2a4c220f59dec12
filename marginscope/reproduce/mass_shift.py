"""Study `mass-shift`: bilevel SPO §2.3 (Theorem 2, Figure 2) on a tiny arithmetic model.

Setting: a tiny GPT-2 (the demo's size and SFT optimizer) trained from scratch on the correct answers,
in all five answer formats, of 200 arithmetic questions (`ms.probes.arithmetic`), so it knows some
arithmetic (it has seen every question; greedy accuracy is reported). Probes = training pairs: the
first 16 questions × 4 pairs (correct vs a near-miss answer in the same format), y* = the SFT model's
greedy output for the prompt; as in the paper, pairs whose chosen or rejected response *is* y* are
left out. Two runs from the same SFT model: DPO (β = 0.1) and the bilevel objective `bilevel-spo`
(DPO + λ·SFT loss on the chosen, λ = 1): 40 steps, AdamW 5e-4 constant, batch 8, the tracker every 2
steps (chosen, rejected and y* scored at every record).

Claims: (Theorem 2, case 1) when π_w and π_l both fall under DPO, y* gains probability — observed
between consecutive records, and as the theorem's first-order formula Δπ* ≈ π*·η(d_w⟨a*,a_w⟩ −
d_l⟨a*,a_l⟩) predicts from the Gram; (§3) the bilevel objective keeps the chosen probability higher
than DPO.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dynamics.coefficients import probability_dynamics
from ..dynamics.summary import finite_mean
from ..probes import ProbeSet, arithmetic, top
from ..trace import open_trace
from .findings import Finding, StudyResult, agree, fmt, robust, seed_flags, seed_mean
from .models import ArithmeticSFT, RunSetting, Say, arithmetic_sft, preference_run, prepare_out, save_figures

NAME = "mass-shift"
TITLE = "Where DPO's probability mass goes (top output y*), and the bilevel objective"
SOURCE = "bilevel SPO (probability dynamics) §2.3 Theorem 2 and Figure 2; §3 (the bilevel objective)"
LOSSES = ("dpo", "bilevel-spo")


@dataclass(frozen=True)
class Config:
    seeds: int = 3
    sft: ArithmeticSFT = field(default_factory=ArithmeticSFT)
    questions: int = 16  # probe questions (the first of the SFT questions)
    pairs_per_question: int = 4
    run: RunSetting = field(default_factory=lambda: RunSetting(steps=40, batch=8, lr=5e-4, every=2))
    beta: float = 0.1
    lam: float = 1.0  # bilevel-spo's SFT weight
    max_new_tokens: int = 12
    figures: bool = True

    @classmethod
    def reduced(cls) -> Config:
        return cls(seeds=1, figures=False, sft=ArithmeticSFT(questions=12, steps=20), questions=3,
                   run=RunSetting(steps=2, batch=4, lr=5e-4, every=1))


def probe_set(config: Config, seed: int, sft, tokenizer) -> tuple[ProbeSet, float]:
    """The study's probes (also its training pairs) with y* as extra response "top", pairs whose chosen
    or rejected is y* removed; and the SFT model's greedy accuracy on the probe questions."""
    pairs = arithmetic(config.sft.questions, seed=config.sft.question_seed(seed),
                       pairs_per_question=config.pairs_per_question)
    pairs = ProbeSet(pairs[:config.questions * config.pairs_per_question], pairs.source)
    with_top = top(pairs, sft, tokenizer, max_new_tokens=config.max_new_tokens)
    kept = [p for p in with_top if p.extra["top"].strip() not in (p.chosen.strip(), p.rejected.strip())]
    answers = {p.prompt: (p.chosen, p.extra["top"]) for p in with_top}
    accuracy = float(np.mean([_answer(y) == _answer(chosen) for chosen, y in answers.values()]))
    return ProbeSet(kept, f"{pairs.source} + top, y* pairs removed"), accuracy


def _answer(text: str) -> str | None:
    """The answer a response states: its last integer (every ARITHMETIC_FORMATS entry ends with it, or
    has it alone)."""
    numbers = re.findall(r"-?\d+", text)
    return numbers[-1] if numbers else None


def interval_numbers(trace: Path) -> dict[str, float]:
    """Theorem 2 on a DPO trace, over (probe, consecutive-record interval) cells.

    Observed: among cells where log π_w and log π_l both fell, the fraction where log π* rose, and
    the mean Δlog π* there. Predicted: `probability_dynamics` at the interval's first record (the
    paper's per-pair first-order step); among cells where it predicts π_w and π_l both fall, the
    fraction where it predicts π* to rise, and the fraction whose predicted sign of Δπ* matches the
    observed one."""
    with open_trace(trace) as tr:
        names, logp, gram, d_w, d_l = tr.names, tr.logp, tr.gram, tr.d_w, tr.d_l
    w, l, t = names.index("chosen"), names.index("rejected"), names.index("top")
    observed = logp[1:] - logp[:-1]  # [S-1, N, R]
    both = (observed[..., w] < 0) & (observed[..., l] < 0)
    up = observed[..., t] > 0
    pred_both, pred_up = [], []
    for s in range(len(logp) - 1):
        dyn = probability_dynamics(gram[s], logp[s], d_w[s], d_l[s], top=t)
        pred_both.append((dyn.delta_p[:, w] < 0) & (dyn.delta_p[:, l] < 0))
        pred_up.append(dyn.delta_top > 0)
    pred_both, pred_up = np.array(pred_both), np.array(pred_up)
    return {"both_fall_cells": int(both.sum()), "cells": int(both.size),
            "top_up_frac": float(up[both].mean()) if both.any() else np.nan,
            "top_delta_bothfall": finite_mean(observed[..., t][both]) if both.any() else np.nan,
            "pred_both_fall_cells": int(pred_both.sum()),
            "pred_top_up_frac": float(pred_up[pred_both].mean()) if pred_both.any() else np.nan,
            "pred_agree_frac": float((pred_up == up)[pred_both].mean()) if pred_both.any() else np.nan}


def initial_mass(trace: Path) -> float:
    """Mean over prompts of the SFT model's probability (first record) of the prompt's outputs that
    Theorem 2 follows: every chosen and rejected response of its pairs (distinct texts: one format per
    pair) plus y* — how much of the output space they hold (the proof takes the rest as negligible)."""
    with open_trace(trace) as tr:
        prob, names = np.exp(tr.logp[0]), tr.names
        prompts = [tr.input_ids(n, 0)[0].tobytes() for n in range(len(tr.probe_ids))]
    w, l, t = names.index("chosen"), names.index("rejected"), names.index("top")
    totals = []
    for prompt in dict.fromkeys(prompts):
        rows = [n for n, p in enumerate(prompts) if p == prompt]
        totals.append(float(prob[rows, w].sum() + prob[rows, l].sum() + prob[rows[0], t]))
    return float(np.mean(totals))


def run_trends(trace: Path) -> dict[str, float]:
    """Mean first→last Δlog π of chosen, rejected and y*."""
    with open_trace(trace) as tr:
        delta = tr.logp[-1] - tr.logp[0]
        names = tr.names
    return {name: finite_mean(delta[:, names.index(name)]) for name in ("chosen", "rejected", "top")}


# --- decisions ---------------------------------------------------------------------------------------------


def decide_top_gains(numbers: dict[str, Any]) -> bool:
    """Where chosen and rejected both fell, y* rose in more than half the cells (NaN: never both fell)."""
    return robust(numbers, ["top_up_frac"], lambda v: v["top_up_frac"] > 0.5)


def decide_prediction_agrees(numbers: dict[str, Any]) -> bool:
    """Where Theorem 2 predicts both fall, its predicted direction of π* matches the observed one in
    more than half the cells."""
    return robust(numbers, ["pred_agree_frac"], lambda v: v["pred_agree_frac"] > 0.5)


def decide_bilevel_keeps_chosen(numbers: dict[str, Any]) -> bool:
    """Δlog π(chosen) under bilevel-spo > under DPO."""
    return robust(numbers, ["dpo_chosen", "bilevel_chosen"], lambda v: v["bilevel_chosen"] > v["dpo_chosen"])


def findings(numbers: dict[str, Any]) -> list[Finding]:
    def m(key: str, digits: int = 3, sign: bool = True) -> str:
        return fmt(seed_mean(numbers[key]), digits, sign)

    def pick(*keys: str) -> dict[str, Any]:
        return {k: numbers[k] for k in keys}

    top_flags = seed_flags(numbers, ["top_up_frac"], lambda v: v["top_up_frac"] > 0.5)
    agree_flags = seed_flags(numbers, ["pred_agree_frac"], lambda v: v["pred_agree_frac"] > 0.5)
    chosen_flags = seed_flags(numbers, ["dpo_chosen", "bilevel_chosen"],
                              lambda v: v["bilevel_chosen"] > v["dpo_chosen"])
    return [
        Finding("Under DPO, when chosen and rejected both fall, the top output y* gains probability "
                "(Thm 2, case 1)",
                "in record intervals where log π_w and log π_l both fell, log π* rose in > 50% of them",
                f"both fell in {int(sum(numbers['both_fall_cells']))} of {int(sum(numbers['cells']))} "
                f"probe-intervals; y* rose in {m('top_up_frac', 2, False)} of them (mean Δlog π* "
                f"{m('top_delta_bothfall', 4)}); SFT greedy accuracy {m('sft_accuracy', 2, False)}; "
                f"{agree(top_flags)}",
                decide_top_gains(numbers),
                pick("top_up_frac", "top_delta_bothfall", "both_fall_cells", "cells", "sft_accuracy", "probes")),
        Finding("Theorem 2's first-order Δπ* ≈ π*·η(d_w⟨a*,a_w⟩ − d_l⟨a*,a_l⟩) predicts y*'s change",
                "where the formula predicts π_w and π_l both fall, its sign of Δπ* matches the observed "
                "change of log π* over the next interval in > 50% of cells",
                f"predicted both-fall in {int(sum(numbers['pred_both_fall_cells']))} cells; predicted y*↑ in "
                f"{m('pred_top_up_frac', 2, False)} of them; sign agreement {m('pred_agree_frac', 2, False)} "
                f"({agree(agree_flags)})",
                decide_prediction_agrees(numbers),
                pick("pred_agree_frac", "pred_top_up_frac", "pred_both_fall_cells")),
        Finding("The bilevel objective (DPO + SFT on the chosen) keeps the chosen probability higher than DPO (§3)",
                "Δlog π(chosen) first→last: bilevel-spo > dpo",
                f"Δlog π(chosen): bilevel-spo {m('bilevel_chosen')} vs dpo {m('dpo_chosen')}; rejected "
                f"{m('bilevel_rejected')} vs {m('dpo_rejected')}; y* {m('bilevel_top')} vs {m('dpo_top')} "
                f"({agree(chosen_flags)})",
                decide_bilevel_keeps_chosen(numbers),
                pick("dpo_chosen", "bilevel_chosen", "dpo_rejected", "bilevel_rejected", "dpo_top", "bilevel_top")),
    ]


def run(out: Path, *, config: Config = Config(), cache: Path | None = None, say: Say = print) -> StudyResult:
    started = time.perf_counter()
    out = prepare_out(out)
    cache = Path(cache) if cache is not None else out / "sft-models"
    seeds = list(range(config.seeds))
    numbers: dict[str, list[float]] = {}
    traces: list[Path] = []
    first_tokenizer = None
    hparams = {"dpo": {"beta": config.beta}, "bilevel-spo": {"beta": config.beta, "lam": config.lam}}
    for seed in seeds:
        say(f"[{NAME}] seed {seed}: arithmetic SFT model (cache {cache})")
        sft, tokenizer = arithmetic_sft(config.sft, seed, cache)
        first_tokenizer = tokenizer if first_tokenizer is None else first_tokenizer
        probes, accuracy = probe_set(config, seed, sft, tokenizer)
        folder = prepare_out(out / f"seed{seed}")
        probes.to_jsonl(folder / "probes.jsonl")
        numbers.setdefault("sft_accuracy", []).append(accuracy)
        numbers.setdefault("probes", []).append(len(probes))
        for loss in LOSSES:
            say(f"[{NAME}] seed {seed}: {loss} on {len(probes)} arithmetic pairs ({config.run.steps} steps)")
            trace = folder / f"{loss}.h5"
            preference_run(config.run, loss=loss, hparams=hparams[loss], data=probes, probes=probes, trace=trace,
                           sft=sft, tokenizer=tokenizer, seed=seed)
            traces.append(trace)
            key = "dpo" if loss == "dpo" else "bilevel"
            for name, value in run_trends(trace).items():
                numbers.setdefault(f"{key}_{name}", []).append(value)
            if loss == "dpo":
                numbers.setdefault("mass_w_l_top", []).append(initial_mass(trace))
                for name, value in interval_numbers(trace).items():
                    numbers.setdefault(name, []).append(value)
    observations = [{"run": loss, **{f"Δlog π {name}": seed_mean(numbers[f"{key}_{name}"])
                                     for name in ("chosen", "rejected", "top")}}
                    for loss, key in (("dpo", "dpo"), ("bilevel-spo", "bilevel"))]
    figures, error = [], None
    if config.figures:
        figures, error = save_figures(traces[:len(LOSSES)], out / "figures", first_tokenizer, say)
    context = {"sft_accuracy": numbers["sft_accuracy"], "probes": numbers["probes"],
               "mass_chosen_rejected_top": numbers["mass_w_l_top"]}
    result = StudyResult(NAME, TITLE, SOURCE, _setting(config), seeds, findings(numbers), observations,
                         context, [str(t) for t in traces], figures, error, time.perf_counter() - started, str(out))
    result.save(out)
    return result


def _setting(config: Config) -> dict[str, Any]:
    return {"sft": {**asdict(config.sft), "corpus": "prompt + correct answer, all 5 formats"},
            "probes": f"first {config.questions} questions × {config.pairs_per_question} pairs, y* pairs removed; "
                      "also the training pairs",
            "losses": {"dpo": {"beta": config.beta}, "bilevel-spo": {"beta": config.beta, "lam": config.lam}},
            **{k: v for k, v in asdict(config.run).items()}, "schedule": "constant",
            "y*": f"greedy, max_new_tokens={config.max_new_tokens}",
            "figures": "seed 0's traces" if config.figures else "off"}
