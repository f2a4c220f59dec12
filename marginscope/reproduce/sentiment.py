"""Study `sentiment`: margin-pitfalls §4.2 (Figures 3 and 4) on the embedded tiny model.

Setting (the embedded demo's, unchanged, per seed): a tiny GPT-2 SFT'd from scratch on synthetic
sentiment statements (`sft_model`), then per response style — single token, short suffix, long suffix
— 40 DPO steps (β = 0.1, AdamW 5e-4, batch 8) on 64 pairs of that style, the tracker recording 16
held-out probes of the style every 4 steps (per-token Grams, exact tier, of 4 of them). The seed
changes the SFT model, its corpus, the probes and the training pairs.

Claims: the chosen log-prob rises only for the single-token style; it falls more for the long suffix
than for the short one; cos(a_w, a_l) grows with the suffix length; the per-token gradient cosine of
the long style is negative at the differing token and positive along the shared suffix.

With `Config.for_model(path)` (`marginscope reproduce sentiment --model DIR_OR_GGUF`) the same runs start
from a user's pretrained model instead: a short SFT on the task until it ranks the labels
(`PretrainedSFT`, measured per seed), then DPO per style at a pretrained-model learning rate
(`PRETRAINED_DPO`), training only the model's top blocks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..demo.recipe import STYLES, DemoConfig, style_run, summarize_style
from ..loading import model_name
from ..trace import open_trace
from .findings import Finding, StudyResult, agree, fmt, robust, seed_flags, seed_mean
from .models import (
    PretrainedSFT, Say, prepare_out, pretrained_sft, record_sft, save_figures, sentiment_sft, sft_preference)

NAME = "sentiment"
TITLE = "DPO on sentiment pairs: single token vs short and long shared suffix"
TAKES_MODEL = True  # `--model`: run on a user's pretrained model (Config.for_model)
SOURCE = "margin-pitfalls (gradient entanglement) §4.2, Figures 3 and 4"


# DPO on a user's pretrained model (`--model`), sized for a 135M model on a shared 2-core CPU: the demo's
# runs with 4 probes per style, 12 steps recorded every 6, a pretrained-model learning rate
# (margin-pitfalls DPOs its pretrained GPT-2 at 5e-6 for longer), and the per-token Gram in the "tail"
# tier (the last block's MLP and final norm; the exact tier over the trained blocks takes minutes per
# record there).
PRETRAINED_DPO = replace(DemoConfig(), probes=4, token_probes=2, token_tier="tail", train_pairs=48, dpo_steps=12,
                         dpo_batch=8, dpo_lr=2e-5, every=6)


@dataclass(frozen=True)
class Config:
    seeds: int = 3
    demo: DemoConfig = field(default_factory=DemoConfig)
    heatmap_style: str = "long"  # the paper's Figure 4b instance
    figures: bool = True
    model: str | None = None  # a pretrained model (directory or GGUF file) instead of the tiny ones
    pretrained: PretrainedSFT = field(default_factory=PretrainedSFT)

    @classmethod
    def for_model(cls, model: str | Path, reduced: bool = False) -> Config:
        """The study on a user's pretrained model: `PretrainedSFT` (SFT until it ranks the labels, top
        blocks trained), then `PRETRAINED_DPO` per style; `reduced`: a seconds-long version for tests."""
        if reduced:
            return replace(cls.reduced(), model=str(model),
                           pretrained=PretrainedSFT(statements=8, eval=4, max_steps=4, check_every=2, train_layers=1))
        return cls(model=str(model), demo=PRETRAINED_DPO)

    @classmethod
    def reduced(cls) -> Config:
        """A seconds-long version for tests and smoke runs (the numbers mean nothing)."""
        return cls(seeds=1, figures=False, demo=replace(DemoConfig(), sft_statements=24, sft_max_steps=20,
                                                         sft_check_every=10, probes=4,
                                                         token_probes=2, train_pairs=8, dpo_steps=4, dpo_batch=4,
                                                         every=2))


# --- per-token heatmap ---------------------------------------------------------------------------------


def differing_span(ids_w: np.ndarray, ids_l: np.ndarray) -> tuple[int, int, int]:
    """(p, e_w, e_l): the shared prefix has p tokens; the differing tokens are chosen[p:e_w] and
    rejected[p:e_l]; chosen[e_w:] == rejected[e_l:] is the shared suffix (aligned from the end)."""
    ids_w, ids_l = np.asarray(ids_w), np.asarray(ids_l)
    p = 0
    while p < min(len(ids_w), len(ids_l)) and ids_w[p] == ids_l[p]:
        p += 1
    s = 0
    while s < min(len(ids_w), len(ids_l)) - p and ids_w[-1 - s] == ids_l[-1 - s]:
        s += 1
    return p, len(ids_w) - s, len(ids_l) - s


def token_cosines(gram: np.ndarray, sq_w: np.ndarray, sq_l: np.ndarray, ids_w: np.ndarray,
                  ids_l: np.ndarray) -> dict[str, float]:
    """Per-token gradient cosines of one record: the mean over the differing block (chosen's differing
    tokens × rejected's), over the shared suffix's aligned diagonal, and over the shared prefix's."""
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = gram / np.sqrt(np.clip(sq_w, 0, None)[:, None] * np.clip(sq_l, 0, None)[None, :])
    p, e_w, e_l = differing_span(ids_w, ids_l)
    suffix = [cos[e_w + k, e_l + k] for k in range(len(ids_w) - e_w)]
    prefix = [cos[k, k] for k in range(p)]
    block = cos[p:e_w, p:e_l]
    return {"diff": float(np.nanmean(block)) if block.size else np.nan,
            "suffix": float(np.nanmean(suffix)) if suffix else np.nan,
            "prefix": float(np.nanmean(prefix)) if prefix else np.nan}


def heatmap_numbers(trace: Path) -> dict[str, float]:
    """Mean per-token cosines (differing block, shared suffix, shared prefix) over every record of
    every probe with a per-token Gram in `trace`."""
    rows: list[dict[str, float]] = []
    with open_trace(trace) as tr:
        w, l = tr.names.index("chosen"), tr.names.index("rejected")
        for n in range(len(tr.probe_ids)):
            tg = tr.token_gram(n)
            if tg is None:
                continue
            ids_w, ids_l = tr.input_ids(n, w)[1], tr.input_ids(n, l)[1]
            for s in range(len(tg["step"])):
                rows.append(token_cosines(tg["gram"][s], tg["sqnorm_w"][s], tg["sqnorm_l"][s], ids_w, ids_l))
    return {k: seed_mean([r[k] for r in rows]) for k in ("diff", "suffix", "prefix")} | {"records": len(rows)}


# --- decisions (pure functions of the numbers; per-seed lists) ------------------------------------------


def _rise_only_single(v: dict[str, float]) -> bool:
    return v["chosen_single"] > 0 and v["chosen_short"] < 0 and v["chosen_long"] < 0


def _long_below_short(v: dict[str, float]) -> bool:
    return v["chosen_long"] < v["chosen_short"] and v["chosen_long"] < 0


def _cosine_grows(v: dict[str, float]) -> bool:
    return v["cosine_single"] < v["cosine_short"] < v["cosine_long"]


def decide_rise_only_single(numbers: dict[str, Any]) -> bool:
    """Δlog π_w > 0 for single, < 0 for short and long (seed mean and a majority of seeds)."""
    return robust(numbers, ["chosen_single", "chosen_short", "chosen_long"], _rise_only_single)


def decide_long_below_short(numbers: dict[str, Any]) -> bool:
    """Δlog π_w(long) < Δlog π_w(short) and Δlog π_w(long) < 0."""
    return robust(numbers, ["chosen_short", "chosen_long"], _long_below_short)


def decide_cosine_grows(numbers: dict[str, Any]) -> bool:
    """mean cos(a_w, a_l): single < short < long."""
    return robust(numbers, ["cosine_single", "cosine_short", "cosine_long"], _cosine_grows)


def decide_diff_negative(numbers: dict[str, Any]) -> bool:
    """Per-token cosine at the differing token < 0."""
    return robust(numbers, ["token_cos_diff"], lambda v: v["token_cos_diff"] < 0)


def decide_suffix_positive(numbers: dict[str, Any]) -> bool:
    """Per-token cosine along the shared suffix > 0."""
    return robust(numbers, ["token_cos_suffix"], lambda v: v["token_cos_suffix"] > 0)


# --- the study -------------------------------------------------------------------------------------------


def _three(numbers: dict[str, Any], key: str, digits: int = 3) -> str:
    return ", ".join(f"{s} {fmt(seed_mean(numbers[f'{key}_{s}']), digits)}" for s in STYLES)


def findings(numbers: dict[str, Any], heatmap_style: str = "long", tier: str = "exact") -> list[Finding]:
    """The study's findings from its per-seed numbers (`tier`: the per-token Gram's, for the text)."""
    def seeds(keys, cond):
        return agree(seed_flags(numbers, keys, cond))

    chosen_keys = ["chosen_single", "chosen_short", "chosen_long"]
    out = [
        Finding("The chosen log-prob rises only in the single-token style (§4.2, Fig. 3)",
                "mean Δlog π(chosen), first→last record: single > 0, short < 0, long < 0",
                f"Δlog π(chosen): {_three(numbers, 'chosen')} (seed mean; {seeds(chosen_keys, _rise_only_single)})",
                decide_rise_only_single(numbers), numbers={k: numbers[k] for k in chosen_keys}),
        Finding("The chosen log-prob falls more with the long suffix than with the short one (§4.2, Thm 3)",
                "Δlog π(chosen): long < short, long < 0",
                f"long {fmt(seed_mean(numbers['chosen_long']))} vs short {fmt(seed_mean(numbers['chosen_short']))} "
                f"({seeds(['chosen_short', 'chosen_long'], _long_below_short)})",
                decide_long_below_short(numbers), numbers={k: numbers[k] for k in chosen_keys[1:]}),
        Finding("cos(a_w, a_l) grows with the shared suffix, single-token lowest (§4.2, Fig. 4a)",
                "mean cosine over records and probes: single < short < long",
                f"cosine: {_three(numbers, 'cosine')} "
                f"({seeds(['cosine_single', 'cosine_short', 'cosine_long'], _cosine_grows)})",
                decide_cosine_grows(numbers),
                numbers={f"cosine_{s}": numbers[f"cosine_{s}"] for s in STYLES}),
        Finding(f"Per-token gradient cosine is negative at the differing token ({heatmap_style} style, Fig. 4b)",
                f"mean cos(∇log π(w_t), ∇log π(l_s)) over the differing tokens < 0 (per-token tier: {tier})",
                f"differing-token cosine {fmt(seed_mean(numbers['token_cos_diff']))} over "
                f"{int(sum(numbers['token_records']))} probe-records "
                f"({seeds(['token_cos_diff'], lambda v: v['token_cos_diff'] < 0)})",
                decide_diff_negative(numbers),
                numbers={"token_cos_diff": numbers["token_cos_diff"], "token_records": numbers["token_records"]}),
        Finding(f"Per-token gradient cosine is positive along the shared suffix ({heatmap_style} style, Fig. 4b)",
                f"mean cosine on the suffix diagonal (aligned tokens after the differing one) > 0 (tier: {tier})",
                f"suffix cosine {fmt(seed_mean(numbers['token_cos_suffix']))} "
                f"(shared prefix, identical by construction: {fmt(seed_mean(numbers['token_cos_prefix']))}; "
                f"{seeds(['token_cos_suffix'], lambda v: v['token_cos_suffix'] > 0)})",
                decide_suffix_positive(numbers),
                numbers={"token_cos_suffix": numbers["token_cos_suffix"],
                         "token_cos_prefix": numbers["token_cos_prefix"]}),
    ]
    return out


def run(out: Path, *, config: Config = Config(), cache: Path | None = None, say: Say = print) -> StudyResult:
    """Run the study into `out` (traces per seed under seed<k>/, figures/, results.json)."""
    started = time.perf_counter()
    out = prepare_out(out)
    cache = Path(cache) if cache is not None else out / "sft-models"
    seeds = list(range(config.seeds))
    numbers: dict[str, list[float]] = {}
    context: dict[str, list[float]] = {}
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in STYLES}
    traces: list[Path] = []
    first_tokenizer = None
    for seed in seeds:
        demo = replace(config.demo, seed=seed, styles=STYLES)
        say(f"[{NAME}] seed {seed}: SFT model " + (f"(cache {cache})" if config.model is None else
                                                   f"from {model_name(config.model)}"))
        if config.model is None:
            sft, tokenizer, sft_report = sentiment_sft(seed, cache, config.demo)
        else:
            sft, tokenizer, sft_report = pretrained_sft(config.model, config.pretrained, seed, say)
        record_sft(context, sft_report, say, f"[{NAME}] seed {seed}")
        first_tokenizer = tokenizer if first_tokenizer is None else first_tokenizer
        folder = prepare_out(out / f"seed{seed}")
        for style in STYLES:
            say(f"[{NAME}] seed {seed}: DPO on the {style!r} pairs ({demo.dpo_steps} steps)")
            trace = style_run(demo, style, sft, tokenizer, folder)
            traces.append(trace)
            summary = summarize_style(style, trace)
            numbers.setdefault(f"chosen_{style}", []).append(summary.chosen_trend)
            numbers.setdefault(f"rejected_{style}", []).append(summary.rejected_trend)
            numbers.setdefault(f"cosine_{style}", []).append(summary.cosine_mean)
            rows[style].append({f"case{c}": summary.case_fractions[c] for c in (1, 2, 3, 4)})
            pref = sft_preference(trace)
            context.setdefault(f"sft_prefers_chosen_{style}", []).append(pref["prefers_chosen"])
            context.setdefault(f"sft_logp_gap_{style}", []).append(pref["gap"])
            if style == config.heatmap_style:
                heat = heatmap_numbers(trace)
                numbers.setdefault("token_cos_diff", []).append(heat["diff"])
                numbers.setdefault("token_cos_suffix", []).append(heat["suffix"])
                numbers.setdefault("token_cos_prefix", []).append(heat["prefix"])
                numbers.setdefault("token_records", []).append(heat["records"])
    observations = [{"style": s, "Δlog π chosen": seed_mean(numbers[f"chosen_{s}"]),
                     "Δlog π rejected": seed_mean(numbers[f"rejected_{s}"]),
                     "mean cos(a_w,a_l)": seed_mean(numbers[f"cosine_{s}"]),
                     **{f"Case {c} (last)": seed_mean([r[f"case{c}"] for r in rows[s]]) for c in (1, 2, 3, 4)}}
                    for s in STYLES]
    figures, error = [], None
    if config.figures:
        figures, error = save_figures(traces[:len(STYLES)], out / "figures", first_tokenizer, say)
    claims = findings(numbers, config.heatmap_style, config.demo.token_tier)
    result = StudyResult(NAME, TITLE, SOURCE, _setting(config), seeds, claims,
                         observations, context, [str(t) for t in traces], figures, error,
                         time.perf_counter() - started, str(out))
    result.save(out)
    return result


def _setting(config: Config) -> dict[str, Any]:
    demo = asdict(config.demo)
    demo.pop("seed", None)
    if config.model is None:
        recipe = {"recipe": "embedded demo (marginscope.demo.recipe), seed varied"}
    else:
        demo = {k: v for k, v in demo.items() if not k.startswith("sft_") and k not in ("width", "layers", "vocab_size")}
        recipe = {"recipe": "pretrained model: SFT until it ranks the labels, then the demo's DPO runs, seed varied",
                  "model": model_name(config.model), "sft": asdict(config.pretrained)}
    return {**recipe, "heatmap_style": config.heatmap_style, **demo,
            "figures": "seed 0's traces" if config.figures else "off"}
