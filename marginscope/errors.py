"""User-facing errors: one line that names the file, line and field."""

from __future__ import annotations

from os import PathLike


class MarginscopeError(Exception):
    """A mistake in the user's input; the CLI prints it as one line and exits non-zero."""


class InputError(MarginscopeError):
    """Bad content in a user file, located by path, line (1-based) and field."""

    def __init__(self, message: str, path: str | PathLike | None = None,
                 line: int | None = None, field: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.reason = message
        where = ":".join(str(p) for p in (self.path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        what = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{what}{message}")
