"""The only owner of the HDF5 trace layout (documented in docs/trace-format.md).

A trace holds a probe set (texts and exact token ids, once), run metadata (root attributes) and a
sequence of records, one per logged step, appended along the first axis of resizable datasets.
`marginscope measure` writes a trace with one record; the tracker appends one per logged step.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..dynamics.scoring import EncodedProbe
from ..errors import MarginscopeError

SCHEMA = "marginscope-trace"
SCHEMA_VERSION = 1

_STR = h5py.string_dtype("utf-8")
_IDS = h5py.vlen_dtype(np.dtype("int32"))


@dataclass
class Record:
    """One logged step. Shapes: N probes, R responses, T = longest response (NaN-padded)."""

    step: int
    logp: np.ndarray  # [N, R]
    token_logp: np.ndarray  # [N, R, T]
    gram: np.ndarray  # [N, R, R]
    d_w: np.ndarray  # [N]
    d_l: np.ndarray  # [N]
    case: np.ndarray  # [N] int8, 0 = undetermined
    predicted_delta: np.ndarray  # [N, R], per unit learning rate
    observed_delta: np.ndarray  # [N, R], change since the previous record (NaN for the first)
    token_gram: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


# name → (dtype, shape of one record given dims)
_RECORD_FIELDS: dict[str, tuple[Any, Any]] = {
    "step": (np.int64, lambda n, r, t: ()),
    "logp": (np.float64, lambda n, r, t: (n, r)),
    "token_logp": (np.float64, lambda n, r, t: (n, r, t)),
    "gram": (np.float64, lambda n, r, t: (n, r, r)),
    "d_w": (np.float64, lambda n, r, t: (n,)),
    "d_l": (np.float64, lambda n, r, t: (n,)),
    "case": (np.int8, lambda n, r, t: (n,)),
    "predicted_delta": (np.float64, lambda n, r, t: (n, r)),
    "observed_delta": (np.float64, lambda n, r, t: (n, r)),
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _resizable(group: h5py.Group, name: str, dtype, shape: tuple[int, ...]) -> h5py.Dataset:
    return group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                chunks=(1, *shape) if shape else (256,))


def _append(ds: h5py.Dataset, value) -> None:
    ds.resize(ds.shape[0] + 1, axis=0)
    ds[-1] = value


def write_trace(path: str | Path, *, probes, encoded: Sequence[EncodedProbe], names: Sequence[str],
                metadata: dict[str, Any], records: Sequence[Record],
                ref_logp: np.ndarray | None = None) -> Path:
    """Write a complete trace atomically: a temporary file in the same folder, then a rename, so a
    failure never leaves a half-written file at `path`."""
    path = Path(path)
    if path.is_dir():
        raise MarginscopeError(f"{path}: is a directory, expected an output .h5 file path")
    if not path.parent.exists():
        raise MarginscopeError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            _write_header(f, probes, encoded, names, metadata, ref_logp)
            for record in records:
                _append_record(f, record)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_header(f: h5py.File, probes, encoded, names, metadata, ref_logp) -> None:
    f.attrs["schema"] = SCHEMA
    f.attrs["schema_version"] = SCHEMA_VERSION
    for key, value in metadata.items():
        f.attrs[key] = json.dumps(_jsonable(value))
    n, r = len(encoded), len(names)
    g = f.create_group("probes")
    g.attrs["names"] = json.dumps(list(names))
    g.attrs["fingerprint"] = probes.fingerprint()
    g.create_dataset("id", data=[p.id for p in probes], dtype=_STR)
    g.create_dataset("prompt", data=[p.prompt for p in probes], dtype=_STR)
    g.create_dataset("response", data=[[p.responses[k] for k in names] for p in probes], dtype=_STR)
    t = f.create_group("tokens")
    prompt_ids = t.create_dataset("prompt_ids", shape=(n,), dtype=_IDS)
    response_ids = t.create_dataset("response_ids", shape=(n, r), dtype=_IDS)
    for i, e in enumerate(encoded):
        prompt_ids[i] = np.asarray(e.prompt_ids, dtype=np.int32)
        for j, ids in enumerate(e.response_ids):
            response_ids[i, j] = np.asarray(ids, dtype=np.int32)
    t.create_dataset("lengths", data=np.array([[len(x) for x in e.response_ids] for e in encoded],
                                                dtype=np.int32))
    if ref_logp is not None:
        f.create_dataset("reference/logp", data=np.asarray(ref_logp, dtype=np.float64))
    rec = f.create_group("records")
    t_max = max(len(x) for e in encoded for x in e.response_ids)
    for name, (dtype, shape) in _RECORD_FIELDS.items():
        _resizable(rec, name, dtype, shape(n, r, t_max))


def _append_record(f: h5py.File, record: Record) -> None:
    rec = f["records"]
    for name in _RECORD_FIELDS:
        _append(rec[name], getattr(record, name))
    for n, (gram, sq_w, sq_l) in record.token_gram.items():
        grp = rec.require_group(f"token_gram/{n}")
        if "gram" not in grp:
            _resizable(grp, "gram", np.float64, gram.shape)
            _resizable(grp, "sqnorm_w", np.float64, sq_w.shape)
            _resizable(grp, "sqnorm_l", np.float64, sq_l.shape)
            _resizable(grp, "step", np.int64, ())
        for name, value in (("gram", gram), ("sqnorm_w", sq_w), ("sqnorm_l", sq_l), ("step", record.step)):
            _append(grp[name], value)


class Trace:
    """Read access to a trace: numpy arrays indexed [step, probe, response, ...]."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MarginscopeError(f"{self.path}: no such trace file")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as err:
            raise MarginscopeError(f"{self.path}: not an HDF5 trace ({err})") from None
        if self._f.attrs.get("schema") != SCHEMA:
            self._f.close()
            raise MarginscopeError(f"{self.path}: not a marginscope trace (no '{SCHEMA}' schema attribute)")
        version = int(self._f.attrs["schema_version"])
        if version > SCHEMA_VERSION:
            self._f.close()
            raise MarginscopeError(f"{self.path}: trace schema version {version} is newer than this "
                                   f"marginscope reads ({SCHEMA_VERSION}); upgrade marginscope")

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def _records(self, name: str) -> np.ndarray:
        return self._f["records"][name][()]

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._f.attrs.items() if k not in ("schema", "schema_version")}

    @property
    def schema_version(self) -> int:
        return int(self._f.attrs["schema_version"])

    @property
    def names(self) -> list[str]:
        return json.loads(self._f["probes"].attrs["names"])

    @property
    def probe_ids(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self._f["probes/id"][()]]

    @property
    def fingerprint(self) -> str:
        return str(self._f["probes"].attrs["fingerprint"])

    @property
    def lengths(self) -> np.ndarray:
        return self._f["tokens/lengths"][()].astype(np.int64)

    @property
    def ref_logp(self) -> np.ndarray | None:
        return self._f["reference/logp"][()] if "reference" in self._f else None

    steps = property(lambda self: self._records("step"), doc="int64 [S] logged steps")
    logp = property(lambda self: self._records("logp"), doc="float64 [S, N, R] sequence log-probs")
    token_logp = property(lambda self: self._records("token_logp"), doc="float64 [S, N, R, T], NaN-padded")
    gram = property(lambda self: self._records("gram"), doc="float64 [S, N, R, R] log-prob gradient Gram")
    d_w = property(lambda self: self._records("d_w"), doc="float64 [S, N] −∂ℓ/∂log π_w")
    d_l = property(lambda self: self._records("d_l"), doc="float64 [S, N] +∂ℓ/∂log π_l")
    case = property(lambda self: self._records("case"), doc="int8 [S, N] Case 1–4 (0 = undetermined)")
    predicted_delta = property(lambda self: self._records("predicted_delta"),
                               doc="float64 [S, N, R] first-order Δlog π per unit learning rate")
    observed_delta = property(lambda self: self._records("observed_delta"),
                              doc="float64 [S, N, R] Δlog π since the previous record")

    def input_ids(self, n: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_ids, response_ids) scored for probe n, response r."""
        return (self._f["tokens/prompt_ids"][n].astype(np.int64),
                self._f["tokens/response_ids"][n, r].astype(np.int64))

    def token_gram(self, n: int) -> dict[str, np.ndarray] | None:
        """Per-token Gram of probe n over its records: step [S'], gram [S', T_w, T_l], sqnorm_w, sqnorm_l."""
        key = f"records/token_gram/{n}"
        if key not in self._f:
            return None
        return {name: ds[()] for name, ds in self._f[key].items()}


def open_trace(path: str | Path) -> Trace:
    """Open a trace for reading (`ms.trace.open`)."""
    return Trace(path)
