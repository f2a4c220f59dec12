"""Up-front checks that a model, its reference and a tokenizer fit together, and device resolution.

A token id beyond a model's embedding table ends in an `IndexError` deep inside the forward (or a
CUDA device-side assert); a reference with another vocabulary scores log-probs over another support.
`check_compatible` turns both into one line before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import MarginscopeError

DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:1, mps, …"


def resolve_device(device: str) -> str:
    """`"auto"` → "cuda" when a CUDA device is available, else "cpu"; any other choice as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def vocabulary_rows(model: nn.Module) -> int | None:
    """How many token ids `model` accepts: the rows of its input embedding (None when it has none)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def output_vocabulary(model: nn.Module) -> int | None:
    """How many tokens `model`'s head scores (its output embedding's rows; the config's vocab_size
    when there is none)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_compatible(model: nn.Module, tokenizer, ref_model: nn.Module | None = None, *, encoded: Sequence = (),
                     model_name: str = "model", ref_name: str = "reference") -> None:
    """Raise one-line MarginscopeError when a token id can fall outside the vocabulary of `model` or
    `ref_model`: the tokenizer's size (len(tokenizer), added tokens included) or its special ids (bos,
    eos, pad, unk) beyond the embedding rows, a scored id (`encoded`, `EncodedProbe`s) beyond them,
    or a reference that scores another number of tokens than the model. `model_name` / `ref_name`
    (e.g. the directories) name them in the message."""
    size = len(tokenizer)
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    top = max((max((max(e.prompt_ids, default=-1), *(max(r, default=-1) for r in e.response_ids)))
               for e in encoded), default=-1)
    for name, m in ((model_name, model), (ref_name, ref_model)):
        if m is None:
            continue
        rows = vocabulary_rows(m)
        if rows is None:
            continue
        if size > rows:
            raise MarginscopeError(f"{name}: its embedding has {rows} token rows but the tokenizer has {size} "
                                   f"tokens (ids up to {size - 1}); they do not belong together: use the tokenizer "
                                   "saved with the model (--tokenizer DIR) or resize the embeddings")
        for special, token_id in specials.items():
            if token_id is not None and not 0 <= token_id < rows:
                raise MarginscopeError(f"{name}: the tokenizer's {special} id {token_id} is outside its "
                                       f"vocabulary of {rows} tokens")
        if top >= rows:
            raise MarginscopeError(f"{name}: a probe token id ({top}) is outside its vocabulary of {rows} tokens")
    if ref_model is not None:
        ours, theirs = output_vocabulary(model), output_vocabulary(ref_model)
        if ours is not None and theirs is not None and ours != theirs:
            raise MarginscopeError(f"{ref_name}: it scores {theirs} tokens and {model_name} {ours}; log-probs "
                                   "over different vocabularies are not comparable (use a reference with the "
                                   "model's tokenizer)")
