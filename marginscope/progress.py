"""The one progress bar of long jobs: transient, rich, on stderr, only when asked for and stderr is a
terminal (so logs and captured output get no residue)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, total: int, *, completed: int = 0,
                 with_loss: bool = False) -> Iterator[Callable[..., None]]:
    """Yields `advance(loss=None)`: one more unit done (and, with `with_loss`, the latest loss shown).
    A no-op when disabled or when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda loss=None: None
        return

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    if with_loss:
        columns.insert(3, TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total, completed=completed, loss="—")

        def advance(loss: float | None = None) -> None:
            bar.update(task, advance=1, **({} if loss is None else {"loss": f"{loss:.4f}"}))

        yield advance
