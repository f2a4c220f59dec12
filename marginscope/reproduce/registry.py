"""The registry of reproduction studies: name → module with `Config`, `run`, `NAME`, `TITLE`, `SOURCE`."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import MarginscopeError
from ..loading import resolve_model
from . import losses, mass_shift, sentiment, spo_stability
from .findings import StudyResult
from .models import Say, prepare_out, torch_threads

ALL = "all"


@dataclass(frozen=True)
class Study:
    """One study: its module holds `Config` (with `.reduced()`), `run(out, config=, cache=, say=)`."""

    name: str
    title: str
    source: str
    module: ModuleType

    @property
    def takes_model(self) -> bool:
        """Whether the study can run on a user's pretrained model (`model=`, `--model`)."""
        return getattr(self.module, "TAKES_MODEL", False)

    def config(self, *, seeds: int | None = None, reduced: bool = False, model: str | Path | None = None) -> Any:
        """The study's fixed setting (or its seconds-long reduced version), with `seeds` seeds if given,
        on the pretrained `model` (a directory or GGUF file; checked here) when given. Raises
        `MarginscopeError` for bad seeds, a model the study cannot take, or a path that is no model."""
        if model is not None:
            if not self.takes_model:
                takers = ", ".join(s.name for s in STUDIES.values() if s.takes_model)
                raise MarginscopeError(f"study {self.name!r} runs on its own tiny models only; --model works with: "
                                       f"{takers}")
            resolve_model(model)
            config = self.module.Config.for_model(model, reduced=reduced)
        else:
            config = self.module.Config.reduced() if reduced else self.module.Config()
        if seeds is not None:
            if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
                raise MarginscopeError(f"seeds must be a whole number ≥ 1; got {seeds!r}")
            config = replace(config, seeds=seeds)
        return config

    def run(self, out: str | Path, *, seeds: int | None = None, cache: str | Path | None = None,
            reduced: bool = False, config: Any = None, threads: int | None = 1, model: str | Path | None = None,
            say: Say = print) -> StudyResult:
        """Run the study into `out` (SFT models cached in `cache`, default `out/sft-models`), with torch
        limited to `threads` intra-op threads (None: as configured), on the pretrained `model` if given."""
        if config is None:
            config = self.config(seeds=seeds, reduced=reduced, model=model)
        elif seeds is not None:
            config = replace(config, seeds=seeds)
        with torch_threads(threads):
            result = self.module.run(Path(out), config=config, cache=None if cache is None else Path(cache), say=say)
        result.explain()
        result.save(out)
        return result


STUDIES: dict[str, Study] = {
    m.NAME: Study(m.NAME, m.TITLE, m.SOURCE, m) for m in (sentiment, losses, mass_shift, spo_stability)
}


def names() -> list[str]:
    """The study names, in the order `all` runs them."""
    return list(STUDIES)


def get(name: str) -> Study:
    """The study `name`; a one-line MarginscopeError naming the known ones otherwise."""
    try:
        return STUDIES[name]
    except KeyError:
        raise MarginscopeError(f"unknown study {name!r}; known: {', '.join(STUDIES)} (or {ALL})") from None


def run(name: str, out: str | Path, *, seeds: int | None = None, cache: str | Path | None = None,
        reduced: bool = False, threads: int | None = 1, model: str | Path | None = None,
        say: Say = print) -> list[StudyResult]:
    """Run one study (into `out`) or `all` of them (each into `out/<name>`, sharing the SFT cache
    `out/sft-models` unless `cache` is given); returns the results in order. `threads`: torch intra-op
    threads during the runs (default 1: the tiny models gain little from more, and on a shared CPU
    oversubscribed threads can make a run ten times slower; None leaves torch's setting). `model`: run
    the study on a user's pretrained model (directory or GGUF file; one study, which must take it)."""
    with torch_threads(threads):  # bad options fail before anything is written
        if name != ALL:
            study = get(name)
            study.config(seeds=seeds, reduced=reduced, model=model)
            return [study.run(out, seeds=seeds, cache=cache, reduced=reduced, threads=None, model=model, say=say)]
        if model is not None:
            raise MarginscopeError(f"--model runs one study at a time, not {ALL}; e.g. reproduce sentiment --model {model}")
        for study in STUDIES.values():
            study.config(seeds=seeds, reduced=reduced)
        return _run_all(Path(out), seeds=seeds, cache=cache, reduced=reduced, say=say)


def _run_all(out: Path, *, seeds: int | None, cache: str | Path | None, reduced: bool, say: Say) -> list[StudyResult]:
    out = prepare_out(out)
    cache = Path(cache) if cache is not None else out / "sft-models"
    results = []
    for study in STUDIES.values():
        started = time.perf_counter()
        say(f"== {study.name}: {study.title}")
        results.append(study.run(out / study.name, seeds=seeds, cache=cache, reduced=reduced, threads=None, say=say))
        say(f"== {study.name}: done in {time.perf_counter() - started:.0f} s")
    return results
