"""The studies' tiny SFT models (cached), their preference runs and their figures.

Sentiment models are the embedded demo's (`marginscope.demo.recipe.sft_model`, one cache folder per
seed), or a user's pretrained model SFT'd on the same task (`pretrained_sft`); the arithmetic model is
trained the same way (`build_tokenizer`, `build_model`, `train_lm`) on
the correct completions of `ms.probes.arithmetic` questions, and cached under a hash of its recipe.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import shutil
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..demo.recipe import (
    DemoConfig, SFTReport, sft_corpus, sft_eval_pairs, sft_model, sft_until_ranked, train_lm, describe_sft)
from ..demo.tiny import build_model, build_tokenizer
from ..errors import MarginscopeError
from ..loading import load_model, load_tokenizer, model_name
from ..probes import ProbeSet, arithmetic
from ..trace import open_trace
from ..train import TrainConfig, TrainResult, train

Say = Callable[[str], None]


def sentiment_sft(seed: int, cache: Path, base: DemoConfig = DemoConfig()
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, SFTReport]:
    """The demo's SFT'd tiny GPT-2 for `seed` (its recipe otherwise unchanged; SFT until it ranks the
    labels), its tokenizer and SFT report, cached in `cache/sentiment-seed<seed>`."""
    return sft_model(replace(base, seed=seed), Path(cache) / f"sentiment-seed{seed}")


@dataclass(frozen=True)
class PretrainedSFT:
    """Recipe of the short SFT of a user's pretrained model on the sentiment task (margin-pitfalls §4.2
    SFTs its pretrained GPT-2 before DPO): next-token prediction on `statements` correct completions per
    style (the demo's corpus of the seed), AdamW at `lr` (20 warmup steps, then constant), until the
    fraction of held-out pairs ranked right (`eval` per style) reaches `target` and their chosen
    responses' per-token log-prob gains less than `plateau` nats per check (the model has learned the
    response templates too: an instruct model ranks the labels before any SFT), checked every
    `check_every` steps, at most `max_steps`. Only the top `train_layers` transformer blocks and the
    final norm are trained, here and in the DPO runs that follow (None: every parameter): the backward
    pass then stops at the lowest trained block, which keeps a 135M model tractable on a laptop CPU."""

    statements: int = 48
    eval: int = 8
    lr: float = 3e-4
    batch: int = 8
    check_every: int = 10
    target: float = 0.95
    plateau: float = 0.02
    max_steps: int = 40
    train_layers: int | None = 4


_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def train_top_layers(model: PreTrainedModel, k: int | None) -> int:
    """Make only the top `k` transformer blocks (parameter names `….layers.<i>.…`, i ≥ n − k) and the
    final norm (a name with "norm" or "ln_f" outside the blocks) trainable; None: every parameter.
    Embeddings and the (often tied) LM head are frozen. Returns the number of trainable parameters;
    raises `MarginscopeError` when k is not between 1 and the number of blocks."""
    if k is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    n = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(n, int) or not 1 <= k <= n:
        raise MarginscopeError(f"train_layers must be between 1 and the model's {n} blocks; got {k!r}")
    total = 0
    for name, p in model.named_parameters():
        block = _LAYER_INDEX.search(name)
        trainable = int(block.group(1)) >= n - k if block else ("norm" in name or "ln_f" in name)
        p.requires_grad_(trainable)
        total += p.numel() if trainable else 0
    return total


def pretrained_sft(model_path: str | Path, recipe: PretrainedSFT, seed: int, say: Say
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, SFTReport]:
    """A user's pretrained model (a model directory or GGUF file, loaded in float32) SFT'd on the
    sentiment task for `seed` until it ranks the labels (`PretrainedSFT`); not cached."""
    model, tokenizer = load_model(model_path, dtype="float32"), load_tokenizer(model_path)
    trainable = train_top_layers(model, recipe.train_layers)
    demo = replace(DemoConfig(), seed=seed, sft_statements=recipe.statements, sft_eval=recipe.eval)
    corpus = sft_corpus(demo)
    say(f"SFT of {model_name(model_path)} ({trainable:,} trainable parameters) on {len(corpus)} statements")
    report = sft_until_ranked(model, tokenizer, corpus, sft_eval_pairs(demo, corpus), lr=recipe.lr,
                              batch=recipe.batch, max_steps=recipe.max_steps, check_every=recipe.check_every,
                              target=recipe.target, plateau=recipe.plateau, seed=seed,
                              say=lambda line: say(f"  {line}"))
    return model, tokenizer, report


@dataclass(frozen=True)
class ArithmeticSFT:
    """Recipe of the arithmetic SFT model: the demo's model size and optimizer, on the correct answers
    (every format of `ARITHMETIC_FORMATS`) of `questions` questions drawn with seed 1000 + seed."""

    questions: int = 200
    steps: int = 450
    batch: int = 32
    lr: float = 5e-3
    width: int = 64
    layers: int = 2
    vocab_size: int = 512

    def key(self, seed: int) -> str:
        text = json.dumps({**asdict(self), "seed": seed, "recipe": "arithmetic-v1"}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def question_seed(self, seed: int) -> int:
        return 1000 + seed

    def corpus(self, seed: int) -> list[str]:
        pairs = arithmetic(self.questions, seed=self.question_seed(seed), pairs_per_question=5)
        return [p.prompt + p.chosen for p in pairs]


def arithmetic_sft(recipe: ArithmeticSFT, seed: int, cache: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The arithmetic SFT model of `seed`: loaded from `cache/arithmetic-seed<seed>` when its recipe
    hash matches, else trained from scratch (tokenizer and model) and saved there."""
    folder = Path(cache) / f"arithmetic-seed{seed}"
    stamp = folder / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == recipe.key(seed):
        return load_model(folder), load_tokenizer(folder)
    corpus = recipe.corpus(seed)
    tokenizer = build_tokenizer(corpus, vocab_size=recipe.vocab_size)
    model = build_model("gpt2", tokenizer, seed=seed, width=recipe.width, layers=recipe.layers)
    train_lm(model, tokenizer, corpus, steps=recipe.steps, batch=recipe.batch, lr=recipe.lr, seed=seed)
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    stamp.write_text(json.dumps({"key": recipe.key(seed), "seed": seed, "recipe": asdict(recipe)}, indent=1))
    return model, tokenizer


@dataclass(frozen=True)
class RunSetting:
    """How every preference run of a study trains (one setting per study, fixed up front)."""

    steps: int = 40
    batch: int = 8
    lr: float = 5e-4
    every: int = 4


def preference_run(setting: RunSetting, *, loss: str, hparams: dict[str, float], data: ProbeSet,
                   probes: ProbeSet, trace: Path, sft: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                   seed: int, per_token_probes: list[str] | None = None) -> TrainResult:
    """`ms.train` from a copy of `sft` (the reference is `sft` itself), tracking `probes` into `trace`:
    AdamW at a constant learning rate, no clipping, the tracker every `setting.every` steps."""
    config = TrainConfig(data=data, probes=probes, trace=trace, loss=loss, hparams=dict(hparams), every=setting.every,
                         per_token="exact" if per_token_probes else None, per_token_probes=per_token_probes,
                         steps=setting.steps, batch_size=setting.batch, lr=setting.lr, schedule="constant",
                         seed=seed, overwrite=True, convention="separate")  # the findings' convention
    result = train(config, model=copy.deepcopy(sft), tokenizer=tokenizer, ref_model=sft)
    check_trace(trace, setting.steps, setting.every)
    return result


def check_trace(path: Path, steps: int, every: int) -> None:
    """Refuse a trace whose records are missing (the tracker switches off a failing measurement rather
    than stop training, so a study must check it got every record before reading numbers from it)."""
    expected = [0, *range(every, steps + 1, every)]
    with open_trace(path) as tr:
        got = tr.steps.tolist()
        finite = bool(np.isfinite(tr.logp).all()) if len(got) else False
    if got != expected or not finite:
        raise MarginscopeError(f"{path}: the tracker recorded steps {got} (expected {expected}"
                               f"{'' if finite else ', all finite'}); see the log for the failing measurement")


def record_sft(context: dict[str, list], report: SFTReport, say: Say, where: str) -> None:
    """Append one seed's SFT outcome to a study's context (`sft_steps`, `sft_label_accuracy`: the
    fraction of held-out pairs ranked right after SFT; `sft_chosen_token_logp`) and say it."""
    context.setdefault("sft_steps", []).append(report.steps)
    context.setdefault("sft_label_accuracy", []).append(report.accuracy)
    context.setdefault("sft_chosen_token_logp", []).append(report.chosen_logp)
    say(f"{where}: SFT {describe_sft(report)}")


def sft_preference(trace: Path) -> dict[str, float]:
    """How the SFT model (the trace's first record) ranks each pair: the fraction of probes with
    log π(chosen) > log π(rejected), and the mean gap log π(chosen) − log π(rejected)."""
    with open_trace(trace) as tr:
        logp, names = tr.logp[0], tr.names
    gap = logp[:, names.index("chosen")] - logp[:, names.index("rejected")]
    return {"prefers_chosen": float(np.mean(gap > 0)), "gap": float(np.mean(gap))}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside (None: unchanged), restored after. The tiny models gain
    little from more threads, and on a shared CPU extra threads can make a run many times slower."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MarginscopeError(f"threads must be a whole number ≥ 1; got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_figures(traces: list[Path], out: Path, tokenizer: Any, say: Say) -> tuple[list[str], str | None]:
    """`ms.plots.save_all(traces, out, tokenizer=...)`; any failure is reported (one line to `say`, the
    traceback's last line kept) and the study goes on. Returns (paths written, error or None)."""
    try:
        from .. import plots

        written = plots.save_all(traces, out, tokenizer=tokenizer)
    except Exception as err:  # noqa: BLE001 — figures must never sink a study
        line = f"{type(err).__name__}: {err}".splitlines()[0]
        say(f"figures FAILED ({line}); the study's numbers are unaffected")
        return [], line + "\n" + "".join(traceback.format_exception(err)[-3:])
    say(f"figures: {len(written)} files in {out}")
    return [str(p) for p in written], None


def prepare_out(out: Path) -> Path:
    """Create the study's output folder (a one-line error when it is a file)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MarginscopeError(f"{out}: exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out
