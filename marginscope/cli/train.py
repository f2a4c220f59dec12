"""`marginscope train`: preference optimization with any loss of the zoo, the tracker attached."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..compatibility import DEVICE_HELP
from ..errors import MarginscopeError
from ..train import TrainConfig, TrainResult, train
from .common import CONVENTION_HELP, MAX_LENGTH_HELP, TRUNCATION_HELP, out, parse_hparams, user_errors


@user_errors
def train_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory (save_pretrained layout, with its tokenizer), or a .gguf file."),
    data: Path = typer.Option(..., "--data", "-d", help="Training pairs (JSONL in the probe format; 'extra' is ignored)."),
    loss: str = typer.Option("dpo", "--loss", help="Loss of the zoo (see docs/losses.md)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="The loss's beta (shortcut for --hparam beta=…)."),
    hparam: list[str] = typer.Option([], "--hparam", help="Loss hyper-parameter KEY=VALUE (repeatable)."),
    probes: Optional[Path] = typer.Option(None, "--probes", "-p", help="Probe file to track (needs -o)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Trace file (.h5) the tracker writes (needs --probes)."),
    every: int = typer.Option(10, "--every", help="Record the probes every N optimizer steps (and at step 0)."),
    per_token: Optional[str] = typer.Option(None, "--per-token", help="Per-token Gram tier of the probes: head, tail or exact."),
    per_token_probe: list[str] = typer.Option([], "--per-token-probe", help="Probe id whose per-token Gram is recorded (repeatable; default: every probe)."),
    top_k: int = typer.Option(5, "--top-k", help="Most probable next tokens kept per position in the trace."),
    in_run: bool = typer.Option(True, "--in-run/--no-in-run", help="Record the exact geometry of every training pair."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder for checkpoint-<step>/ (the last step is always saved)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (with --epochs: whichever ends first)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (default 1 when --steps is not set)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Pairs per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-6, "--lr", help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    schedule: str = typer.Option("linear", "--schedule", help="linear (decay to 0) or constant, after warmup."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Steps of linear warmup from 0."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm (default: no clipping)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order and of torch (dropout)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Save a checkpoint every K steps (needs --out-dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out-dir (and its trace)."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference model directory or .gguf file (default: the initial model)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="auto (saved dtype), float32, float64, bfloat16, float16."),
    convention: str = typer.Option("trl", "--convention", help=CONVENTION_HELP),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help=MAX_LENGTH_HELP),
    truncation_mode: str = typer.Option("keep_start", "--truncation-mode", help=TRUNCATION_HELP),
    add_eos: bool = typer.Option(False, "--add-eos", help="Append EOS to every response (--convention separate)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing trace and earlier checkpoints in --out-dir."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard the model with FSDP2 (fully_shard per decoder block and root) instead of DDP; under torchrun. Checkpoints hold the full model, as without --fsdp."),
) -> None:
    """Train on preference pairs with any loss of the zoo and record the probes' dynamics.

    Example:

        marginscope train --model ./sft --data prefs.jsonl --loss dpo --beta 0.1 --probes probes.jsonl --every 5 -o run.h5 --out-dir ckpt --steps 200 --lr 1e-6 --checkpoint-every 50
    """
    if resume and resume_from is not None:
        raise MarginscopeError("give --resume (the latest checkpoint in --out-dir) or --resume-from DIR, not both")
    hparams = parse_hparams(hparam)
    if beta is not None:
        hparams["beta"] = beta
    config = TrainConfig(
        data=data, model=model, loss=loss, hparams=hparams, ref=ref, probes=probes, trace=output, every=every,
        per_token=per_token, per_token_probes=per_token_probe or None, top_k=top_k, in_run=in_run, out_dir=out_dir, steps=steps, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, schedule=schedule,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, seed=seed, checkpoint_every=checkpoint_every,
        resume="latest" if resume else resume_from, overwrite=overwrite,
        device=device, dtype=dtype, convention=convention, max_length=max_length, truncation_mode=truncation_mode,
        add_eos=add_eos, fsdp=fsdp, progress=True)
    result = train(config)
    if result.rank == 0:
        out.print(summary_table(result))


def summary_table(result: TrainResult) -> Table:
    """Steps, final loss and margin, outputs and time of a finished run."""
    table = Table(title="marginscope train", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    last = result.history[-1] if result.history else None
    rows = {
        "steps": str(result.steps),
        "final loss": f"{last.loss:.4f}" if last else "—",
        "final margin": f"{last.margin:+.4f} (pairs with margin > 0: {last.accuracy:.0%})" if last else "—",
        "trace": str(result.trace) if result.trace else "— (no --probes)",
        "checkpoint": str(result.checkpoint) if result.checkpoint else "— (no --out-dir)",
        "time": f"{result.seconds:.1f} s",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table
