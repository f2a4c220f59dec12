"""Shared CLI plumbing: user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import typer
from rich.console import Console

from ..errors import MarginscopeError

# Tables keep their full width when piped or captured (no terminal to size them by).
_WIDTH = None if sys.stdout.isatty() else 200
out = Console(width=_WIDTH)
err = Console(stderr=True, soft_wrap=True)
USER_ERROR = 2


def user_errors(command: Callable) -> Callable:
    """Run a command; a MarginscopeError is printed as `error: …` (one line) with exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MarginscopeError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(USER_ERROR) from None

    return wrapper


def parse_hparams(items: list[str]) -> dict[str, float]:
    """`key=value` pairs → {key: float(value)}."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MarginscopeError(f"--hparam {item!r}: expected KEY=VALUE, e.g. --hparam gamma=0.5")
        try:
            parsed[key.strip()] = float(value)
        except ValueError:
            raise MarginscopeError(f"--hparam {item!r}: value {value!r} is not a number") from None
    return parsed


CONVENTION_HELP = ("How probes become token ids: trl (TRL 1.x DPOTrainer: joint tokenization, chat template with "
                   "end-of-turn, EOS after plain text; needs trl) or separate (prompt and response apart).")
MAX_LENGTH_HELP = "Truncate prompt+response to this many tokens, as DPOConfig.max_length (default: none)."
TRUNCATION_HELP = "keep_start or keep_end, as DPOConfig.truncation_mode."
