"""Load a causal LM and its tokenizer from a local directory (`save_pretrained` layout) or a GGUF file.

A GGUF checkpoint (llama.cpp's format; `--model path/to/model.gguf`, or a folder holding exactly one
`.gguf` file and no config.json) is dequantized by transformers (the `gguf` package must be installed)
into an ordinary float model; its tokenizer and chat template come from the same file. The conversion
takes tens of seconds (≈ 20 s for a 135M model on 2 cores), so the dequantized float32 model and the
tokenizer are cached in `save_pretrained` layout under `$MARGINSCOPE_CACHE/gguf/` (default
`~/.cache/marginscope/gguf/`), keyed by the file's absolute path, size and modification time and the
transformers version; a cached load takes well under a second. `MARGINSCOPE_CACHE=off` disables the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import MarginscopeError

DTYPES = {"auto": "auto", "float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
GGUF_SUFFIX = ".gguf"
CACHE_ENV = "MARGINSCOPE_CACHE"


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a `save_pretrained` folder (gguf None) or the GGUF file `folder / gguf`."""

    folder: Path
    gguf: str | None = None

    @property
    def path(self) -> Path:
        """The model directory, or the GGUF file itself."""
        return self.folder / self.gguf if self.gguf else self.folder

    def __str__(self) -> str:
        return str(self.path)


def resolve_model(path: str | Path) -> ModelSource:
    """What `--model PATH` names: a model directory (with config.json), a `.gguf` file, or a folder
    holding exactly one `.gguf` file (and no config.json). Raises `MarginscopeError` (one line, naming
    the path) when it is none of these, or a folder with several GGUF files."""
    path = Path(path)
    if not path.exists():
        raise MarginscopeError(f"{path}: model directory or .gguf file does not exist")
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise MarginscopeError(f"{path}: expected a model directory (save_pretrained layout) or a .gguf file, "
                                   "got another file")
        return ModelSource(path.parent, path.name)
    if (path / "config.json").exists():
        return ModelSource(path)
    ggufs = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() == GGUF_SUFFIX)
    if len(ggufs) > 1:
        raise MarginscopeError(f"{path}: {len(ggufs)} GGUF files ({', '.join(ggufs)}); name one, e.g. "
                               f"--model {path / ggufs[0]}")
    if ggufs:
        return ModelSource(path, ggufs[0])
    raise MarginscopeError(f"{path}: no config.json and no .gguf file — not a saved Hugging Face model "
                           "directory or GGUF checkpoint")


def model_name(path: str | Path) -> str:
    """The name a trace records for `path`: the GGUF file when it is one (or a folder holding one), else
    the directory (as given). Raises `MarginscopeError` like `resolve_model`."""
    return str(resolve_model(path))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the directory `path` (a model directory, or one holding only a tokenizer),
    or stored in the GGUF file `path` (with its chat template); a one-line `MarginscopeError` when there
    is none."""
    folder = Path(path)
    if folder.is_dir() and any((folder / name).exists() for name in _TOKENIZER_FILES):
        return _from_pretrained_tokenizer(folder, folder)
    source = resolve_model(path)
    if source.gguf is not None:
        folder = gguf_cache(source)
        if folder is None:
            return _tokenizer_from_gguf(source)
        return _named(_from_pretrained_tokenizer(folder, source.path), source)
    path = source.folder
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise MarginscopeError(
            f"{path}: no tokenizer in the model directory (expected one of {', '.join(_TOKENIZER_FILES)}); "
            "save it there with tokenizer.save_pretrained(DIR) or pass --tokenizer DIR")
    return _from_pretrained_tokenizer(path, path)


def load_model(path: str | Path, *, dtype: str = "auto", device: str = "cpu") -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` on a local directory or GGUF file, on `device`, in eval mode.

    dtype: "auto" keeps the checkpoint's saved dtype (transformers 5 behaviour; often bfloat16) — float32
    for a GGUF file, whose quantized weights are dequantized to float32 — or one of `DTYPES`. A GGUF
    model's `config._name_or_path` is the GGUF file's path, so traces name the file.
    Raises `MarginscopeError` (one line) for a bad dtype or device, or a checkpoint transformers cannot load.
    """
    source = resolve_model(path)
    if dtype not in DTYPES:
        raise MarginscopeError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if source.gguf is not None:
        folder = gguf_cache(source)
        model = _model_from_gguf(source, dtype) if folder is None else _from_pretrained_model(folder, dtype, source.path)
        model.config._name_or_path = model.name_or_path = str(source.path)
    else:
        model = _from_pretrained_model(source.folder, dtype, source.folder)
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise MarginscopeError(f"device {device!r}: {str(err).splitlines()[0]}") from None
    return model.eval()


def gguf_cache(source: ModelSource) -> Path | None:
    """The cache folder of a GGUF source's dequantized float32 model and tokenizer (`save_pretrained`
    layout), converting the file on first use; None when `$MARGINSCOPE_CACHE` is "off". Raises
    `MarginscopeError` when the file cannot be converted (unsupported architecture, no `gguf` package)."""
    root = os.environ.get(CACHE_ENV, "")
    if root.lower() in ("off", "0", "none", "false"):
        return None
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "marginscope"
    file = source.path.resolve()
    stat = file.stat()
    key = hashlib.sha256(json.dumps([str(file), stat.st_size, stat.st_mtime_ns, transformers.__version__]).encode())
    folder = base / "gguf" / f"{file.stem}-{key.hexdigest()[:16]}"
    if (folder / "source.json").is_file():
        return folder
    model = _model_from_gguf(source, "float32")
    tokenizer = _tokenizer_from_gguf(source)
    scratch = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "source.json").write_text(json.dumps({"gguf": str(file), "size": stat.st_size,
                                                         "mtime_ns": stat.st_mtime_ns}, indent=1) + "\n")
        if folder.exists():  # a conversion that did not finish (no source.json)
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(scratch, folder)
        except OSError:
            if not (folder / "source.json").is_file():  # not another process finishing the same conversion
                raise
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as err:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise MarginscopeError(f"{base}: cannot write the GGUF conversion cache ({err.strerror or err}); "
                               f"set {CACHE_ENV} to a writable folder, or to 'off'") from None
    return folder


def _model_from_gguf(source: ModelSource, dtype: str) -> PreTrainedModel:
    """The GGUF file dequantized to `dtype` ("auto": float32), as a plain (saveable) model."""
    with _gguf_errors(source):
        model, info = AutoModelForCausalLM.from_pretrained(
            source.folder, gguf_file=source.gguf, local_files_only=True, output_loading_info=True,
            dtype=torch.float32 if dtype == "auto" else DTYPES[dtype])
    missing = sorted(set(info.get("missing_keys") or ()) | set(info.get("mismatched_keys") or ()))
    if missing:  # transformers would fill them with random init: refuse a silently partial model
        raise MarginscopeError(f"{source}: transformers {transformers.__version__} maps only part of this GGUF "
                               f"file: {len(missing)} weights missing or of the wrong shape (e.g. {missing[0]})")
    # The weights are dequantized floats: drop the quantizer marker so save_pretrained (checkpoints) works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _tokenizer_from_gguf(source: ModelSource) -> PreTrainedTokenizerBase:
    with _gguf_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf, local_files_only=True)
    return _named(tokenizer, source)


def _named(tokenizer: PreTrainedTokenizerBase, source: ModelSource) -> PreTrainedTokenizerBase:
    tokenizer.name_or_path = str(source.path)
    return tokenizer


@contextlib.contextmanager
def _gguf_errors(source: ModelSource) -> Iterator[None]:
    """Turn what transformers / gguf raise on a GGUF file into one-line `MarginscopeError`s."""
    try:
        yield
    except MarginscopeError:
        raise
    except Exception as err:  # noqa: BLE001 — a GGUF parse can fail many ways; all are the file's fault
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, ImportError):
            raise MarginscopeError(f"{source}: reading GGUF files needs the gguf package (pip install gguf): "
                                   f"{line}") from None
        if "not supported" in line or isinstance(err, NotImplementedError):
            raise MarginscopeError(f"{source}: transformers {transformers.__version__} cannot load this GGUF "
                                   f"architecture: {line}") from None
        raise MarginscopeError(f"{source}: cannot load the GGUF file: {type(err).__name__}: {line}") from None


def _from_pretrained_tokenizer(folder: Path, shown: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MarginscopeError(f"{shown}: cannot load the tokenizer: {str(err).splitlines()[0]}") from None


def _from_pretrained_model(folder: Path, dtype: str, shown: Path) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise MarginscopeError(f"{shown}: cannot load the model: {str(err).splitlines()[0]}") from None


def config_hash(model: PreTrainedModel) -> str:
    """sha256 of the model config (sorted JSON), to tell checkpoints of different models apart."""
    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(cfg.encode()).hexdigest()
