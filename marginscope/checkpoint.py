"""Measure a saved checkpoint on a probe file and write the result as a one-record trace."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import losses as loss_zoo
from .compatibility import check_compatible, resolve_device
from .conventions import check_convention, encode_probes
from .dynamics.measure import Geometry, PairDynamics, check_options, measure, pair_dynamics
from .dynamics.scoring import model_max_length, sequence_logp, top_tokens, vocabulary_text
from .errors import MarginscopeError
from .loading import DTYPES, config_hash, load_model, load_tokenizer, model_name
from .probes import load as load_probes
from .trace import Record, write_trace


@dataclass
class CheckpointMeasurement:
    geometry: Geometry
    dynamics: PairDynamics
    ref_logp: np.ndarray
    loss: Any
    output: Path | None


def versions() -> dict[str, str]:
    """Versions of the software a trace was made with."""
    import torch
    import transformers

    from . import __version__
    found = {"marginscope": __version__, "torch": torch.__version__,
             "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import trl
        found["trl"] = trl.__version__
    except ImportError:
        pass
    return found


def check_output_path(output: str | Path) -> Path:
    """Fail before any heavy work when the output cannot be written."""
    output = Path(output)
    if output.is_dir():
        raise MarginscopeError(f"{output}: is a directory, expected an output .h5 file path")
    if not output.parent.exists():
        raise MarginscopeError(f"{output}: folder {output.parent} does not exist")
    return output


def measure_checkpoint(model_dir: str | Path, probes_path: str | Path, *, output: str | Path | None = None,
                       loss: str = "dpo", hparams: dict[str, float] | None = None,
                       ref_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                       params: str = "trainable", engine: str = "auto", per_token: str | None = None,
                       batch_size: int = 8, padding_side: str = "right", convention: str = "trl",
                       max_length: int | None = None, truncation_mode: str = "keep_start", add_eos: bool = False,
                       dtype: str = "auto", device: str = "auto", step: int = 0,
                       projection_dim: int = 4096, projection_seed: int = 0, top_k: int = 5,
                       progress: bool = False) -> CheckpointMeasurement:
    """Load model, tokenizer and probes; check they fit together (`check_compatible`: vocabulary size,
    special ids, the reference's vocabulary); encode the probes under `convention` (see
    `marginscope.conventions`); measure; evaluate `loss` (reference = `ref_dir`, or the model itself);
    write a one-record trace (with the `top_k` next tokens per position) to `output` when given.
    device "auto": cuda when available, else cpu."""
    out = check_output_path(output) if output is not None else None
    check_options(engine=engine, per_token=per_token, batch_size=batch_size, padding_side=padding_side)
    check_convention(convention, max_length=max_length, truncation_mode=truncation_mode, add_eos=add_eos)
    device = resolve_device(device)
    if dtype not in DTYPES:
        raise MarginscopeError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if top_k < 1:
        raise MarginscopeError(f"top_k must be ≥ 1; got {top_k}")
    loss_fn = loss_zoo.get(loss, **(hparams or {}))
    probes = load_probes(probes_path)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    model = load_model(model_dir, dtype=dtype, device=device)
    ref_model = None if ref_dir is None else load_model(ref_dir, dtype=dtype, device=device)
    encoded = encode_probes(tokenizer, probes, convention=convention, max_length=max_length,
                            truncation_mode=truncation_mode, add_eos=add_eos, context_length=model_max_length(model))
    check_compatible(model, tokenizer, ref_model, encoded=encoded, model_name=f"{model_dir} (model)",
                     ref_name=f"{ref_dir} (reference)")
    geo = measure(model, tokenizer, probes, params=params, engine=engine, per_token=per_token,
                  batch_size=batch_size, padding_side=padding_side, encoded=encoded,
                  projection_dim=projection_dim, projection_seed=projection_seed, progress=progress)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if ref_model is None:
        ref_logp = geo.logp
    else:
        ref_logp = sequence_logp(ref_model, geo.encoded, batch_size=batch_size,
                                 padding_side=padding_side, pad_id=pad_id).numpy()
    dyn = pair_dynamics(geo, loss_fn, ref_logp)
    if out is not None:
        metadata = {
            "kind": "measure", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": model_name(model_dir), "model_config_hash": config_hash(model),
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "reference": model_name(ref_dir) if ref_dir is not None else "model itself",
            "loss": loss_fn.name, "loss_hparams": loss_fn.hparams, "scope": geo.scope_spec,
            "n_params": geo.n_params, "engine": geo.engine, "per_token": geo.per_token,
            **({"projection_dim": projection_dim, "projection_seed": projection_seed} if geo.engine == "projected" else {}),
            "padding_side": padding_side, "convention": convention, "max_length": max_length,
            "truncation_mode": truncation_mode, "add_eos": add_eos, "versions": versions(),
        }
        topk_ids, topk_prob = top_tokens(model, geo.encoded, top_k, batch_size=batch_size,
                                         padding_side=padding_side, pad_id=pad_id)
        token_gram = {geo.probe_ids.index(pid): (g, *geo.token_sqnorm[pid]) for pid, g in geo.token_gram.items()}
        record = Record(step=step, logp=geo.logp, token_logp=geo.token_logp, gram=geo.gram,
                        d_w=dyn.d_w, d_l=dyn.d_l, case=dyn.case, predicted_delta=dyn.predicted_delta,
                        observed_delta=np.full_like(geo.logp, np.nan), topk_ids=topk_ids,
                        topk_prob=topk_prob, token_gram=token_gram)
        write_trace(out, probes=probes, encoded=geo.encoded, names=geo.names, metadata=metadata,
                    records=[record], ref_logp=ref_logp, top_k=top_k, vocab_text=vocabulary_text(tokenizer))
    return CheckpointMeasurement(geo, dyn, np.asarray(ref_logp), loss_fn, out)
