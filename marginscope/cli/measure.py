"""`marginscope measure`: gradient geometry of a saved checkpoint on a probe file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from ..checkpoint import CheckpointMeasurement, measure_checkpoint
from ..dynamics.coefficients import CASE_NAMES
from ..compatibility import DEVICE_HELP
from .common import CONVENTION_HELP, MAX_LENGTH_HELP, TRUNCATION_HELP, out, parse_hparams, user_errors


@user_errors
def measure_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model directory (save_pretrained layout), a .gguf file, or a folder holding one."),
    probes: Path = typer.Option(..., "--probes", "-p", help="Probe file (JSONL)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write a one-record trace (.h5)."),
    loss: str = typer.Option("dpo", "--loss", help="Loss whose coefficients d_w, d_l classify the pairs."),
    beta: Optional[float] = typer.Option(None, "--beta", help="The loss's beta (shortcut for --hparam beta=…)."),
    hparam: list[str] = typer.Option([], "--hparam", help="Loss hyper-parameter KEY=VALUE (repeatable)."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference model directory or .gguf file (default: the model itself)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory or .gguf file (default: --model)."),
    params: str = typer.Option("trainable", "--params", help="Parameter scope: trainable, all, or a regex on names."),
    engine: str = typer.Option("auto", "--engine", help="Gram engine: auto (ghost when it covers the scope), ghost, exact, or projected (approximate)."),
    per_token: Optional[str] = typer.Option(None, "--per-token", help="Per-token Gram tier: head (LM head), tail (after the last attention) or exact (all)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Probes per forward pass."),
    projection_dim: int = typer.Option(4096, "--projection-dim", min=1, help="Sketch size per parameter (--engine projected)."),
    padding_side: str = typer.Option("right", "--padding-side", help="left or right (same numbers)."),
    convention: str = typer.Option("trl", "--convention", help=CONVENTION_HELP),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help=MAX_LENGTH_HELP),
    truncation_mode: str = typer.Option("keep_start", "--truncation-mode", help=TRUNCATION_HELP),
    add_eos: bool = typer.Option(False, "--add-eos", help="Append EOS to every response (--convention separate)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (saved dtype), float32, float64, bfloat16, float16."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    step: int = typer.Option(0, "--step", min=0, help="Step number to record."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Most probable next tokens kept per position in the trace."),
) -> None:
    """Measure log-probs and gradient geometry of a checkpoint on a probe set, and classify each pair.

    Example:

        marginscope measure --model ./ckpt --probes probes.jsonl -o out.h5 --loss dpo --beta 0.1
    """
    hparams = parse_hparams(hparam)
    if beta is not None:
        hparams["beta"] = beta
    result = measure_checkpoint(
        model, probes, output=output, loss=loss, hparams=hparams, ref_dir=ref, tokenizer_dir=tokenizer,
        params=params, engine=engine, per_token=per_token, batch_size=batch_size,
        padding_side=padding_side, convention=convention, max_length=max_length, truncation_mode=truncation_mode,
        add_eos=add_eos, dtype=dtype, device=device, step=step,
        projection_dim=projection_dim, top_k=top_k, progress=True)
    out.print(summary_table(result))
    if result.output is not None:
        out.print(f"wrote {result.output}")


def summary_table(result: CheckpointMeasurement) -> Table:
    """Per probe: log-probs, gradient cosine and norms, d_w/d_l and the Case."""
    geo, dyn = result.geometry, result.dynamics
    w, l = geo.index("chosen"), geo.index("rejected")
    table = Table(title=f"{len(geo.probe_ids)} probes · loss {result.loss!r} · "
                        f"scope {geo.scope_spec} ({geo.n_params:,} parameters)")
    table.add_column("probe")
    for name in geo.names:
        table.add_column(f"logp {name}", justify="right")
    for header in ("cos(w,l)", "‖a_w‖", "‖a_l‖", "d_w/d_l", "case"):
        table.add_column(header, justify="right")
    cos, norms = geo.cosine, geo.norms
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = dyn.d_w / dyn.d_l
    for n, pid in enumerate(geo.probe_ids):
        table.add_row(pid, *(f"{v:.3f}" for v in geo.logp[n]), f"{cos[n, w, l]:.3f}",
                      f"{norms[n, w]:.3g}", f"{norms[n, l]:.3g}", f"{ratio[n]:.3g}",
                      f"{dyn.case[n]} {CASE_NAMES[int(dyn.case[n])]}")
    return table
