"""Load a causal LM and its tokenizer from a local directory (`save_pretrained` layout)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import MarginscopeError

DTYPES = {"auto": "auto", "float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MarginscopeError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise MarginscopeError(f"{path}: expected a model directory (save_pretrained layout), got a file")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path`; a one-line error when there is none."""
    path = _model_dir(path)
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise MarginscopeError(
            f"{path}: no tokenizer in the model directory (expected one of {', '.join(_TOKENIZER_FILES)}); "
            "save it there with tokenizer.save_pretrained(DIR) or pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MarginscopeError(f"{path}: cannot load the tokenizer: {str(err).splitlines()[0]}") from None


def load_model(path: str | Path, *, dtype: str = "auto", device: str = "cpu") -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` on a local directory, in eval mode.

    dtype "auto" keeps the checkpoint's saved dtype (transformers 5 behaviour; often bfloat16).
    """
    path = _model_dir(path)
    if dtype not in DTYPES:
        raise MarginscopeError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if not (path / "config.json").exists():
        raise MarginscopeError(f"{path}: no config.json — not a saved Hugging Face model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise MarginscopeError(f"{path}: cannot load the model: {str(err).splitlines()[0]}") from None
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise MarginscopeError(f"device {device!r}: {str(err).splitlines()[0]}") from None
    return model.eval()


def config_hash(model: PreTrainedModel) -> str:
    """sha256 of the model config (sorted JSON), to tell checkpoints of different models apart."""
    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(cfg.encode()).hexdigest()
