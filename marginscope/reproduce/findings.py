"""What a reproduction study returns: one `Finding` per published claim, gathered in a `StudyResult`.

A finding's `holds` is computed from its `numbers` by the study's decision function (pure, tested on
synthetic numbers both ways), never set by hand; a claim that fails on our model stays in the table
as not holding, with the numbers that decided it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import MarginscopeError
from ..trace import open_trace
from ..trace.summary import agreement, intervals

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class Finding:
    """One claim tested on our model.

    claim: the published statement (with its source); expected: the measurable form of it on our
    setting; observed: what happened, in words with the numbers; holds: the decision, a bool computed
    from `numbers`; numbers: every number the decision used (floats, or lists of per-seed floats)."""

    claim: str
    expected: str
    observed: str
    holds: bool
    numbers: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.holds, bool):
            raise TypeError(f"Finding.holds must be a bool; got {type(self.holds).__name__}")
        if not self.numbers:
            raise ValueError(f"Finding {self.claim!r} has no numbers")

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "expected": self.expected, "observed": self.observed, "holds": self.holds,
                "numbers": _jsonable(self.numbers)}


@dataclass
class StudyResult:
    """A study's findings and everything needed to check them: its setting (one per study, fixed up
    front), seeds, traces, figures (or why they failed), secondary observations and wall time."""

    name: str
    title: str
    source: str
    setting: dict[str, Any]
    seeds: list[int]
    findings: list[Finding]
    observations: list[dict[str, Any]] = field(default_factory=list)  # extra rows (e.g. per-loss trends)
    context: dict[str, Any] = field(default_factory=dict)  # facts about the setting (e.g. SFT accuracy per seed)
    traces: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    figures_error: str | None = None
    seconds: float = math.nan
    out: str | None = None
    explanation: dict[str, Any] = field(default_factory=dict)  # see `explain`

    @property
    def holding(self) -> int:
        """How many findings hold."""
        return sum(f.holds for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["findings"] = [f.to_dict() for f in self.findings]
        return _jsonable(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyResult:
        data = dict(data)
        data["findings"] = [Finding(**f) for f in data["findings"]]
        return cls(**data)

    def explain(self) -> None:
        """Fill `explanation` from the study's traces: per response, the mean over traces of Pearson r
        (and sign agreement) of the self view and of the actual-update first order against the observed
        change (`marginscope.trace.summary.agreement`; DESIGN.md §2b)."""
        fits: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for path in self.traces:
            with open_trace(path) as tr:
                summary = agreement(intervals(tr), tr.names)
            for name, views in summary.get("fits", {}).items():
                for view, fit in views.items():
                    fits.setdefault(name, {}).setdefault(view, []).append((fit["r"], fit["sign_agreement"]))
        mean = lambda values: float(np.nanmean(values)) if np.isfinite(values).any() else math.nan  # noqa: E731
        self.explanation = {name: {view: {"r": mean([r for r, _ in v]), "sign": mean([s for _, s in v])}
                                   for view, v in views.items()} for name, views in fits.items()}
        self.explanation["traces"] = len(self.traces)

    def save(self, out: str | Path) -> Path:
        """Write the result as `out/results.json` (NaN as null); returns the path."""
        path = Path(out) / RESULTS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def load_result(path: str | Path) -> StudyResult:
    """A `StudyResult` from a results.json (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        return StudyResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise MarginscopeError(f"{path}: not a reproduce results file ({err})") from None


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, NaN/inf to None, paths to strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


# --- decision helpers shared by the studies ---------------------------------------------------------


def seed_mean(values: Sequence[float]) -> float:
    """Mean of the finite per-seed values (NaN when none is finite)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def majority(flags: Sequence[bool]) -> bool:
    """True when more than half of the per-seed flags are true (and there is at least one)."""
    flags = [bool(f) for f in flags]
    return bool(flags) and sum(flags) * 2 > len(flags)


def agree(flags: Sequence[bool]) -> str:
    """'2/3 seeds' — how many seeds show the effect."""
    flags = [bool(f) for f in flags]
    return f"{sum(flags)}/{len(flags)} seed{'s' if len(flags) != 1 else ''}"


def fmt(x: float, digits: int = 3, sign: bool = True) -> str:
    """A number for the observed text (NaN shown as 'n/a')."""
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    return f"{float(x):+.{digits}f}" if sign else f"{float(x):.{digits}f}"


def robust(numbers: dict[str, Any], keys: Sequence[str], condition) -> bool:
    """The study-wide rule: a claim holds when `condition` (a predicate on {key: value}) is true for
    the seed means of `numbers[key]` (per-seed lists) AND for a majority of the seeds."""
    lists = {k: list(np.atleast_1d(np.asarray(numbers[k], dtype=np.float64))) for k in keys}
    n = min(len(v) for v in lists.values())
    if n == 0:
        return False
    mean = {k: seed_mean(v[:n]) for k, v in lists.items()}
    per_seed = [condition({k: v[i] for k, v in lists.items()}) for i in range(n)]
    return bool(condition(mean)) and majority(per_seed)


def seed_flags(numbers: dict[str, Any], keys: Sequence[str], condition) -> list[bool]:
    """Per seed, whether `condition` holds (for the 'k/n seeds' text)."""
    lists = {k: list(np.atleast_1d(np.asarray(numbers[k], dtype=np.float64))) for k in keys}
    n = min(len(v) for v in lists.values())
    return [bool(condition({k: v[i] for k, v in lists.items()})) for i in range(n)]
