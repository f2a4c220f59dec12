"""The embedded demo: a tiny GPT-2-style model trained from scratch on CPU, then DPO with the tracker.

1. SFT corpus: the correct completions ("prompt + chosen") of synthetic sentiment statements in all
   three styles (`ms.probes.builders.sentiment`, margin-pitfalls §4.2), from seeds the probes never use.
2. A byte-level BPE tokenizer trained on that corpus, and a tiny GPT-2 trained on it by next-token
   prediction (plain PyTorch, AdamW) *until it ranks the labels*: every `sft_check_every` steps the
   fraction of held-out sentiment pairs (all styles) with log π(chosen) > log π(rejected) and the
   chosen responses' per-token log-prob are measured, and SFT stops once the accuracy reaches
   `sft_target` and the log-prob has stopped rising (gain < `sft_plateau` nats per check; at most
   `sft_max_steps` steps). A fixed step count left some seeds at chance. Cached in `<out>/sft-model`
   under a hash of the recipe (with the SFT's report), so a second run skips it.
3. Per style (single, short, long): DPO on that style's pairs (`ms.train`), the reference being the SFT
   model, with the tracker recording the style's probes every few steps → `<out>/run-<style>.h5`.
4. Figures and the HTML report of the three runs (`ms.plots`, `ms.report`), and a summary per style:
   the self-view Case fractions, the chosen / rejected trend, the mean gradient cosine, the Case of
   what happened (signs of the observed change over the run) and how well the self view and the
   actual-update first order explain the observed changes (Pearson r).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..dynamics.coefficients import classify_delta
from ..dynamics.scoring import encode, sequence_logp
from ..dynamics.summary import case_fractions, finite_mean
from ..errors import MarginscopeError
from ..loading import load_model, load_tokenizer
from ..probes import ProbeSet, sentiment, top
from ..progress import progress_bar
from ..trace import open_trace
from ..trace.summary import summarize
from ..train import TrainConfig, train
from .tiny import build_model, build_tokenizer

STYLES = ("single", "short", "long")


@dataclass(frozen=True)
class DemoConfig:
    """Everything that shapes the demo's numbers (the SFT cache is keyed by the `sft_*` fields)."""

    seed: int = 0
    sft_statements: int = 240  # per style
    sft_max_steps: int = 3000  # SFT stops earlier, once the held-out label accuracy reaches sft_target
    sft_check_every: int = 50
    sft_target: float = 0.95  # held-out label accuracy
    sft_plateau: float = 0.02  # nats: stop once the chosen per-token log-prob gains less per check
    sft_eval: int = 32  # held-out pairs per style for the label accuracy
    sft_batch: int = 32
    sft_lr: float = 5e-3
    width: int = 64
    layers: int = 2
    vocab_size: int = 512
    probes: int = 16  # per style
    token_probes: int = 4  # probes per style whose per-token Gram is recorded
    token_tier: str = "exact"  # its tier (ms.dynamics.measure's per_token)
    train_pairs: int = 64  # per style
    dpo_steps: int = 40
    dpo_batch: int = 8
    dpo_lr: float = 5e-4
    every: int = 4
    loss: str = "dpo"
    beta: float = 0.1
    styles: tuple[str, ...] = field(default=STYLES)

    def sft_key(self) -> str:
        """Hash of the fields the cached SFT model depends on."""
        fields = {k: v for k, v in asdict(self).items()
                  if k.startswith("sft_") or k in ("seed", "width", "layers", "vocab_size")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def sft_corpus(config: DemoConfig) -> list[str]:
    """Correct completions of sentiment statements in every style (seeds disjoint from the probes')."""
    lines = []
    for k, style in enumerate(STYLES):
        pairs = sentiment(config.sft_statements, style=style, seed=1000 + 10 * config.seed + k)
        lines += [p.prompt + p.chosen for p in pairs]
    return lines


def sft_eval_pairs(config: DemoConfig, corpus: list[str]) -> ProbeSet:
    """Held-out sentiment pairs of every style (`sft_eval` per style, seeds disjoint from the corpus' and
    the probes'; statements of the corpus dropped) on which the SFT's label accuracy is measured."""
    seen = set(corpus)
    pairs = [p for k, style in enumerate(STYLES)
             for p in sentiment(config.sft_eval, style=style, seed=5000 + 10 * config.seed + k)
             if p.prompt + p.chosen not in seen]
    return ProbeSet(pairs, f"sentiment SFT evaluation (seed {config.seed})")


@dataclass(frozen=True)
class SFTReport:
    """How an SFT went: `steps` taken; at the end, the label `accuracy` (fraction of held-out pairs with
    log π(chosen) > log π(rejected)) and `chosen_logp` (mean per-token log-prob of the held-out chosen
    responses, nats); whether it `reached` the stopping rule (accuracy ≥ `target` and `chosen_logp`
    improved by less than `plateau` nats since the previous check); and the (step, accuracy,
    chosen_logp) history (step 0 = before SFT)."""

    steps: int
    accuracy: float
    chosen_logp: float
    reached: bool
    target: float
    plateau: float
    history: list[tuple[int, float, float]]


def sft_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: ProbeSet,
               batch_size: int = 16) -> tuple[float, float]:
    """(label accuracy, chosen per-token log-prob) of `model` on `pairs`: the fraction of pairs whose
    chosen response has the higher sequence log-prob, and the mean over pairs of the chosen response's
    log-prob per token (nats, ≤ 0). No gradients; the model's train/eval mode is restored."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode(tokenizer, pairs)
    logp = sequence_logp(model, encoded, batch_size=batch_size, pad_id=pad).numpy()
    names = pairs.response_names
    w, l = names.index("chosen"), names.index("rejected")
    lengths = np.array([len(e.response_ids[w]) for e in encoded])
    return float(np.mean(logp[:, w] > logp[:, l])), float(np.mean(logp[:, w] / lengths))


def sft_model(config: DemoConfig, cache: Path, progress: Callable[[float], None] | None = None
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, SFTReport]:
    """The SFT'd tiny GPT-2, its tokenizer and how its SFT went: loaded from `cache` when its recipe
    hash matches, else trained from scratch until it ranks the labels (`sft_until_ranked`) and saved."""
    stamp = cache / "recipe.json"
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("key") == config.sft_key() and "sft" in saved:
            report = saved["sft"]
            return load_model(cache), load_tokenizer(cache), SFTReport(**{
                **report, "history": [tuple(h) for h in report["history"]]})
    corpus = sft_corpus(config)
    tokenizer = build_tokenizer(corpus, vocab_size=config.vocab_size)
    model = build_model("gpt2", tokenizer, seed=config.seed, width=config.width, layers=config.layers)
    report = sft_until_ranked(model, tokenizer, corpus, sft_eval_pairs(config, corpus), lr=config.sft_lr,
                              batch=config.sft_batch, max_steps=config.sft_max_steps,
                              check_every=config.sft_check_every, target=config.sft_target,
                              plateau=config.sft_plateau, seed=config.seed,
                              progress=progress)
    if cache.exists():
        shutil.rmtree(cache)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    stamp.write_text(json.dumps({"key": config.sft_key(), "config": asdict(config), "sft": asdict(report)}, indent=1))
    return model, tokenizer, report


def describe_sft(report: SFTReport) -> str:
    """One line: steps, held-out label accuracy and chosen per-token log-prob, and whether SFT stopped by
    its rule or at its step limit."""
    how = "learned" if report.reached else f"step limit, accuracy target {report.target:.2f} or plateau NOT reached"
    return (f"{report.steps} steps ({how}): held-out label accuracy {report.accuracy:.2f}, chosen per-token "
            f"log-prob {report.chosen_logp:.2f}")


def sft_until_ranked(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                     eval_pairs: ProbeSet, *, lr: float, batch: int, max_steps: int, check_every: int,
                     target: float, plateau: float, seed: int, weight_decay: float = 0.01,
                     progress: Callable[[float], None] | None = None,
                     say: Callable[[str], None] | None = None) -> SFTReport:
    """Next-token prediction on `texts` (AdamW over the trainable parameters, 20 warmup steps then a
    constant `lr`, gradient norm clipped at 1) until the model ranks the labels and has learned the
    responses: on `eval_pairs` (`sft_scores`, measured before SFT and every `check_every` steps) the
    label accuracy is ≥ `target` and the chosen responses' per-token log-prob rose by less than
    `plateau` nats since the previous check — or `max_steps` steps. The model is left in eval mode.
    `progress(loss)` is called after every step, `say(line)` after every check."""
    history: list[tuple[int, float, float]] = []
    step = 0
    step_fn = lm_steps(model, tokenizer, texts, lr=lr, batch=batch, seed=seed, weight_decay=weight_decay,
                       schedule=lambda s: min(1.0, (s + 1) / 20))

    def check() -> None:
        history.append((step, *sft_scores(model, tokenizer, eval_pairs)))
        if say is not None:
            say(f"SFT step {step}: held-out label accuracy {history[-1][1]:.2f}, chosen per-token log-prob "
                f"{history[-1][2]:.3f}")

    def learned() -> bool:
        return (len(history) > 1 and history[-1][1] >= target
                and history[-1][2] - history[-2][2] < plateau)

    check()
    while not learned() and step < max_steps:
        for _ in range(min(check_every, max_steps - step)):
            loss = step_fn()
            step += 1
            if progress is not None:
                progress(loss)
        check()
    model.eval()
    return SFTReport(step, history[-1][1], history[-1][2], learned(), target, plateau, history)


def train_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, texts: list[str], *, steps: int,
             batch: int, lr: float, seed: int, progress: Callable[[float], None] | None = None) -> list[float]:
    """`steps` steps of next-token prediction on `texts` (AdamW, 20 warmup steps then linear decay to 0);
    returns the losses and leaves the model in eval mode. `progress(loss)` is called after every step."""
    step_fn = lm_steps(model, tokenizer, texts, lr=lr, batch=batch, seed=seed,
                       schedule=lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    losses = []
    for _ in range(steps):
        losses.append(step_fn())
        if progress is not None:
            progress(losses[-1])
    model.eval()
    return losses


def lm_steps(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, lr: float, batch: int,
             seed: int, schedule: Callable[[int], float], weight_decay: float = 0.01) -> Callable[[], float]:
    """A function doing one next-token-prediction step on a random batch of `texts` per call (text + EOS,
    right-padded, loss on real tokens; AdamW over the trainable parameters with the lr multiplier
    `schedule(step)`, gradient norm clipped at 1) and returning its loss. Batches are drawn with a
    generator seeded by `seed`; the model is put in train mode."""
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t)["input_ids"] + ([eos] if eos is not None else []) for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def step() -> float:
        model.train()
        rows = [ids[i] for i in torch.randint(len(ids), (batch,), generator=generator).tolist()]
        width = max(len(x) for x in rows)
        input_ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, x in enumerate(rows):
            input_ids[b, :len(x)] = torch.tensor(x)
            mask[b, :len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def style_probes(config: DemoConfig, style: str) -> tuple[ProbeSet, ProbeSet]:
    """(probes, training pairs) of one style: the same statements across styles for one seed."""
    return (sentiment(config.probes, style=style, seed=config.seed),
            sentiment(config.train_pairs, style=style, seed=config.seed + 1))


@dataclass
class StyleSummary:
    """What the demo prints per style (from the trace)."""

    style: str
    trace: Path
    case_fractions: dict[int, float]  # self view (one SGD step on the pair alone), at the last record
    chosen_trend: float  # mean Δ log π(chosen), first → last record
    rejected_trend: float
    cosine_mean: float  # mean over records and probes of cos(a_w, a_l)
    happened_fractions: dict[int, float]  # Case by the signs of the observed change, first → last record
    self_r: dict[str, float]  # Pearson r, self view at record s vs observed s → s+1, per response
    actual_r: dict[str, float]  # Pearson r, actual-update first order vs observed, per response


def summarize_style(style: str, path: Path) -> StyleSummary:
    with open_trace(path) as tr:
        summary = summarize(tr)
        logp, names = tr.logp, tr.names
    last = summary.records[-1]
    happened = classify_delta(logp[-1] - logp[0], names.index("chosen"), names.index("rejected"))
    fits = summary.agreement.get("fits", {})
    fit_r = lambda view: {n: fits[n][view]["r"] if n in fits else float("nan") for n in ("chosen", "rejected")}  # noqa: E731
    return StyleSummary(style, path, {c: last[f"case{c}_frac"] for c in (1, 2, 3, 4)},
                        summary.trend.get("chosen", float("nan")), summary.trend.get("rejected", float("nan")),
                        finite_mean(np.array([r["cosine_mean"] for r in summary.records])),
                        case_fractions(happened), fit_r("self"), fit_r("actual"))


def style_run(config: DemoConfig, style: str, sft: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
              out: Path, progress: bool = False) -> Path:
    """DPO from the SFT model on one style's pairs, tracking its probes (with the SFT model's greedy
    output y* as the extra response "top", and per-token Grams); returns the trace path."""
    probes, pairs = style_probes(config, style)
    probes = top(probes, sft, tokenizer, max_new_tokens=16)
    probes.to_jsonl(out / f"probes-{style}.jsonl")
    trace = out / f"run-{style}.h5"
    run = TrainConfig(data=pairs, probes=probes, trace=trace, loss=config.loss, hparams={"beta": config.beta},
                      every=config.every, per_token=config.token_tier, per_token_probes=probes.ids[:config.token_probes],
                      steps=config.dpo_steps, batch_size=config.dpo_batch,
                      lr=config.dpo_lr, schedule="constant", seed=config.seed, overwrite=True, progress=progress,
                      convention="separate")  # the demo's own trainer and numbers (README): no EOS, no TRL needed
    train(run, model=copy.deepcopy(sft), tokenizer=tokenizer, ref_model=sft)
    return trace


def run_demo(out: str | Path = "marginscope-demo", config: DemoConfig = DemoConfig(), *,
             say: Callable[[str], None] = print, progress: bool = False) -> list[StyleSummary]:
    """The whole demo into `out`: SFT model (cached), one tracked DPO run per style, figures, report."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MarginscopeError(f"{out}: exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    say(f"SFT model: {out / 'sft-model'}")
    with progress_bar(progress, "SFT until it ranks the labels (step limit shown)", config.sft_max_steps,
                      with_loss=True) as advance:
        sft, tokenizer, report = sft_model(config, out / "sft-model", advance)
    say(f"SFT: {describe_sft(report)}")
    traces = []
    for style in config.styles:
        say(f"DPO on the {style!r} sentiment pairs ({config.dpo_steps} steps, tracker every {config.every})")
        traces.append(style_run(config, style, sft, tokenizer, out, progress))
    _figures_and_report(traces, out, tokenizer, say)
    return [summarize_style(style, path) for style, path in zip(config.styles, traces)]


def _figures_and_report(traces: list[Path], out: Path, tokenizer: PreTrainedTokenizerFast,
                        say: Callable[[str], None]) -> None:
    from .. import plots, report
    written = plots.save_all(traces, out / "figures", tokenizer=tokenizer)
    say(f"figures: {len(written)} files in {out / 'figures'}")
    say(f"report: {report.write(traces, out / 'report.html', tokenizer=tokenizer)}")
