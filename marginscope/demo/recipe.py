"""The embedded demo: a tiny GPT-2-style model trained from scratch on CPU, then DPO with the tracker.

1. SFT corpus: the correct completions ("prompt + chosen") of synthetic sentiment statements in all
   three styles (`ms.probes.builders.sentiment`, margin-pitfalls §4.2), from seeds the probes never use.
2. A byte-level BPE tokenizer trained on that corpus, and a tiny GPT-2 trained on it by next-token
   prediction (plain PyTorch, AdamW). Cached in `<out>/sft-model` under a hash of the recipe, so a
   second run skips it.
3. Per style (single, short, long): DPO on that style's pairs (`ms.train`), the reference being the SFT
   model, with the tracker recording the style's probes every few steps → `<out>/run-<style>.h5`.
4. Figures and the HTML report of the three runs (`ms.plots`, `ms.report`), and a summary per style:
   Case fractions, the chosen / rejected trend and the mean gradient cosine.
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
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from ..dynamics.summary import finite_mean
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
    sft_steps: int = 450
    sft_batch: int = 32
    sft_lr: float = 5e-3
    width: int = 64
    layers: int = 2
    vocab_size: int = 512
    probes: int = 16  # per style
    token_probes: int = 4  # probes per style whose per-token Gram is recorded
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


def sft_model(config: DemoConfig, cache: Path, progress: Callable[[float], None] | None = None
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The SFT'd tiny GPT-2 and its tokenizer: loaded from `cache` when its recipe hash matches, else
    trained from scratch and saved there."""
    stamp = cache / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == config.sft_key():
        return load_model(cache), load_tokenizer(cache)
    corpus = sft_corpus(config)
    tokenizer = build_tokenizer(corpus, vocab_size=config.vocab_size)
    model = build_model("gpt2", tokenizer, seed=config.seed, width=config.width, layers=config.layers)
    train_lm(model, tokenizer, corpus, config, progress)
    if cache.exists():
        shutil.rmtree(cache)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    stamp.write_text(json.dumps({"key": config.sft_key(), "config": asdict(config)}, indent=1))
    return model, tokenizer


def train_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, texts: list[str], config: DemoConfig,
             progress: Callable[[float], None] | None = None) -> list[float]:
    """Next-token prediction on `texts` (padded batches, loss on real tokens), AdamW; returns the losses.
    `progress(loss)` is called after every step."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    generator = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.sft_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / config.sft_steps))
    model.train()
    losses = []
    for step in range(config.sft_steps):
        batch = [ids[i] for i in torch.randint(len(ids), (config.sft_batch,), generator=generator).tolist()]
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, x in enumerate(batch):
            input_ids[b, :len(x)] = torch.tensor(x)
            mask[b, :len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(losses[-1])
    model.eval()
    return losses


def style_probes(config: DemoConfig, style: str) -> tuple[ProbeSet, ProbeSet]:
    """(probes, training pairs) of one style: the same statements across styles for one seed."""
    return (sentiment(config.probes, style=style, seed=config.seed),
            sentiment(config.train_pairs, style=style, seed=config.seed + 1))


@dataclass
class StyleSummary:
    """What the demo prints per style (from the trace)."""

    style: str
    trace: Path
    case_fractions: dict[int, float]  # at the last record
    chosen_trend: float  # mean Δ log π(chosen), first → last record
    rejected_trend: float
    cosine_mean: float  # mean over records and probes of cos(a_w, a_l)


def summarize_style(style: str, path: Path) -> StyleSummary:
    with open_trace(path) as tr:
        summary = summarize(tr)
    last = summary.records[-1]
    return StyleSummary(style, path, {c: last[f"case{c}_frac"] for c in (1, 2, 3, 4)},
                        summary.trend.get("chosen", float("nan")), summary.trend.get("rejected", float("nan")),
                        finite_mean(np.array([r["cosine_mean"] for r in summary.records])))


def style_run(config: DemoConfig, style: str, sft: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
              out: Path, progress: bool = False) -> Path:
    """DPO from the SFT model on one style's pairs, tracking its probes (with the SFT model's greedy
    output y* as the extra response "top", and per-token Grams); returns the trace path."""
    probes, pairs = style_probes(config, style)
    probes = top(probes, sft, tokenizer, max_new_tokens=16)
    probes.to_jsonl(out / f"probes-{style}.jsonl")
    trace = out / f"run-{style}.h5"
    run = TrainConfig(data=pairs, probes=probes, trace=trace, loss=config.loss, hparams={"beta": config.beta},
                      every=config.every, per_token="exact", per_token_probes=probes.ids[:config.token_probes],
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
    with progress_bar(progress, "SFT from scratch", config.sft_steps, with_loss=True) as advance:
        sft, tokenizer = sft_model(config, out / "sft-model", advance)
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
